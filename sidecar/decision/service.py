"""The decision service: Request → Decision. One instance per server, shared by the
deciding transports (ext_authz gRPC and HTTP, RLS). It knows nothing of Envoy or of a
particular backend: it resolves the tenant (tenant.py), estimates (estimate.py), orders
the providers (routing.py), asks the backend, applies shadow mode and the failure mode
(failure.py), parks a refusal that may wait (queue.py), counts, and puts what an admitted
request was charged in the reservation book the settlement flow closes."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Optional, Sequence

from sidecar import _core, attribution
from sidecar.anomaly import TokenRateWatch
from sidecar.backends.base import (Backend, BackendError, BackendOverloaded, BackendTimeout,
                                   Candidate, LateReply)
from sidecar.burstlog import BurstLog
from sidecar.decision import failure, tenant as tenants
from sidecar.decision.estimate import EstimateError, LengthRequired, estimate
from sidecar.decision.queue import AdmissionQueue, Timer
from sidecar.decision.routing import ProviderRouter
from sidecar.ledger.recorder import Ledger
from sidecar.metrics import Metrics
from sidecar.model import (CORE_KINDS, OTHER_TENANTS, REASON_FROZEN, REASON_PROVIDER_FULL,
                           REASON_PROVIDER_QUOTA, REASON_TOKEN_RATE, Decision, Kind, Request)
from sidecar.policy.holders import HolderPath, PathCell, PathCharge, path_deltas
from sidecar.policy.load import CompiledPolicy, TenantRule
from sidecar.policy.providers import PRIORITY_RANK
from sidecar.settlement.book import (REQUEST_ID_KEY, ReservationBook, ReservationIds,
                                     reservation_record)
from sidecar.settlement.bound import output_bound, stored_input_bound
from sidecar.settlement.late import LateRefunds

log = logging.getLogger("kt.service")


def holder_answer(cell: PathCell, tenant: str, kind: Kind, retry_after_s: int
                  ) -> tuple[str, str]:
    """x-kt-reason and the error message when a cell other than the tenant's own first one
    refused or downgraded a request (docs/budgets.md): they name the holder and which of
    its limits, never its figures (another holder's budget is not the client's to see)."""
    reason = f"holder:{cell.holder}"
    if kind is Kind.DOWNGRADE:
        return reason, ""
    what = f"the {cell.label} of {cell.holder!r}" if cell.holder != tenant \
        else f"its {cell.label}"
    whose = (f", which tenant {tenant!r} draws on," if cell.holder != tenant else "")
    retry = f" Try again in {retry_after_s}s." if retry_after_s > 0 else ""
    if kind is Kind.DENY_BUDGET:
        return reason, (f"Budget exhausted for tenant {tenant!r}: {what}{whose} has no room "
                        f"for this request.{retry}")
    if kind is Kind.DENY_RATE:
        return reason, (f"Rate limit reached for tenant {tenant!r}: {what}{whose} has no "
                        f"room for this request now.{retry}")
    if kind is Kind.TOO_LARGE:
        return reason, (f"Request too large for tenant {tenant!r}: {what}{whose} can never "
                        "admit it.")
    return reason, ""


def _ledger_decision(kind: Kind, downgraded: bool) -> str:
    """How an admitted request was let through, as the ledger records it."""
    if kind in (Kind.ALLOW, Kind.DOWNGRADE):
        return "downgrade" if downgraded else "allow"
    return "shadow"  # a refusal shadow mode let through


class Decider:
    def __init__(self, policy: CompiledPolicy, backend: Backend, book: ReservationBook,
                 refunds: LateRefunds, metrics: Optional[Metrics] = None,
                 ledger: Optional[Ledger] = None, queue_timer: Optional[Timer] = None):
        self.policy = policy
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.reservations = book
        self.refunds = refunds  # what a late decision reply charged that did not stand
        # what was spent, request by request (sidecar/ledger/); Ledger(None) records nothing
        self.ledger = ledger or Ledger(None)
        self.new_reservation_id = ReservationIds().next
        self.failures = failure.FailureAnswers(backend, self.metrics, self.new_reservation_id)
        self._children: dict = {}
        self._tenant_gauges: dict = {}
        # a flood of bad input logs one line per burst, not one per request
        self.rejected_log = BurstLog(log)
        # provider quotas and the admission queue (docs/providers.md): only with a policy
        # that has them
        self._router: Optional[ProviderRouter] = None
        self.queue: Optional[AdmissionQueue] = None
        self._queue_timer = queue_timer
        self._providers_for(policy)
        self.anomalies: Optional[TokenRateWatch] = None  # Flows sets the shared one

    def replace_policy(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self._providers_for(policy)

    def _providers_for(self, policy: CompiledPolicy) -> None:
        self._router = ProviderRouter(policy, self.metrics) if policy.providers else None
        if policy.queue is None:
            self.queue = None  # requests already waiting finish their wait
        elif self.queue is None:
            self.queue = AdmissionQueue(policy.queue, self.metrics, self._queue_timer)
        else:
            self.queue.settings = policy.queue

    def router(self, policy: CompiledPolicy) -> Optional[ProviderRouter]:
        """The provider router of ``policy`` (the one a decision started with)."""
        r = self._router
        if r is not None and r.policy is policy:
            return r
        return ProviderRouter(policy, self.metrics) if policy.providers else None

    def failure_mode_for(self, rule: TenantRule) -> str:
        """The strictest mode among the classes of limit this tenant has (closed > envoy > open)."""
        return failure.mode_for(self.backend, rule)

    async def decide(self, req: Request, transport: str = "authz",
                     caller_wait_s: Optional[float] = None) -> Decision:
        """``caller_wait_s``: how long the caller still waits, when it says (the queue's
        waits end before it)."""
        started = time.perf_counter()
        queue = self.queue
        arrived = queue.timer.now() if queue is not None else 0.0
        decision = await self._decide(req)
        elapsed = time.perf_counter() - started  # the decision alone; a wait is queue_wait
        if queue is not None and transport != "rls" and queue.may_wait(decision):
            # RLS never waits: Envoy's rate-limit filter gives up after 20 ms
            decision = await queue.hold(decision, PRIORITY_RANK.get(decision.priority, 1),
                                        functools.partial(self._decide, req), arrived,
                                        caller_wait_s)
        kind = decision.kind.value if not decision.shadow else "allow"
        # labelled children looked up once: .labels() costs microseconds per call
        children = self._children.get((kind, transport))
        if children is None:
            m = self.metrics
            children = self._children[(kind, transport)] = (
                m.requests.labels(kind, transport), m.latency.labels(transport))
        children[0].inc()
        children[1].observe(elapsed)
        if decision.shadow:
            self.metrics.shadow_denials.labels(decision.kind.value).inc()
        elif not decision.admitted:
            self.ledger.refused(decision.tenant or "-", decision.kind.value)
        return decision

    async def _decide(self, req: Request) -> Decision:
        policy = self.policy  # one policy for the whole decision, even across a reload
        resolved = tenants.resolve(policy, req, self.backend, self.metrics, self.rejected_log)
        if isinstance(resolved, Decision):
            return resolved
        tenant, rule = resolved
        if policy.frozen and tenant in policy.frozen:
            return Decision(Kind.FROZEN, tenant=tenant, reason=REASON_FROZEN, message=(
                f"Tenant {tenant!r} (or a holder above it) is frozen by its operator: its "
                "requests are refused until it is unfrozen."))
        try:
            est = estimate(policy, req)
        except LengthRequired as exc:
            return Decision(Kind.LENGTH_REQUIRED, tenant=tenant, message=f"Length required: {exc}.")
        except EstimateError as exc:
            self.rejected_log.warning("refused a malformed request of tenant %s: %s", tenant, exc)
            return Decision(Kind.BAD_REQUEST, tenant=tenant, message=f"Malformed request: {exc}.")
        if (est.model and policy.unpriced_models == "refuse" and policy.pricing
                and est.model not in policy.pricing and est.model not in policy.tier_by_model):
            # the provider would serve and bill it at its own price, which the policy does
            # not know: the dearest listed price can be a small part of it
            self.rejected_log.warning("refused tenant %s's request for unpriced model %r",
                                      tenant, est.model[:100])
            return Decision(Kind.BAD_REQUEST, tenant=tenant, message=(
                f"Model {est.model[:100]!r} is not served by this gateway: its policy has no "
                "price for it."))
        asked = wanted = policy.tier_by_model.get(est.model, 0) if est.model else 0
        if self.anomalies is not None and policy.anomaly.action != "flag" \
                and not rule.shadow and self.anomalies.flagged(tenant):
            action = policy.anomaly.action
            if action == "refuse" or asked + 1 >= len(policy.tiers):
                self.metrics.token_rate_refusals.labels("refuse").inc()
                return Decision(Kind.DENY_RATE, tenant=tenant, reason=REASON_TOKEN_RATE,
                                message=(f"Tenant {tenant!r} is using tokens at many times its "
                                         "usual rate; its requests are refused for now. Try "
                                         "again in 60s."))
            self.metrics.token_rate_refusals.labels("downgrade").inc()
            asked += 1  # a cheaper tier; the answer says downgraded (from `wanted`)
        late = LateReply()
        router = self.router(policy)
        candidates = router.candidates(asked) if router is not None else []
        # budget holders (docs/budgets.md): the path of cells when the tenant has more than
        # its own (a parent, several windows, a model's cell); None on the fast path
        path = rule.path
        if rule.model_paths is not None:
            path = rule.path_for(est.model or policy.tiers[asked].model)
        try:
            if path is not None:  # never with providers (the policy refuses both)
                out = await self.backend.decide_path(tenant, path, asked, est.input_tokens,
                                                     est.output_tokens, est.firm_tokens,
                                                     rule.shadow, late)
            elif router is None:
                out = await self.backend.decide(tenant, rule.limits, asked, est.input_tokens,
                                                est.output_tokens, est.firm_tokens, rule.shadow,
                                                late)
            else:
                out = await self.backend.decide_routed(
                    tenant, rule.limits, asked, est.input_tokens, est.output_tokens,
                    est.firm_tokens, rule.shadow, rule.priority_rank, router.spill(rule),
                    candidates, late)
        except BackendError as exc:
            if isinstance(exc, BackendOverloaded):
                decision = self.failures.shed(tenant, str(exc))
            else:
                decision = self.failures.failed(policy, router, tenant, rule, asked, str(exc))
            if isinstance(exc, BackendTimeout):
                key = self._late_key(decision, req)
                late.on_outcome = functools.partial(
                    self._late_outcome, decision.kind, tenant, rule, key,
                    candidates=candidates, input_tokens=est.input_tokens, path=path)
            return decision
        except asyncio.CancelledError:
            # the caller stopped waiting (Envoy's own ext_authz timeout cancels the gRPC
            # call) and Envoy's failure mode answered: if Redis applies the decision
            # anyway, it is put right as for the "envoy" failure mode
            late.on_outcome = functools.partial(
                self._late_outcome, Kind.UNAVAILABLE, tenant, rule,
                REQUEST_ID_KEY + req.request_id if req.request_id else "",
                candidates=candidates, input_tokens=est.input_tokens, path=path)
            raise
        chosen = router.observe(out, candidates) if router is not None else None
        provider = chosen.provider if chosen is not None else ""
        self._observe(tenant, rule, out)
        if out.budget_limit >= 0:
            self.ledger.budget_seen(tenant, tenant if rule.name else OTHER_TENANTS,
                                    rule.budget_unit, out.budget_limit,
                                    out.budget_limit - out.budget_remaining, out.period_start_us)
        rid = ""
        if out.charged_tokens:
            # keyed by an id of our own, never by one the client sent: a replayed
            # x-request-id must not merge two requests into one settlement
            rid = self.new_reservation_id()
            served = policy.tiers[out.tier].model
            bound_output = output_bound(policy, served, est, out.charged_tokens)
            stored = stored_input_bound(policy, served, est)
            # whom below the tenant the request is for (a trusted filter's headers only)
            att = attribution.read(req.headers, policy.attribution, self._attribution_dropped)
            self.reservations.put(rid, tenant, out.tier, served,
                                  out.charged_tokens, out.charged_cost, out.period_start_us,
                                  time.monotonic(), est.model or policy.tiers[asked].model,
                                  _ledger_decision(CORE_KINDS[out.kind], out.tier > wanted),
                                  provider, est.input_tokens, bound_output, stored,
                                  att.user, attribution.joined(att.tags),
                                  PathCharge(path, out.charges) if (
                                      path is not None and out.charges is not None) else None)
            # a path's reservation is not shared (its record has no room for the path;
            # docs/budgets.md): another replica settles its usage as one without a
            # reservation, on the tenant's path
            if self.backend.shares_reservations and path is None:
                self.backend.share_reservation(tenant, rid, reservation_record(
                    out.tier, served, out.charged_tokens, out.charged_cost,
                    out.period_start_us, provider, est.input_tokens, bound_output, stored,
                    att.user, attribution.joined(att.tags)))
        tier = policy.tiers[out.tier]
        kind = CORE_KINDS[out.kind]
        admitted = kind in (Kind.ALLOW, Kind.DOWNGRADE)
        if not admitted and rule.shadow:
            log.info("shadow: tenant=%s would be %s", tenant, kind.value)
        reason = message = ""
        if out.reason == _core.R_PROVIDER:
            reason = REASON_PROVIDER_FULL if admitted else REASON_PROVIDER_QUOTA
        elif path is not None and out.cell > 0 and kind is not Kind.ALLOW:
            reason, message = holder_answer(path.cells[out.cell], tenant, kind,
                                            out.retry_after_s)
        return Decision(kind, tenant=tenant, tier=tier.name, model=tier.model,
                        priority=rule.priority, outcome=out, shadow=not admitted and rule.shadow,
                        downgraded=out.tier > wanted, budget_unit=rule.budget_unit,
                        reservation_id=rid, provider=provider, reason=reason,
                        message=message)

    def _attribution_dropped(self, field: str, why: str) -> None:
        self.metrics.attribution_dropped.labels(field, why).inc()

    def _late_key(self, decision: Decision, req: Request) -> str:
        """Where a timed-out decision that Redis applies after all is kept: under the
        reservation id a fail-open answer carried to Envoy, or, when Envoy's own failure
        mode answered (no id reached it), under the request's x-request-id."""
        if decision.reservation_id:
            return decision.reservation_id
        return REQUEST_ID_KEY + req.request_id if req.request_id else ""

    def _late_outcome(self, answered: Kind, tenant: str, rule: TenantRule, request_id: str,
                      out: _core.Outcome, candidates: Sequence[Candidate] = (),
                      input_tokens: int = 0, path: Optional[HolderPath] = None) -> None:
        """Redis applied a decision after it timed out and the failure mode had answered.
        The charge it made is right only if the request went on: refund it when the
        sidecar itself refused the request (fail closed); keep it, as the request's
        reservation, when the request went on (fail open; a usage report already on its
        way is settled after this reply, on the same link, and finds it: settle_usage);
        when Envoy's own failure mode decided, whether the request went on is unknown
        here, so keep it as a reservation too: a refund could lose spend, a charge cannot,
        and usage, if the request went on, replaces it instead of adding to it."""
        action = "kept"
        if not (out.charged_tokens or out.charged_cost):
            action = "nothing_charged"
        elif answered in (Kind.FAIL_CLOSED, Kind.OVERLOADED):
            self.refunds.refund(tenant, rule.limits if path is None or out.charges is None
                                else path_deltas(path, out.charges, 0, 0),
                                out.charged_tokens, out.charged_cost, out.period_start_us)
            if 0 <= out.provider < len(candidates):  # and the provider's request and tokens
                self.refunds.refund_provider(candidates[out.provider], out.charged_tokens, 1)
            return
        elif (answered in (Kind.FAIL_OPEN, Kind.UNAVAILABLE) and request_id
              and out.tier < len(self.policy.tiers)):
            provider = candidates[out.provider].provider if 0 <= out.provider < len(
                candidates) else ""
            # no bound (bound_output -1): without usage it stays at this charge, split as
            # the estimate was (``input_tokens``), for the ledger (settlement/bound.py)
            self.reservations.put(request_id, tenant, out.tier, self.policy.tiers[out.tier].model,
                                  out.charged_tokens, out.charged_cost, out.period_start_us,
                                  time.monotonic(), provider=provider, bound_input=input_tokens,
                                  path_charge=PathCharge(path, out.charges) if (
                                      path is not None and out.charges is not None) else None)
        self.metrics.late_replies.labels(action).inc()

    def _observe(self, tenant: str, rule: TenantRule, out: _core.Outcome) -> None:
        if not rule.name:  # unknown tenants share the defaults: no per-tenant series
            return
        gauges = self._tenant_gauges.get(tenant)
        if gauges is None:
            # the four series, then the limit and period end last written: those two move
            # only with the policy or a new period, and a gauge's set costs ~3.5 µs
            gauges = self._tenant_gauges[tenant] = [None, None, None, None, None, None]
        # a series exists only for a limit the tenant has: a tenant without a budget must
        # not export kt_budget_remaining 0, which any low-budget alert would fire on
        if out.limit_tokens > 0:
            if gauges[0] is None:
                gauges[0] = self.metrics.tokens_remaining.labels(tenant)
            gauges[0].set(out.remaining_tokens)
        if out.budget_limit >= 0:
            if gauges[1] is None:
                gauges[1] = self.metrics.budget_remaining.labels(tenant, rule.budget_unit)
                gauges[2] = self.metrics.budget_limit.labels(tenant, rule.budget_unit)
            scale = 1e9 if rule.budget_unit == "usd" else 1
            gauges[1].set(out.budget_remaining / scale)
            if gauges[4] != out.budget_limit:
                gauges[4] = out.budget_limit
                gauges[2].set(out.budget_limit / scale)
            # the period's end as a Unix time (whole seconds: it moves only when a period
            # starts); a `total` budget has no end and no series
            if out.budget_reset_us > 0:
                if gauges[3] is None:
                    gauges[3] = self.metrics.budget_period_end.labels(tenant)
                end = out.period_start_us  # the same period: the same end
                if gauges[5] != end:
                    gauges[5] = end
                    gauges[3].set(round(time.time() + out.budget_reset_us / 1e6))
