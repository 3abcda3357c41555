"""Provider quotas on Redis Cluster (docs/providers.md): a tenant's keys and a provider's
are in different slots, and a script touches one slot, so a routed decision there is two
steps instead of routed.lua's one.

Step 1 holds provider capacity (provider_take.lua on the provider's slot, candidates in
order, the tier guessed from the tenant's last decision); step 2 decides the tenant
(decide.lua) at the held provider's tier. Only a provider hold is ever given back (the
tenant refused, or went to another tier than guessed): a tenant's spend is refunded only
if, in that last case, no provider of its tier has room.
"""
from __future__ import annotations

import logging
import uuid
from typing import Callable, Protocol, Sequence

from sidecar import _core
from sidecar.backends.base import BackendError, Candidate, Settlement
from sidecar.backends.redis.keys import Keys
from sidecar.backends.redis.link import RedisLink
from sidecar.backends.redis.scripts import Script, quota_args

log = logging.getLogger("kt.redis")


class TenantSteps(Protocol):
    """What the routing needs of the backend: the tenant's own decision and settlement, and
    a provider's correction."""

    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int,
                     commit_on_deny: bool) -> _core.Outcome: ...

    async def settle(self, tenant: str, limits: _core.Limits, request_id: str,
                     delta_tokens: int, delta_cost: int,
                     period_start_us: int) -> Settlement: ...

    async def settle_provider(self, provider: str, quota: _core.Quota, marker: str,
                              delta_tokens: int, delta_requests: int = 0) -> bool: ...


def refusal(tier: int, wait_us: int) -> _core.Outcome:
    """Refused by provider quota (as _core.decide_routed answers it): no tenant fields."""
    kind = _core.DENY_RATE if wait_us >= 0 else _core.TOO_LARGE
    seconds = max(1, -(-wait_us // 1_000_000)) if wait_us > 0 else 0
    return _core.Outcome(kind, _core.R_PROVIDER, tier, seconds, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0,
                         0, max(wait_us, 0), -1, -1, -1)


def with_provider(o: _core.Outcome, index: int, rem_requests: int, rem_tokens: int,
                  asked: int, spilled: bool) -> _core.Outcome:
    kind, reason = o.kind, o.reason
    if o.tier > asked and kind == _core.ALLOW:
        kind = _core.DOWNGRADE
    if spilled and kind in (_core.ALLOW, _core.DOWNGRADE):
        reason = _core.R_PROVIDER
    return _core.Outcome(kind, reason, o.tier, o.retry_after_s, o.limit_requests,
                         o.remaining_requests, o.reset_requests_us, o.limit_tokens,
                         o.remaining_tokens, o.reset_tokens_us, o.budget_limit,
                         o.budget_remaining, o.budget_reset_us, o.charged_tokens, o.charged_cost,
                         o.period_start_us, o.wait_us, index, rem_requests, rem_tokens)


class ClusterRouting:
    def __init__(self, link: RedisLink, keys: Keys, take_script: Script,
                 steps: TenantSteps, now_arg: Callable[[], int]) -> None:
        """``now_arg``: the scripts' clock argument (0: Redis's TIME; a test's clock)."""
        self.link = link
        self.now_arg = now_arg
        self.keys = keys
        self.take_script = take_script
        self.steps = steps
        self.refunds = {"ok": 0, "failed": 0}  # holds given back
        # whether each tenant's last decision found it below its low-water mark, to guess
        # the tier whose providers to hold first
        self.below_low_water: dict[str, bool] = {}

    async def provider_take(self, c: Candidate, priority: int, tokens: int) -> list:
        keys = list(self.keys.provider(c.provider))
        args = [self.now_arg(), priority, tokens, *quota_args(c.quota)]
        reply = await self.link.call(self.take_script, keys, args)
        if not (isinstance(reply, list) and len(reply) == 3
                and all(isinstance(x, int) for x in reply)):
            raise self.link.failed(f"provider_take.lua: unexpected reply {str(reply)[:120]}")
        return reply

    async def _give_back(self, c: Candidate, tokens: int) -> None:
        """Return a provider hold whose tenant step did not stand (a fresh marker: applied
        once). A failure leaves the hold to refill: capacity over-counted, never lost."""
        try:
            await self.steps.settle_provider(c.provider, c.quota, f"refund:{uuid.uuid4().hex}",
                                             -tokens, -1)
            self.refunds["ok"] += 1
        except BackendError as exc:
            self.refunds["failed"] += 1
            log.warning("could not give back a hold of provider %s (1 request, %d tokens stay "
                        "taken until they refill): %s", c.provider, tokens, exc)

    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                     priority: int, spill: int,
                     candidates: Sequence[Candidate]) -> _core.Outcome:
        tokens = input_tokens + output_tokens
        ntiers = limits.ntiers
        shift = 1 if self.below_low_water.get(tenant) and tier + 1 < ntiers else 0
        t0 = tier + shift

        async def hold(tiers: range) -> tuple[int, list, int]:
            """The first candidate of ``tiers`` that takes the request (its index and
            provider_take.lua's reply), or -1 and the soonest wait."""
            wait = -1
            for t in tiers:
                for i, c in enumerate(candidates):
                    if c.tier != t:
                        continue
                    r = await self.provider_take(c, priority, tokens)
                    if r[0] == 0:
                        return i, r, wait
                    if r[0] > 0 and (wait < 0 or r[0] < wait):
                        wait = r[0]
            return -1, [], wait

        held, took, best = await hold(range(t0, min(ntiers, t0 + spill + 1)))
        if held < 0:
            return refusal(t0, best)
        c = candidates[held]
        asked = tier + (c.tier - t0)
        out = await self.steps.decide(tenant, limits, asked, input_tokens, output_tokens,
                                      firm_tokens, commit_on_deny)
        if asked + 1 < ntiers:  # low water moves a request one tier down, where there is one
            if len(self.below_low_water) > 100_000:
                self.below_low_water.clear()
            self.below_low_water[tenant] = out.tier > asked
        if not (out.admitted or commit_on_deny):
            await self._give_back(c, tokens)
            return out
        if out.tier == c.tier:
            if out.charged_tokens != tokens:  # the tenant trimmed a defaulted output size
                await self.steps.settle_provider(c.provider, c.quota,
                                                 f"trim:{uuid.uuid4().hex}",
                                                 out.charged_tokens - tokens)
            return with_provider(out, held, took[1], took[2], tier, spilled=c.tier > t0)
        # the tenant's low-water state changed since its last decision: it was charged at
        # out.tier, whose providers serve another model
        await self._give_back(c, tokens)
        tokens = out.charged_tokens
        held, took, best = await hold(range(out.tier, out.tier + 1))
        if held >= 0:
            return with_provider(out, held, took[1], took[2], tier, spilled=False)
        # the one case that refunds a tenant: its charge, made for a request no provider
        # of its tier can take (the RPM slot is not given back: refused, never over-admitted)
        await self.steps.settle(tenant, limits, f"provider-refund:{uuid.uuid4().hex}",
                                -out.charged_tokens, -out.charged_cost, out.period_start_us)
        return refusal(out.tier, best)
