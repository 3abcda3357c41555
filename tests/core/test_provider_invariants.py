"""Consequences any correct provider quota must have, checked on the Cython core and on the
reference model itself (a model written by the same hands can carry the same bug), over
random histories of routed decisions, settlements, refunds and clock advances:

- what a provider admits over any interval never exceeds its capacity plus its refill over
  that interval, plus what was given back within it (refunds, smaller actual usage);
- a normal or low request never takes a bucket below the floor kept for higher priorities;
- a high-priority tenant asking for no more than its reserved share is never refused by
  the provider, whatever the low-priority flood beside it;
- a routed decision charges the tenant and exactly one provider, or neither.
The Redis half (the same invariants on lua/routed.lua through a real Valkey) is in
tests/core/test_providers_redis.py."""
from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar import _core
from tests.core import reference_model as ref
from tests.core.test_core_reference import T0

EPS = 1e-6


def snapshot(qs) -> tuple:
    # a charge always moves `last` (a bucket refilled to the same level can read alike)
    return (qs.req_level, qs.req_last, qs.tok_level, qs.tok_last, qs.day_start, qs.day_count)


def admitted(o) -> bool:
    return o.kind in (ref.ALLOW, ref.DOWNGRADE)


class Impl:
    """The core or the reference model behind one interface."""

    def __init__(self, mod: Any) -> None:
        self.mod = mod

    def quota(self, **kw) -> Any:
        if self.mod is _core:
            return _core.Quota(**kw)
        return ref.Quota(**kw)

    def routed(self, lim, state, now, tier, inp, out, prio, spill, cands, shadow=False):
        return self.mod.decide_routed(lim, state, now, tier, inp, out, inp + out, shadow, prio,
                                      spill, cands)


IMPLS = {"core": Impl(_core), "reference": Impl(ref)}


def tenant_limits(impl: Impl, **kw):
    return _core.Limits(**kw) if impl.mod is _core else ref.Limits(**kw)


history = st.lists(
    st.tuples(
        st.integers(0, 3_000_000),  # µs since the previous step
        st.integers(0, 2),  # priority
        st.integers(1, 400),  # tokens
        st.sampled_from(["decide", "decide", "decide", "settle", "refund"]),
        st.integers(-300, 300),  # settlement delta (actual - charged)
    ),
    min_size=1, max_size=120)


def check_capacity(events: list[tuple[int, float, float, bool]], cap: float, rate: float) -> None:
    """events: (time, taken, given back) in time order; taken is an admitted request's
    charge (a decision) or a settlement's extra usage (actual above the estimate), given
    back a refund or a settlement below the estimate. Over every interval [i, j] that ends
    with an admission: taken ≤ cap + rate × (t_j - t_i) + given back. (Extra usage settled
    after the interval's last admission is the in-flight overshoot docs/usage.md bounds:
    the bucket goes into debt, and later admissions wait for it.)"""
    n = len(events)
    for i in range(n):
        taken = back = 0.0
        for j in range(i, n):
            taken += events[j][1]
            back += events[j][2]
            if events[j][3]:
                assert taken <= cap + rate * (events[j][0] - events[i][0]) + back + EPS, (
                    i, j, taken, back)


@given(st.sampled_from(sorted(IMPLS)), st.sampled_from([3, 10, 60]),
       st.sampled_from([500, 5000]), st.sampled_from([1.0, 0.5]),
       st.sampled_from([0.0, 0.2, 0.5]), history)
def test_a_provider_never_admits_more_than_its_capacity_over_any_interval(
        name, rpm, tpm, burst, high_share, steps):
    impl = IMPLS[name]
    q = impl.quota(rpm=rpm, tpm=tpm, burst=burst, floors=(high_share, high_share, 0.0))
    qs = impl.mod.QuotaState()
    now = T0
    req_events: list[tuple[int, float, float, bool]] = []
    tok_events: list[tuple[int, float, float, bool]] = []
    open_charges: list[int] = []  # tokens of admitted requests not yet settled or refunded
    for gap, prio, tokens, action, delta in steps:
        now += gap
        if action == "decide":
            o = impl.routed(tenant_limits(impl), impl.mod.State(), now, 0, tokens, 0, prio, 0,
                            [(0, q, qs)])
            if admitted(o):
                req_events.append((now, 1.0, 0.0, True))
                tok_events.append((now, float(o.charged_tokens), 0.0, True))
                open_charges.append(o.charged_tokens)
                # never below the floor of its priority
                f = q.floors[prio]
                assert qs.req_level >= f * q.req_cap - EPS
                assert qs.tok_level >= f * q.tok_cap - EPS
        elif open_charges:
            charged = open_charges.pop(0)
            if action == "settle":
                d = max(delta, -charged)
                impl.mod.quota_settle(q, qs, now, d)
                tok_events.append((now, max(d, 0), max(-d, 0), False))
            else:  # refund: the whole request given back (a cluster's failed second step)
                impl.mod.quota_settle(q, qs, now, -charged, -1)
                req_events.append((now, 0.0, 1.0, False))
                tok_events.append((now, 0.0, float(charged), False))
    check_capacity(req_events, q.req_cap, rpm / 60e6)
    check_capacity(tok_events, q.tok_cap, tpm / 60e6)


@given(st.sampled_from(sorted(IMPLS)), st.sampled_from([10, 60, 600]),
       st.sampled_from([0.1, 0.2, 0.5]), st.sampled_from([1.0, 0.5]),
       st.integers(1, 8), st.integers(0, 10**6))
def test_high_priority_within_its_reserved_share_is_never_refused_by_a_low_flood(
        name, rpm, high_share, burst, flood_per_gap, jitter):
    impl = IMPLS[name]
    q = impl.quota(rpm=rpm, burst=burst, floors=(high_share, high_share, 0.0))
    qs = impl.mod.QuotaState()
    if math.floor(high_share * q.req_cap) < 1:
        return  # a share below one request keeps nothing for anyone
    # high asks for its reserved share of the refill: high_share × rpm per minute, evenly
    gap_us = math.ceil(60e6 / (high_share * rpm))
    now = T0 + jitter
    high_ok = low_ok = 0
    for _ in range(60):
        for i in range(flood_per_gap):  # a low flood between any two high requests
            o = impl.routed(tenant_limits(impl), impl.mod.State(), now + i * gap_us // (
                flood_per_gap + 1), 0, 1, 0, _core.PRIO_LOW, 0, [(0, q, qs)])
            low_ok += admitted(o)
        now += gap_us
        o = impl.routed(tenant_limits(impl), impl.mod.State(), now, 0, 1, 0, _core.PRIO_HIGH, 0,
                        [(0, q, qs)])
        assert admitted(o), (o, qs.req_level)
        high_ok += 1
    assert low_ok > 0  # the flood did get the rest


@given(st.sampled_from(sorted(IMPLS)),
       st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(0, 1), st.integers(0, 2),
                          st.integers(1, 300), st.integers(0, 1), st.booleans()),
                min_size=1, max_size=60),
       st.sampled_from([2, 5, 30]), st.sampled_from([0, 200, 2000]))
def test_tenant_and_provider_are_charged_together_or_not_at_all(name, steps, prpm, budget):
    impl = IMPLS[name]
    lim = tenant_limits(impl, rpm=8, tpm=3000, budget=budget, period=_core.P_DAY,
                        prices=((0, 0), (0, 0)))
    tenant = impl.mod.State()
    cands = [(0, impl.quota(rpm=prpm, floors=(0.3, 0.3, 0.0)), impl.mod.QuotaState()),
             (0, impl.quota(rpm=prpm, tpm=2000), impl.mod.QuotaState()),
             (1, impl.quota(rpm=prpm), impl.mod.QuotaState())]
    now = T0
    for gap, tier, prio, tokens, spill, shadow in steps:
        now += gap
        before = [snapshot(qs) for _, _, qs in cands]
        spent = tenant.spent
        o = impl.routed(lim, tenant, now, tier, tokens, 0, prio, spill, cands, shadow)
        after = [snapshot(qs) for _, _, qs in cands]
        changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
        goes_on = admitted(o) or shadow
        if o.provider >= 0:
            assert goes_on and changed == [o.provider]
            assert tenant.spent == spent + o.charged_cost
            assert o.charged_tokens > 0
        else:
            assert changed == [] and tenant.spent == spent
            assert not admitted(o)
