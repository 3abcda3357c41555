"""Provider quotas on Redis: lua/routed.lua (one node: tenant and provider in one script),
lua/provider_take.lua and lua/provider_settle.lua against the reference model through a
real Valkey; the same invariants as the core (tests/core/test_provider_invariants.py); and the
two-step decision on a real 3-node Redis Cluster, where a tenant's keys and a provider's
live in different slots."""
from __future__ import annotations

import asyncio
import itertools

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import _core
from sidecar.backends.base import Candidate
from sidecar.backends.redis import RedisBackend
from sidecar.policy import schema
from tests.core import reference_model as ref
from tests.support.clock import ManualClock
from tests.core.test_core_reference import to_core
from tests.core.test_providers_core import (FIELDS, quotas, routed_requests, routed_setups,
                                       to_core_quota)

_names = itertools.count()


def stored_quota(r: redis.Redis, backend: RedisBackend, provider: str) -> tuple:
    rpm_key, tpm_key, rpd_key = backend.provider_keys(provider)

    def level(key: str) -> float:
        v = r.get(key)
        return float(v.split()[0]) if v is not None else float("inf")

    day = r.get(rpd_key)
    return level(rpm_key), level(tpm_key), tuple(int(x) for x in day.split()) if day else None


def same_stored(stored: tuple, q: ref.Quota, qs: ref.QuotaState) -> None:
    req, tok, day = stored
    if q.rpm > 0 and qs.req_level != float("inf"):
        assert req == qs.req_level
    if q.tpm > 0 and qs.tok_level != float("inf"):
        assert tok == qs.tok_level
    if q.rpd > 0 and qs.day_start >= 0:
        assert day == (qs.day_start, qs.day_count)


def run_routed(valkey, setup, seq, batched: bool = False) -> None:
    lim, cands = setup
    clock = ManualClock()
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    tenant = f"rt-{next(_names)}"
    ids = [f"p{next(_names)}" for _ in cands]
    core_lim, ref_state = to_core(lim), ref.State()
    ref_cands = [(t, q, ref.QuotaState()) for t, q in cands]
    candidates = [Candidate(t, pid, to_core_quota(q)) for (t, q), pid in zip(cands, ids,
                                                                               strict=True)]
    r = redis.Redis.from_url(valkey.url)

    async def main():
        await backend.start()
        try:
            if batched:  # every decision queued in one tick: routed_batch.lua, in order
                times, wants, calls = [], [], []
                for step in seq:
                    clock.now += step[0]
                    times.append(clock.now)
                tick = iter(times)
                backend.clock_override = lambda: next(tick)
                for (_gap, tier, inp, out, firm_out, prio, spill, shadow, _), now in zip(
                        seq, times, strict=True):
                    tier = min(tier, len(lim.prices) - 1)
                    firm = inp + (out if firm_out else 0)
                    wants.append(ref.decide_routed(lim, ref_state, now, tier, inp, out, firm,
                                                   shadow, prio, spill, ref_cands))
                    calls.append(backend.decide_routed(tenant, core_lim, tier, inp, out, firm,
                                                       shadow, prio, spill, candidates))
                got = await asyncio.gather(*calls)
                for i, (g, w) in enumerate(zip(got, wants, strict=True)):
                    for name in FIELDS:
                        assert getattr(g, name) == getattr(w, name), (i, name, g, w)
            else:
                for i, (gap, tier, inp, out, firm_out, prio, spill, shadow, settle) in enumerate(
                        seq):
                    clock.now += gap
                    tier = min(tier, len(lim.prices) - 1)
                    firm = inp + (out if firm_out else 0)
                    want = ref.decide_routed(lim, ref_state, clock.now, tier, inp, out, firm,
                                             shadow, prio, spill, ref_cands)
                    got = await backend.decide_routed(tenant, core_lim, tier, inp, out, firm,
                                                      shadow, prio, spill, candidates)
                    for name in FIELDS:
                        assert getattr(got, name) == getattr(want, name), (name, got, want)
                    if settle and got.provider >= 0:
                        c = candidates[got.provider]
                        _, rq, rqs = ref_cands[got.provider]
                        ref.quota_settle(rq, rqs, clock.now, settle)
                        assert await backend.settle_provider(c.provider, c.quota, f"r{i}",
                                                             settle)
                        assert not await backend.settle_provider(c.provider, c.quota, f"r{i}",
                                                                 settle)  # idempotent
            for pid, (_, q, qs) in zip(ids, ref_cands, strict=True):
                same_stored(stored_quota(r, backend, pid), q, qs)
            rpm_key, tpm_key, budget_key = backend.keys(tenant)
            if lim.budget >= 0 and ref_state.period_start >= 0:
                assert int(r.hget(budget_key, "s") or 0) == ref_state.spent
            if lim.rpm > 0 and r.get(rpm_key) is not None:
                assert float(r.get(rpm_key).split()[0]) == ref_state.req_level
            if lim.tpm > 0 and r.get(tpm_key) is not None:
                assert float(r.get(tpm_key).split()[0]) == ref_state.tok_level
        finally:
            await backend.close()

    asyncio.run(main())
    r.close()


@settings(max_examples=60, deadline=None)
@given(routed_setups(), routed_requests)
def test_routed_lua_matches_reference_model(valkey, setup, seq):
    run_routed(valkey, setup, seq)


@settings(max_examples=30, deadline=None)
@given(routed_setups(), routed_requests)
def test_routed_batch_lua_matches_reference_model_in_queue_order(valkey, setup, seq):
    run_routed(valkey, setup, seq, batched=True)


@settings(max_examples=40, deadline=None)
@given(quotas(), st.lists(st.tuples(st.integers(0, 30_000_000), st.integers(0, 2),
                                    st.integers(0, 3000), st.integers(-2, 0),
                                    st.integers(-500, 500)), min_size=1, max_size=30))
def test_provider_take_and_settle_lua_match_reference_model(valkey, q, seq):
    clock = ManualClock()
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    pid = f"p{next(_names)}"
    c = Candidate(0, pid, to_core_quota(q))
    qs = ref.QuotaState()
    r = redis.Redis.from_url(valkey.url)

    async def main():
        await backend.start()
        try:
            for i, (gap, prio, tokens, refund, delta) in enumerate(seq):
                clock.now += gap
                want = ref.quota_take(q, qs, clock.now, prio, tokens)
                got = await backend.routing.provider_take(c, prio, tokens)
                assert got[0] == want
                ref.quota_settle(q, qs, clock.now, delta, refund)
                assert await backend.settle_provider(pid, c.quota, f"s{i}", delta, refund)
                same_stored(stored_quota(r, backend, pid), q, qs)
        finally:
            await backend.close()

    asyncio.run(main())
    r.close()


def test_a_provider_refusal_leaves_the_tenants_keys_as_they_were(valkey):
    """The tenant's charge is given back inside the same script: budget spend and buckets
    read afterwards as if the request had never been decided (beyond refill bookkeeping)."""
    clock = ManualClock()
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    lim = _core.Limits(rpm=10, tpm=10_000, budget=5000, period=_core.P_DAY)
    full = Candidate(0, f"p{next(_names)}", _core.Quota(rpm=1))
    tenant = f"rt-{next(_names)}"

    async def main():
        await backend.start()
        try:
            first = await backend.decide_routed(tenant, lim, 0, 10, 10, 20, False, 1, 0, [full])
            refused = await backend.decide_routed(tenant, lim, 0, 10, 10, 20, False, 1, 0,
                                                  [full])
            return first, refused
        finally:
            await backend.close()

    first, refused = asyncio.run(main())
    assert first.admitted and first.provider == 0
    assert (refused.kind, refused.reason, refused.wait_us) == (_core.DENY_RATE,
                                                               _core.R_PROVIDER, 60_000_000)
    r = redis.Redis.from_url(valkey.url)
    rpm_key, tpm_key, budget_key = backend.keys(tenant)
    assert int(r.hget(budget_key, "s")) == 20  # the first request's cost only
    assert float(r.get(rpm_key).split()[0]) == 9.0
    assert float(r.get(tpm_key).split()[0]) == 9980.0
    r.close()


# --- Redis Cluster: the two-step decision -------------------------------------------------
def _slot(key: str) -> int:
    from redis.crc import key_slot

    return key_slot(key.encode())


def test_cluster_two_steps_never_over_admit_and_give_back_what_the_tenant_refused(valkey_cluster):
    backend = RedisBackend(schema.RedisBackend(url=valkey_cluster.url, cluster=True, timeout_ms=2000))
    q = _core.Quota(rpm=20, floors=(0.25, 0.25, 0.0))  # reserve {high: 0.25}: 5 kept
    prov = Candidate(0, f"cl{next(_names)}", q)
    tenants = [f"ct-{next(_names)}" for _ in range(3)]
    tight = _core.Limits(rpm=4)  # one tenant's own limit refuses most of its requests
    wide = _core.Limits(rpm=1000)

    async def main():
        await backend.start()
        try:
            # a tenant's keys and the provider's are in different slots: two steps
            assert _slot(backend.keys(tenants[0])[0]) != _slot(
                backend.provider_keys(prov.provider)[0])
            outs = []
            for i in range(30):  # three low tenants, one of them over its own limit
                t = tenants[i % 3]
                outs.append((t, await backend.decide_routed(
                    t, tight if t == tenants[0] else wide, 0, 1, 0, 1, False,
                    _core.PRIO_LOW, 0, [prov])))
            high = [await backend.decide_routed("ct-high", wide, 0, 1, 0, 1, False,
                                                _core.PRIO_HIGH, 0, [prov]) for _ in range(6)]
            return outs, high
        finally:
            await backend.close()

    outs, high = asyncio.run(main())
    low_admitted = sum(o.admitted for _, o in outs)
    own_refusals = [o for t, o in outs if t == tenants[0] and not o.admitted
                    and o.reason == _core.R_RPM]
    # the tight tenant's own refusals held provider capacity and gave it back: the low
    # flood still got exactly the 15 requests above the floor, the high tenant the 5 kept
    assert own_refusals and backend.provider_refunds["ok"] >= len(own_refusals)
    assert low_admitted == 15
    assert sum(o.admitted for o in high) == 5  # 20 in all: the provider's capacity
    assert all(o.provider == 0 for o in high if o.admitted)


def test_cluster_tier_guess_corrected_when_the_tenant_crosses_low_water(valkey_cluster):
    """The tenant is below its low-water mark on its first decision: the hold on the
    default tier's provider is given back and the compact tier's provider charged."""
    backend = RedisBackend(schema.RedisBackend(url=valkey_cluster.url, cluster=True, timeout_ms=2000))
    lim = _core.Limits(budget=100, period=_core.P_DAY, low_water=0.5, prices=((0, 0), (0, 0)))
    big, mini = Candidate(0, f"cb{next(_names)}", _core.Quota(rpm=50)), Candidate(
        1, f"cm{next(_names)}", _core.Quota(rpm=50))
    tenant = f"ct-{next(_names)}"

    async def main():
        await backend.start()
        try:
            a = await backend.decide_routed(tenant, lim, 0, 30, 30, 60, False, 1, 0, [big, mini])
            # fresh backend state: no guess yet, so the default tier's provider is held first
            backend.routing.below_low_water.clear()
            b = await backend.decide_routed(tenant, lim, 0, 5, 5, 10, False, 1, 0, [big, mini])
            c = await backend.decide_routed(tenant, lim, 0, 5, 5, 10, False, 1, 0, [big, mini])
            return a, b, c
        finally:
            await backend.close()

    a, b, c = asyncio.run(main())
    assert (a.tier, a.provider, a.kind) == (0, 0, _core.ALLOW)
    assert (b.tier, b.provider, b.kind) == (1, 1, _core.DOWNGRADE)
    assert (c.tier, c.provider) == (1, 1)  # guessed right this time: no hold to give back
    assert backend.provider_refunds == {"ok": 1, "failed": 0}
