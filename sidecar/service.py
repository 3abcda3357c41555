"""The decision service: Request → Decision. One instance per server, shared by
every transport. It knows nothing of Envoy or Redis: it resolves the tenant,
estimates, asks the backend, applies shadow mode and the failure mode, counts."""
from __future__ import annotations

import logging
import time
from typing import Optional

from sidecar import _core
from sidecar.backends.base import Backend, BackendError
from sidecar.estimate import EstimateError, estimate
from sidecar.metrics import Metrics
from sidecar.model import CORE_KINDS, Decision, Kind, Request
from sidecar.policy import schema
from sidecar.policy.load import CompiledPolicy, TenantRule

log = logging.getLogger("kt.service")
MAX_TENANT_LEN = 128
_STRICTNESS = {"open": 0, "envoy": 1, "closed": 2}


def _valid_tenant(t: str) -> bool:
    return 0 < len(t) <= MAX_TENANT_LEN and t.isprintable() and not any(c in t for c in "{}")


class DecisionService:
    def __init__(self, policy: CompiledPolicy, backend: Backend, metrics: Optional[Metrics] = None):
        self.policy = policy
        self.backend = backend
        self.metrics = metrics or Metrics()

    def replace_policy(self, policy: CompiledPolicy) -> None:
        self.policy = policy

    async def decide(self, req: Request, transport: str = "authz") -> Decision:
        started = time.perf_counter()
        decision = await self._decide(req)
        m = self.metrics
        m.latency.labels(transport).observe(time.perf_counter() - started)
        m.requests.labels(decision.kind.value if not decision.shadow else "allow", transport).inc()
        if decision.shadow:
            m.shadow_denials.labels(decision.kind.value).inc()
        return decision

    async def _decide(self, req: Request) -> Decision:
        policy = self.policy  # one policy for the whole decision, even across a reload
        tenant = req.tenant if req.tenant is not None else req.headers.get(policy.tenant_header)
        if tenant is not None:
            tenant = tenant.strip()
        if not tenant:
            if policy.missing_tenant == "deny":
                return Decision(Kind.MISSING_TENANT, message=(
                    f"No tenant: the request carries no {policy.tenant_header!r} header."))
            tenant = "anonymous"
        if not _valid_tenant(tenant):
            return Decision(Kind.BAD_REQUEST, message=(
                f"Malformed tenant in {policy.tenant_header!r}: 1..{MAX_TENANT_LEN} printable "
                "characters without braces expected."))
        rule = policy.rule_for(tenant)
        if rule is None:
            return Decision(Kind.UNKNOWN_TENANT, tenant=tenant,
                            message=f"Unknown tenant {tenant!r}.")
        try:
            est = estimate(policy, req)
        except EstimateError as exc:
            return Decision(Kind.BAD_REQUEST, tenant=tenant, message=f"Malformed request: {exc}.")
        asked = policy.tier_by_model.get(est.model, 0) if est.model else 0
        try:
            out = await self.backend.decide(tenant, rule.limits, asked, est.input_tokens,
                                            est.output_tokens, est.firm_tokens, rule.shadow)
        except BackendError as exc:
            return self._failure(tenant, rule, asked, str(exc))
        self._observe(tenant, rule, out)
        tier = policy.tiers[out.tier]
        kind = CORE_KINDS[out.kind]
        admitted = kind in (Kind.ALLOW, Kind.DOWNGRADE)
        if not admitted and rule.shadow:
            log.info("shadow: tenant=%s would be %s", tenant, kind.value)
        return Decision(kind, tenant=tenant, tier=tier.name, model=tier.model,
                        priority=rule.priority, outcome=out, shadow=not admitted and rule.shadow,
                        downgraded=out.tier > asked, budget_unit=rule.budget_unit)

    def _failure(self, tenant: str, rule: TenantRule, asked: int, error: str) -> Decision:
        """The backend could not decide: the configured failure mode answers, never silently."""
        self.metrics.backend_errors.labels(self.backend.name).inc()
        mode = self.failure_mode_for(rule)
        self.metrics.failure_mode.labels(mode).inc()
        log.warning("backend error, failure mode %s for tenant %s: %s", mode, tenant, error)
        tier = self.policy.tiers[asked]
        if mode == "open":
            return Decision(Kind.FAIL_OPEN, tenant=tenant, tier=tier.name, model=tier.model,
                            priority=rule.priority, message=error)
        if mode == "closed":
            return Decision(Kind.FAIL_CLOSED, tenant=tenant, message=(
                "The rate limiter is unavailable and this tenant's limits fail closed. "
                "Try again shortly."))
        return Decision(Kind.UNAVAILABLE, tenant=tenant, message=f"limiter backend: {error}")

    def failure_mode_for(self, rule: TenantRule) -> str:
        """The strictest mode among the classes of limit this tenant has (closed > envoy > open)."""
        backend = self.policy.backend
        if not isinstance(backend, schema.RedisBackend):
            return "closed"  # the embedded backend has no outage to be open about
        fm = backend.failure_mode
        if isinstance(fm, str):
            return fm
        lim = rule.limits
        modes = []
        if lim.rpm > 0 or lim.tpm > 0:
            modes.append(fm.rate_limits)
        if lim.budget >= 0:
            modes.append(fm.budgets)
        if not modes:
            return "open"
        return max(modes, key=_STRICTNESS.__getitem__)

    def _observe(self, tenant: str, rule: TenantRule, out: _core.Outcome) -> None:
        if not rule.name:  # unknown tenants share the defaults: no per-tenant series
            return
        m = self.metrics
        if out.limit_tokens > 0:
            m.tokens_remaining.labels(tenant).set(out.remaining_tokens)
        if out.budget_limit >= 0:
            value = out.budget_remaining / 1e9 if rule.budget_unit == "usd" else out.budget_remaining
            m.budget_remaining.labels(tenant, rule.budget_unit).set(value)
