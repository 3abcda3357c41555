"""Who serves a request: the candidate providers of a decision, in routing order, and what
each decision did to them (docs/providers.md). The rules (quota, reservation, spill-over)
are the core's and the Lua scripts'; this module only orders the candidates the service
hands to the backend, and counts.

Weighted routing is a smooth weighted round robin (the one nginx uses) per model: over
any run of requests each provider is first choice in proportion to its weight, evenly
spread (70/30 puts the 30 on every third or fourth request, never in a block), and
deterministic, which a test can count. The other providers of the model follow the
first choice by descending weight: they are where a full provider spills to.
"""
from __future__ import annotations

from typing import Optional

from sidecar import _core
from sidecar.backends.base import Candidate
from sidecar.metrics import Metrics
from sidecar.policy.load import CompiledPolicy, TenantRule
from sidecar.policy.providers import ModelRoute, ProviderPlan

# Outcome kinds as provider decisions (kt_provider_requests_total{decision})
_DECISIONS = {_core.ALLOW: "allow", _core.DOWNGRADE: "downgrade",
              _core.DENY_RATE: "rate_limited", _core.TOO_LARGE: "too_large"}
# tiers a candidate list spans from the tier asked: the low-water tier one down, and one
# more for spill-over
_TIERS_SPANNED = 3


class _SmoothWeighted:
    """Smooth weighted round robin over a model's weighted providers."""

    def __init__(self, route: ModelRoute) -> None:
        self.route = route
        self.current = [0.0] * len(route.weights)
        self.total = sum(route.weights)

    def order(self) -> tuple[int, ...]:
        w = self.route.weights
        if not w:
            return self.route.providers
        cur = self.current
        best = 0
        for i, weight in enumerate(w):
            cur[i] += weight
            if cur[i] > cur[best]:
                best = i
        cur[best] -= self.total
        p = self.route.providers
        return (p[best],) + p[:best] + p[best + 1:]


class ProviderRouter:
    """Candidate lists for one compiled policy (a reload makes a new router)."""

    def __init__(self, policy: CompiledPolicy, metrics: Metrics) -> None:
        assert policy.providers is not None
        self.policy = policy
        self.plan: ProviderPlan = policy.providers
        self.metrics = metrics
        self._weighted = {m: _SmoothWeighted(r) for m, r in self.plan.routes.items()
                          if r.strategy == "weighted"}
        # candidates of the tiers that need no weighted pick, built once per tier
        self._fixed: dict[int, list[Candidate]] = {}
        for rule in self.plan.providers:
            q = rule.quota
            for name, value in (("requests_per_minute", q.rpm), ("tokens_per_minute", q.tpm),
                                ("requests_per_day", q.rpd)):
                if value:
                    metrics.provider_limit.labels(rule.id, name).set(value)
        self._children: dict = {}

    def _tier_candidates(self, tier: int) -> list[Candidate]:
        model = self.policy.tiers[tier].model
        weighted = self._weighted.get(model)
        if weighted is None:
            fixed = self._fixed.get(tier)
            if fixed is None:
                fixed = self._fixed[tier] = [
                    Candidate(tier, self.plan.providers[i].id, self.plan.providers[i].quota)
                    for i in self.plan.routes[model].providers]
            return fixed
        provs = self.plan.providers
        return [Candidate(tier, provs[i].id, provs[i].quota) for i in weighted.order()]

    def candidates(self, asked: int) -> list[Candidate]:
        """The providers a request asking for tier ``asked`` may go to, tier by tier in
        routing order (the core takes those of the tier the tenant's decision lands on,
        and of the next when it spills)."""
        out: list[Candidate] = []
        for tier in range(asked, min(len(self.policy.tiers), asked + _TIERS_SPANNED)):
            out += self._tier_candidates(tier)
        return out

    @staticmethod
    def spill(rule: TenantRule) -> int:
        return 1 if rule.spill_to_next_tier else 0

    def observe(self, out: _core.Outcome, candidates: list[Candidate]) -> Optional[Candidate]:
        """Count a routed decision; the provider it went to, if any."""
        m = self.metrics
        if out.provider >= 0:
            c = candidates[out.provider]
            kids = self._children.get(c.provider)
            if kids is None:
                kids = self._children[c.provider] = (
                    m.provider_tokens_remaining.labels(c.provider),
                    m.provider_requests_remaining.labels(c.provider),
                    m.provider_utilisation.labels(c.provider, "tokens"),
                    m.provider_utilisation.labels(c.provider, "requests"))
            q = c.quota
            if out.provider_remaining_tokens >= 0 and q.tok_cap > 0:
                kids[0].set(out.provider_remaining_tokens)
                kids[2].set(max(0.0, 1.0 - out.provider_remaining_tokens / q.tok_cap))
            if out.provider_remaining_requests >= 0 and q.req_cap > 0:
                kids[1].set(out.provider_remaining_requests)
                kids[3].set(max(0.0, 1.0 - out.provider_remaining_requests / q.req_cap))
            decision = _DECISIONS.get(out.kind)
            if decision is not None and out.kind <= _core.DOWNGRADE:
                m.provider_requests.labels(c.provider, decision).inc()
            return c
        if out.reason == _core.R_PROVIDER and candidates:
            first = next((c for c in candidates if c.tier >= out.tier), candidates[0])
            m.provider_requests.labels(first.provider, _DECISIONS[out.kind]).inc()
        return None

    def first(self, asked: int) -> str:
        """Where a request the backend could not decide goes (fail open): the first provider
        of its tier, charged nothing."""
        model = self.policy.tiers[asked].model
        return self.plan.providers[self.plan.routes[model].providers[0]].id

    def known(self, provider: str) -> bool:
        return provider in self.plan.by_id
