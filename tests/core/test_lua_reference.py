"""The Lua scripts (Redis backend) against the reference model, on a real Valkey.

Each example runs on fresh tenant keys with the scripts' clock override, so a
random sequence of requests (and settlements) replays exactly; every outcome
field and the stored state must equal the reference model's."""
from __future__ import annotations

import asyncio
import itertools
import math

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import _core
from sidecar.backends.redis import BATCH_MAX, RedisBackend
from sidecar.policy import schema
from tests.core import reference_model as ref
from tests.support.clock import T0_US, ManualClock
from tests.core.test_core_reference import limit_sets, requests, settlements, to_core

FIELDS = ("kind", "reason", "tier", "retry_after_s", "remaining_requests", "remaining_tokens",
          "budget_remaining", "charged_tokens", "charged_cost", "reset_requests_us",
          "reset_tokens_us", "budget_reset_us")
_tenants = itertools.count()


def stored_state(r: redis.Redis, backend: RedisBackend, tenant: str) -> tuple:
    rpm_key, tpm_key, budget_key = backend.keys(tenant)

    def level(key: str) -> float:
        v = r.get(key)  # "<level> <last µs>" (lua/common.lua); absent: never used
        return float(v.split()[0]) if v is not None else math.inf

    b = r.hmget(budget_key, "ps", "s")
    return level(rpm_key), level(tpm_key), int(b[1]) if b[1] is not None else 0


def run_sequence(valkey, lim: ref.Limits, seq, adjustments=()) -> None:
    clock = ManualClock()
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    tenant = f"lua-{next(_tenants)}"
    core_lim, ref_state = to_core(lim), ref.State()
    r = redis.Redis.from_url(valkey.url)

    async def main():
        await backend.start()
        try:
            for gap, tier, inp, out, firm_out, shadow in seq:
                clock.now += gap
                tier = min(tier, len(lim.prices) - 1)
                firm = inp + (out if firm_out else 0)
                want = ref.decide(lim, ref_state, clock.now, tier, inp, out, firm, shadow)
                got = await backend.decide(tenant, core_lim, tier, inp, out, firm, shadow)
                for name in FIELDS:
                    assert getattr(got, name) == getattr(want, name), (name, got, want)
                if lim.budget >= 0:
                    assert got.period_start_us == ref.period_bounds(clock.now, lim.period)[0]
                req_l, tok_l, spent = stored_state(r, backend, tenant)
                if lim.rpm > 0:
                    assert req_l == ref_state.req_level
                if lim.tpm > 0:
                    assert tok_l == ref_state.tok_level
                if lim.budget >= 0:
                    assert spent == ref_state.spent
            for i, (gap, d_tokens, d_cost, which) in enumerate(adjustments):
                clock.now += gap
                start = ref.period_bounds(clock.now, lim.period)[0]
                period_start = {"current": start, "previous": start - 1, "unknown": -1}[which]
                want = ref.settle(lim, ref_state, clock.now, d_tokens, d_cost, period_start)
                got = await backend.settle(tenant, core_lim, f"req-{i}", d_tokens, d_cost,
                                           period_start)
                assert got.applied and got.budget_spent == want
                again = await backend.settle(tenant, core_lim, f"req-{i}", d_tokens, d_cost,
                                             period_start)
                assert not again.applied  # idempotent per request id
                if lim.tpm > 0 and d_tokens != 0:
                    assert stored_state(r, backend, tenant)[1] == ref_state.tok_level
        finally:
            await backend.close()

    asyncio.run(main())
    r.close()


@settings(max_examples=60, deadline=None)
@given(limit_sets(), requests)
def test_decide_lua_matches_reference_model(valkey, lim, seq):
    run_sequence(valkey, lim, seq)


@settings(max_examples=40, deadline=None)
@given(limit_sets(), requests)
def test_decide_lua_matches_reference_model_on_budgets_and_tiers(valkey, lim, seq):
    lim.rpm = lim.tpm = 0
    lim.budget = abs(lim.budget) * 4
    if len(lim.prices) == 1:
        lim.prices = lim.prices + [(p // 10, q // 10) for p, q in lim.prices]
    run_sequence(valkey, lim, seq)


@settings(max_examples=40, deadline=None)
@given(limit_sets(), requests, settlements)
def test_settle_lua_matches_reference_model(valkey, lim, seq, adjustments):
    run_sequence(valkey, lim, seq, adjustments)


def run_batched(valkey, limits: list[ref.Limits], seq) -> None:
    """Every request of ``seq`` queued in one event-loop tick, over several tenants: they
    reach Redis as decide_batch.lua calls and must come out as the reference model's
    decisions applied in queue order."""
    times = []
    now = T0_US
    for gap, *_ in seq:
        now += gap
        times.append(now)
    clock = iter(times).__next__  # each decision takes its own time, in queue order
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    tenants = [f"lua-{next(_tenants)}" for _ in limits]
    states = [ref.State() for _ in limits]
    r = redis.Redis.from_url(valkey.url)

    async def main():
        await backend.start()
        try:
            calls, wants = [], []
            for i, (_, tier, inp, out, firm_out, shadow) in enumerate(seq):
                t = i % len(limits)
                lim = limits[t]
                tier = min(tier, len(lim.prices) - 1)
                firm = inp + (out if firm_out else 0)
                wants.append(ref.decide(lim, states[t], times[i], tier, inp, out, firm, shadow))
                calls.append(backend.decide(tenants[t], to_core(lim), tier, inp, out, firm,
                                            shadow))
            writes = backend.round_trips
            got = await asyncio.gather(*calls)
            # one script call per BATCH_MAX decisions: the batch path is what ran
            assert backend.round_trips - writes == -(-len(seq) // BATCH_MAX)
            for i, (g, w) in enumerate(zip(got, wants, strict=True)):
                for name in FIELDS:
                    assert getattr(g, name) == getattr(w, name), (i, name, g, w)
            for t, lim in enumerate(limits):
                req_l, tok_l, spent = stored_state(r, backend, tenants[t])
                if lim.rpm > 0:
                    assert req_l == states[t].req_level
                if lim.tpm > 0:
                    assert tok_l == states[t].tok_level
                if lim.budget >= 0:
                    assert spent == states[t].spent
        finally:
            await backend.close()

    asyncio.run(main())
    r.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(limit_sets(), min_size=1, max_size=3), requests)
def test_decide_batch_lua_matches_reference_model_in_queue_order(valkey, limits, seq):
    run_batched(valkey, limits, seq)


def test_more_than_one_batch_in_a_tick_keeps_the_order(valkey):
    lim = ref.Limits(rpm=100, tpm=0, burst=1.0, budget=-1, budget_in_usd=False, period=0,
                     low_water=0.0, prices=[(0, 0)])
    run_batched(valkey, [lim], [(1000, 0, 1, 1, False, False)] * (2 * BATCH_MAX + 5))


def test_keys_share_one_hash_tag_and_carry_ttls(valkey):
    clock = ManualClock()
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    lim = _core.Limits(rpm=60, tpm=6000, budget=100_000, period=_core.P_DAY)

    async def main():
        await backend.start()
        try:
            assert (await backend.decide("ttl", lim, 0, 10, 10, 20, False)).admitted
        finally:
            await backend.close()

    asyncio.run(main())
    r = redis.Redis.from_url(valkey.url)
    keys = backend.keys("ttl")
    assert all("{ttl}" in k for k in keys)
    assert len({r.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}) == 1
    # buckets: time until full again (+1 s); budget: end of the UTC day + 1 day, by the
    # scripts' clock (here the override, whatever its distance from the server's clock)
    assert 0 < r.pttl(keys[0]) <= 1000 + 1000
    assert 0 < r.pttl(keys[1]) <= 1000 + 200 + 1000
    day_end_ms = (clock.now // 86_400_000_000 + 1) * 86_400_000 + 86_400_000
    assert 0 <= (day_end_ms - clock.now // 1000) - r.pttl(keys[2]) < 5000
    r.close()


_MAXT = _core.MAX_TOKENS
_USD_AT_THE_BOUNDS = ref.Limits(budget=_core.MAX_BUDGET, budget_in_usd=True,
                                prices=[(_core.MAX_PRICE, _core.MAX_PRICE)])

# Boundaries random sequences rarely hit, replayed on the reference, the core and Lua.
BOUNDARY_CASES = {
    # the bounds of docs/contract.md: at them a request is counted exactly, beyond them
    # it is too large, and nothing wraps (a content-length of 2e16 once made a cost
    # negative in the core and a $50 budget show $5.9e9 remaining)
    "a count at MAX_TOKENS is counted": (ref.Limits(budget=2**40),
                                         [(0, 0, _MAXT, 0, True, False)]),
    "a count beyond MAX_TOKENS is too large": (ref.Limits(budget=2**40),
                                               [(0, 0, _MAXT + 1, 0, True, False),
                                                (0, 0, 0, _MAXT + 1, False, False)]),
    "a cost beyond MAX_COST is capped and too large": (
        _USD_AT_THE_BOUNDS, [(0, 0, _MAXT, _MAXT, True, False), (0, 0, 1, 0, True, False)]),
    "shadow mode saturates spend, never wraps it": (
        _USD_AT_THE_BOUNDS, [(0, 0, _MAXT, _MAXT, True, True)] * 3 + [(0, 0, 1, 0, True, False)]),
    "a deep debt caps retry-after and reset": (
        ref.Limits(rpm=1, tpm=1, budget=-1),
        [(0, 0, _MAXT, 0, True, True), (0, 0, 0, 1, True, False)]),
    "a budget at its bound is exact": (
        ref.Limits(budget=_core.MAX_BUDGET),
        [(0, 0, _MAXT, _MAXT, True, False), (0, 0, 0, 1, True, False)]),
    # spend exactly down to the low-water mark: not below it, so no downgrade yet
    "low water is strict": (ref.Limits(budget=1000, low_water=0.5, prices=[(0, 0), (0, 0)]),
                            [(0, 0, 0, 500, True, False), (0, 0, 0, 1, True, False),
                             (0, 0, 0, 1, True, False)]),
    # both buckets short by one second: the request bucket is named
    "equal waits name the request bucket": (ref.Limits(rpm=1, tpm=1),
                                            [(0, 0, 0, 1, True, False),
                                             (0, 0, 0, 1, True, False)]),
    # an estimate exactly the size of the bucket fits
    "estimate equal to the bucket fits": (ref.Limits(tpm=100), [(0, 0, 40, 60, True, False)]),
    # a cost exactly the whole budget fits, one more is too large
    "cost equal to the budget fits": (ref.Limits(budget=100), [(0, 0, 0, 100, True, False),
                                                               (0, 0, 0, 101, True, False)]),
}


@pytest.mark.parametrize("case", sorted(BOUNDARY_CASES))
def test_boundaries_agree_on_core_and_lua(valkey, case):
    lim, seq = BOUNDARY_CASES[case]
    core_lim, core_state, ref_state = to_core(lim), _core.State(), ref.State()
    now = T0_US
    for _gap, tier, inp, out, _firm_out, shadow in seq:  # every boundary case is firm
        want = ref.decide(lim, ref_state, now, tier, inp, out, inp + out, shadow)
        got = _core.decide(core_lim, core_state, now, tier, inp, out, inp + out, shadow)
        assert [getattr(got, f) for f in FIELDS] == [getattr(want, f) for f in FIELDS]
        # what no boundary may break, whatever the model says
        assert 0 <= got.charged_cost <= _core.MAX_COST and 0 <= core_state.spent <= _core.MAX_COST
        assert 0 <= got.budget_remaining <= max(lim.budget, 0)
        assert 0 <= got.retry_after_s <= _core.MAX_WAIT_US // 1_000_000
        assert 0 <= got.reset_tokens_us <= _core.MAX_WAIT_US
        if max(inp, out) > _core.MAX_TOKENS:
            assert (got.kind, got.reason) == (_core.TOO_LARGE, _core.R_SIZE)
    run_sequence(valkey, lim, seq)


SETTLE_BOUNDARY_CASES = {
    # deltas far beyond any usage report: clamped to +-MAX_COST, spend stays in
    # [0, MAX_COST], the token bucket's debt caps its waits
    "huge charges saturate": [(0, 2**62, 2**62, "current"), (0, 2**62 + 1, 2**62 + 1, "unknown"),
                              (1000, 1, 1, "previous")],
    "huge refunds stop at zero": [(0, -2**62, -2**62, "current"), (0, 5, 5, "current")],
    "a closed period takes charges, never refunds": [(0, 10, 10, "previous"),
                                                     (0, -10, -10, "previous")],
}


@pytest.mark.parametrize("case", sorted(SETTLE_BOUNDARY_CASES))
def test_settlement_boundaries_agree_on_core_and_lua(valkey, case):
    lim = ref.Limits(rpm=5, tpm=1000, budget=_core.MAX_BUDGET, period=ref.P_DAY)
    adjustments = SETTLE_BOUNDARY_CASES[case]
    seq = [(0, 0, 10, 10, True, False)]
    core_lim, core_state, ref_state = to_core(lim), _core.State(), ref.State()
    now = T0_US
    ref.decide(lim, ref_state, now, 0, 10, 10, 20)
    _core.decide(core_lim, core_state, now, 0, 10, 10, 20)
    for gap, d_tokens, d_cost, which in adjustments:
        now += gap
        start = ref.period_bounds(now, lim.period)[0]
        period_start = {"current": start, "previous": start - 1, "unknown": -1}[which]
        want = ref.settle(lim, ref_state, now, d_tokens, d_cost, period_start)
        assert _core.settle(core_lim, core_state, now, d_tokens, d_cost, period_start) == want
        assert 0 <= want <= _core.MAX_COST
        assert core_state.tok_level == ref_state.tok_level
        after = ref.decide(lim, ref.State(**vars(ref_state)), now, 0, 1, 0, 1)
        assert after.retry_after_s <= _core.MAX_WAIT_US // 1_000_000
    run_sequence(valkey, lim, seq, adjustments)
