"""Provider quotas in the Cython core against the reference model, step by step:
decide_routed (tenant and provider charged together, spill-over, reservation), the
cluster's single-provider step (quota_take) and settlements (quota_settle)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar import _core
from tests.core import reference_model as ref
from tests.core.test_core_reference import T0, limit_sets, to_core

FIELDS = ("kind", "reason", "tier", "retry_after_s", "remaining_requests", "remaining_tokens",
          "budget_remaining", "charged_tokens", "charged_cost", "wait_us", "provider",
          "provider_remaining_requests", "provider_remaining_tokens")


@st.composite
def quotas(draw):
    high = draw(st.sampled_from([0.0, 0.1, 0.2, 0.5]))
    normal = draw(st.sampled_from([0.0, 0.1, 0.25]))
    # floors: low keeps what is reserved for normal and high, normal what is kept for high
    return ref.Quota(
        rpm=draw(st.sampled_from([0, 2, 5, 30, 600])),
        tpm=draw(st.sampled_from([0, 300, 2000, 50_000])),
        rpd=draw(st.sampled_from([0, 0, 3, 40])),
        burst=draw(st.sampled_from([1.0, 1.0, 0.5, 0.1])),
        floors=(normal + high, high, 0.0))


@st.composite
def routed_setups(draw):
    lim = draw(limit_sets())
    ntiers = len(lim.prices)
    cands = []
    for t in range(ntiers):
        for _ in range(draw(st.integers(1, 2))):
            cands.append((t, draw(quotas())))
    order = draw(st.permutations(list(range(len(cands)))))
    return lim, [cands[i] for i in order]


routed_requests = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 2_000_000), st.integers(0, 90_000_000),
                  st.integers(0, 3 * 86_400_000_000)),  # µs since the previous step
        st.integers(0, 2),  # tier asked for
        st.integers(0, 1500),  # input tokens
        st.integers(0, 1500),  # output tokens
        st.booleans(),  # output is firm
        st.integers(0, 2),  # priority
        st.integers(0, 2),  # spill
        st.sampled_from([False, False, False, True]),  # shadow
        st.integers(-800, 800),  # then settle this token difference (0: none)
    ),
    min_size=1, max_size=40)


def to_core_quota(q: ref.Quota) -> _core.Quota:
    return _core.Quota(rpm=q.rpm, tpm=q.tpm, rpd=q.rpd, burst=q.burst, floors=q.floors)


def same_quota_state(a: _core.QuotaState, b: ref.QuotaState) -> None:
    assert (a.req_level, a.req_last, a.tok_level, a.tok_last, a.day_start, a.day_count) == (
        b.req_level, b.req_last, b.tok_level, b.tok_last, b.day_start, b.day_count)


@given(routed_setups(), routed_requests)
def test_decide_routed_matches_reference_model(setup, seq):
    lim, cands = setup
    core_lim, core_state, ref_state = to_core(lim), _core.State(), ref.State()
    ref_cands = [(t, q, ref.QuotaState()) for t, q in cands]
    core_cands = [(t, to_core_quota(q), _core.QuotaState()) for t, q in cands]
    now = T0
    for gap, tier, inp, out, firm_out, prio, spill, shadow, settle in seq:
        now += gap
        tier = min(tier, len(lim.prices) - 1)
        firm = inp + (out if firm_out else 0)
        want = ref.decide_routed(lim, ref_state, now, tier, inp, out, firm, shadow, prio, spill,
                                 ref_cands)
        got = _core.decide_routed(core_lim, core_state, now, tier, inp, out, firm, shadow, prio,
                                  spill, core_cands)
        for name in FIELDS:
            assert getattr(got, name) == getattr(want, name), (name, got, want)
        assert (core_state.spent, core_state.req_level, core_state.tok_level) == (
            ref_state.spent, ref_state.req_level, ref_state.tok_level)
        for (_, _, a), (_, _, b) in zip(core_cands, ref_cands, strict=True):
            same_quota_state(a, b)
        if settle and got.provider >= 0:
            _, q, qs = core_cands[got.provider]
            _, rq, rqs = ref_cands[got.provider]
            _core.quota_settle(q, qs, now, settle)
            ref.quota_settle(rq, rqs, now, settle)
            same_quota_state(qs, rqs)


@given(quotas(), st.lists(st.tuples(st.integers(0, 30_000_000), st.integers(0, 2),
                                    st.integers(0, 3000), st.integers(-2, 0),
                                    st.integers(-500, 500)), min_size=1, max_size=40))
def test_quota_take_and_settle_match_reference_model(q, seq):
    core_q, core_qs, ref_qs = to_core_quota(q), _core.QuotaState(), ref.QuotaState()
    now = T0
    for gap, prio, tokens, refund_requests, delta in seq:
        now += gap
        assert _core.quota_take(core_q, core_qs, now, prio, tokens) == ref.quota_take(
            q, ref_qs, now, prio, tokens)
        same_quota_state(core_qs, ref_qs)
        _core.quota_settle(core_q, core_qs, now, delta, refund_requests)
        ref.quota_settle(q, ref_qs, now, delta, refund_requests)
        same_quota_state(core_qs, ref_qs)


# --- examples that say what the rules mean, with numbers ---------------------------------
def _routed(quota: _core.Quota, prio: int, n: int, now: int, qs=None, tokens: int = 10):
    lim, st_ = _core.Limits(), _core.State()
    qs = qs or _core.QuotaState()
    outs = [_core.decide_routed(lim, st_, now, 0, tokens, 0, tokens, False, prio, 0,
                                [(0, quota, qs)]) for _ in range(n)]
    return outs, qs


def test_a_reservation_is_a_floor_for_the_others_never_a_cap_on_anyone():
    q = _core.Quota(rpm=100, floors=(0.2, 0.2, 0.0))  # reserve: {high: 0.2}
    low, _ = _routed(q, _core.PRIO_LOW, 100, T0)
    assert sum(o.admitted for o in low) == 80  # low alone: 80%, not 20% (LiteLLM #18953)
    high, _ = _routed(q, _core.PRIO_HIGH, 101, T0)
    assert sum(o.admitted for o in high) == 100  # high alone: all of it
    # after the low flood the last 20 are still there for high
    _, qs = _routed(q, _core.PRIO_LOW, 100, T0)
    more, _ = _routed(q, _core.PRIO_HIGH, 25, T0, qs)
    assert sum(o.admitted for o in more) == 20


def test_a_provider_refusal_charges_the_tenant_nothing_and_names_the_soonest_room():
    lim = _core.Limits(rpm=10, tpm=10_000, budget=1000, period=_core.P_DAY)
    tenant = _core.State()
    a, b = _core.Quota(rpm=60), _core.Quota(rpm=30)
    qa, qb = _core.QuotaState(), _core.QuotaState()
    for _ in range(60):
        assert _core.decide_routed(_core.Limits(), _core.State(), T0, 0, 1, 0, 1, False, 1, 0,
                                   [(0, a, qa)]).admitted
    for _ in range(30):
        assert _core.decide_routed(_core.Limits(), _core.State(), T0, 0, 1, 0, 1, False, 1, 0,
                                   [(0, b, qb)]).admitted
    o = _core.decide_routed(lim, tenant, T0 + 500_000, 0, 5, 5, 10, False, 1, 0,
                            [(0, a, qa), (0, b, qb)])
    assert (o.kind, o.reason, o.provider) == (_core.DENY_RATE, _core.R_PROVIDER, -1)
    assert o.wait_us == 500_000  # a refills one request a second: half a second to go
    assert o.retry_after_s == 1
    assert (o.limit_requests, o.budget_limit, o.charged_tokens) == (0, -1, 0)
    assert tenant.spent == 0 and tenant.req_level == 10.0 and tenant.tok_level == 10_000.0


def test_spill_goes_to_the_next_provider_then_one_tier_down_priced_there():
    lim = _core.Limits(budget=10**9, budget_in_usd=True, period=_core.P_MONTH,
                       prices=((10, 20), (1, 2)))
    tenant = _core.State()
    east, west, mini = (_core.Quota(rpm=2), _core.Quota(rpm=1), _core.Quota(rpm=100))
    cands = [(0, east, _core.QuotaState()), (0, west, _core.QuotaState()),
             (1, mini, _core.QuotaState())]
    outs = [_core.decide_routed(lim, tenant, T0, 0, 100, 50, 150, False, 1, 1, cands)
            for _ in range(5)]
    assert [o.provider for o in outs] == [0, 0, 1, 2, 2]
    assert [o.kind for o in outs] == [_core.ALLOW] * 3 + [_core.DOWNGRADE] * 2
    assert outs[3].reason == _core.R_PROVIDER and outs[3].tier == 1
    assert [o.charged_cost for o in outs] == [2000] * 3 + [200] * 2  # priced at the tier
    assert tenant.spent == 3 * 2000 + 2 * 200
    # without spill, the same request is refused and charged nothing
    o = _core.decide_routed(lim, tenant, T0, 0, 100, 50, 150, False, 1, 0, cands)
    assert (o.kind, o.reason) == (_core.DENY_RATE, _core.R_PROVIDER)
    assert tenant.spent == 3 * 2000 + 2 * 200


def test_a_request_no_provider_can_ever_take_is_too_large():
    q = _core.Quota(tpm=1000, floors=(0.5, 0.5, 0.0))
    o, _ = _routed(q, _core.PRIO_LOW, 1, T0, tokens=600)  # low may take 500 at most
    assert (o[0].kind, o[0].reason) == (_core.TOO_LARGE, _core.R_PROVIDER)
    o, _ = _routed(q, _core.PRIO_HIGH, 1, T0, tokens=600)
    assert o[0].kind == _core.ALLOW


def test_requests_per_day_wait_for_the_utc_day_to_end():
    q = _core.Quota(rpd=2)
    outs, qs = _routed(q, _core.PRIO_NORMAL, 3, T0)
    assert [o.admitted for o in outs] == [True, True, False]
    start, end = _core.period_bounds(T0, _core.P_DAY)
    assert outs[2].wait_us == end - T0
    again, _ = _routed(q, _core.PRIO_NORMAL, 1, end, qs)
    assert again[0].admitted
