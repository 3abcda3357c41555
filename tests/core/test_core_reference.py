"""The Cython core (sidecar._core) against the reference model, step by step."""
from __future__ import annotations

import calendar

from hypothesis import given
from hypothesis import strategies as st

from sidecar import _core
from tests.core import reference_model as ref

T0 = calendar.timegm((2026, 11, 22, 13, 0, 0)) * 1_000_000


@st.composite
def limit_sets(draw):
    ntiers = draw(st.integers(1, 3))
    # nano-USD per token, best (dearest) tier first
    prices = sorted(((draw(st.integers(0, 5_000)), draw(st.integers(0, 10_000)))
                     for _ in range(ntiers)), reverse=True)
    in_usd = draw(st.booleans())
    # budgets sized so that a few requests cross low water: tokens, or nano-USD
    budget = draw(st.one_of(st.just(-1), st.integers(0, 60_000_000 if in_usd else 30_000)))
    return ref.Limits(
        rpm=draw(st.sampled_from([0, 1, 3, 7, 60, 100, 600])),
        tpm=draw(st.sampled_from([0, 10, 500, 1000, 20_000, 200_000])),
        burst=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        budget=budget,
        budget_in_usd=in_usd,
        period=draw(st.integers(0, 5)),
        low_water=draw(st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9])),
        prices=prices,
    )


def to_core(lim: ref.Limits) -> _core.Limits:
    out = _core.Limits(rpm=lim.rpm, tpm=lim.tpm, burst=lim.burst, budget=lim.budget,
                       budget_in_usd=lim.budget_in_usd, period=lim.period,
                       low_water=lim.low_water, prices=tuple(lim.prices))
    if lim.period == ref.P_WINDOW:
        out.set_window(lim.win_start, lim.win_end, lim.win_next)
    return out


requests = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 2_000_000), st.integers(0, 90_000_000),
                  st.integers(0, 40 * 86_400_000_000)),  # µs since the previous request
        st.integers(0, 2),  # tier asked for
        st.integers(0, 3000),  # input tokens
        st.integers(0, 3000),  # output tokens
        st.booleans(),  # output is firm (explicit max_tokens)
        st.booleans(),  # shadow mode
    ),
    min_size=1, max_size=40)


@given(limit_sets(), requests)
def test_core_matches_reference_model(lim, seq):
    run_both(lim, seq)


@given(limit_sets(), requests)
def test_core_matches_reference_model_on_budgets_and_tiers(lim, seq):
    # the same, with buckets off and several tiers, so downgrades are common
    lim.rpm = lim.tpm = 0
    lim.budget = abs(lim.budget) * 4
    if len(lim.prices) == 1:
        lim.prices = lim.prices + [(p // 10, q // 10) for p, q in lim.prices]
    kinds = run_both(lim, seq)
    assert kinds <= {ref.ALLOW, ref.DOWNGRADE, ref.DENY_BUDGET, ref.TOO_LARGE}


def run_both(lim: ref.Limits, seq) -> set[int]:
    kinds = set()
    core_lim = to_core(lim)
    core_state, ref_state = _core.State(), ref.State()
    now = T0
    for gap, tier, inp, out, firm_out, shadow in seq:
        now += gap
        tier = min(tier, len(lim.prices) - 1)
        firm = inp + (out if firm_out else 0)
        want = ref.decide(lim, ref_state, now, tier, inp, out, firm, shadow)
        got = _core.decide(core_lim, core_state, now, tier, inp, out, firm, shadow)
        for name in ("kind", "reason", "tier", "retry_after_s", "remaining_requests",
                     "remaining_tokens", "budget_remaining", "charged_tokens", "charged_cost",
                     "reset_requests_us", "reset_tokens_us", "budget_reset_us"):
            assert getattr(got, name) == getattr(want, name), (name, got, want)
        assert core_state.spent == ref_state.spent
        assert core_state.req_level == ref_state.req_level
        assert core_state.tok_level == ref_state.tok_level
        if lim.budget >= 0:
            assert got.period_start_us == ref.period_bounds(now, lim.period)[0]
        kinds.add(want.kind)
    return kinds


OUTCOME_FIELDS = ("kind", "reason", "tier", "retry_after_s", "limit_requests",
                  "remaining_requests", "reset_requests_us", "limit_tokens", "remaining_tokens",
                  "reset_tokens_us", "budget_limit", "budget_remaining", "budget_reset_us",
                  "charged_tokens", "charged_cost", "period_start_us")


@given(limit_sets(), requests)
def test_a_state_at_rest_decides_as_a_fresh_one(lim, seq):
    """What lets the embedded backend drop a tenant's state: whenever at_rest() says so,
    the state and a fresh State() give the same outcome and end in the same state."""
    core_lim, state = to_core(lim), _core.State()
    now = T0
    for gap, tier, inp, out, firm_out, shadow in seq:
        now += gap
        tier = min(tier, len(lim.prices) - 1)
        firm = inp + (out if firm_out else 0)
        if _core.at_rest(core_lim, state, now):
            fresh = _core.State()
            a = _core.decide(core_lim, state, now, tier, inp, out, firm, shadow)
            b = _core.decide(core_lim, fresh, now, tier, inp, out, firm, shadow)
            for name in OUTCOME_FIELDS:
                assert getattr(a, name) == getattr(b, name), (name, a, b)
            for name in ("req_level", "tok_level", "spent"):
                assert getattr(state, name) == getattr(fresh, name), name
        else:
            _core.decide(core_lim, state, now, tier, inp, out, firm, shadow)


def test_at_rest_waits_for_full_buckets_and_for_the_period_that_holds_spend():
    lim = ref.Limits(rpm=60, tpm=6000, budget=1000, period=ref.P_DAY, prices=[(0, 0)])
    core_lim, state = to_core(lim), _core.State()
    assert _core.at_rest(core_lim, state, T0)
    _core.decide(core_lim, state, T0, 0, 100, 0, 100, False)
    assert not _core.at_rest(core_lim, state, T0 + 500_000)  # buckets refilling
    # buckets full after a second (60/min refills 1 request and 100 tokens per second),
    # but 100 tokens are spent today
    assert not _core.at_rest(core_lim, state, T0 + 1_000_000)
    start, end = _core.period_bounds(T0, ref.P_DAY)
    assert _core.at_rest(core_lim, state, end)  # a new day: the spend belongs to the past


settlements = st.lists(
    st.tuples(st.integers(0, 90_000_000), st.integers(-5000, 5000), st.integers(-5000, 5000),
              st.sampled_from(["current", "previous", "unknown"])),
    min_size=1, max_size=20)


@given(limit_sets(), requests, settlements)
def test_settle_matches_reference_model(lim, seq, adjustments):
    run_both(lim, seq)  # some state to settle against
    core_lim, core_state, ref_state = to_core(lim), _core.State(), ref.State()
    now = T0
    for gap, tier, inp, out, firm_out, shadow in seq:
        now += gap
        tier = min(tier, len(lim.prices) - 1)
        firm = inp + (out if firm_out else 0)
        ref.decide(lim, ref_state, now, tier, inp, out, firm, shadow)
        _core.decide(core_lim, core_state, now, tier, inp, out, firm, shadow)
    for gap, d_tokens, d_cost, which in adjustments:
        now += gap
        start = ref.period_bounds(now, lim.period)[0]
        period_start = {"current": start, "previous": start - 1, "unknown": -1}[which]
        want = ref.settle(lim, ref_state, now, d_tokens, d_cost, period_start)
        got = _core.settle(core_lim, core_state, now, d_tokens, d_cost, period_start)
        assert got == want
        assert core_state.spent == ref_state.spent
        assert core_state.tok_level == ref_state.tok_level


@given(st.integers(0, 4_000_000_000 * 1_000_000), st.integers(0, 5))
def test_period_bounds_match_reference(now, period):
    assert _core.period_bounds(now, period) == ref.period_bounds(now, period)


def test_a_denied_request_holds_nothing():
    lim = _core.Limits(rpm=2, tpm=1000, budget=10_000, period=_core.P_DAY)
    st_ = _core.State()
    assert _core.decide(lim, st_, T0, 0, 100, 100, 200).admitted
    assert _core.decide(lim, st_, T0, 0, 100, 100, 200).admitted
    spent = st_.spent
    denied = _core.decide(lim, st_, T0, 0, 100, 100, 200)
    assert denied.kind == _core.DENY_RATE and denied.reason == _core.R_RPM
    assert denied.charged_tokens == 0 and st_.spent == spent
    assert st_.tok_level == 600.0


def test_retry_after_comes_from_the_bucket_that_refused():
    # rpm 60: one request a second; tpm 6000: 100 tokens a second
    lim = _core.Limits(rpm=60, tpm=6000)
    s = _core.State()
    assert _core.decide(lim, s, T0, 0, 0, 6000, 6000).admitted  # empties the token bucket
    out = _core.decide(lim, s, T0, 0, 0, 3000, 3000)
    assert (out.kind, out.reason, out.retry_after_s) == (_core.DENY_RATE, _core.R_TPM, 30)
    lim = _core.Limits(rpm=6, tpm=1_000_000)
    s = _core.State()
    for _ in range(6):
        assert _core.decide(lim, s, T0, 0, 0, 10, 10).admitted
    out = _core.decide(lim, s, T0, 0, 0, 10, 10)
    assert (out.kind, out.reason, out.retry_after_s) == (_core.DENY_RATE, _core.R_RPM, 10)


def test_a_default_estimate_is_trimmed_but_a_firm_one_is_too_large():
    lim = _core.Limits(tpm=100)
    s = _core.State()
    soft = _core.decide(lim, s, T0, 0, 20, 1024, 20)  # default output guess
    assert soft.admitted and soft.charged_tokens == 100
    firm = _core.decide(lim, _core.State(), T0, 0, 20, 1024, 1044)
    assert (firm.kind, firm.reason, firm.retry_after_s) == (_core.TOO_LARGE, _core.R_TPM, 0)


def test_downgrade_below_low_water_is_priced_at_the_lower_tier():
    # 1 USD budget; tier 0 costs 1000 nano-USD/token, tier 1 costs 10
    lim = _core.Limits(budget=1_000_000_000, budget_in_usd=True, period=_core.P_MONTH,
                       low_water=0.2, prices=((1000, 1000), (10, 10)))
    s = _core.State()
    first = _core.decide(lim, s, T0, 0, 400_001, 400_000, 800_001)  # leaves just under 20%
    assert first.kind == _core.ALLOW and first.charged_cost == 800_001_000
    second = _core.decide(lim, s, T0, 0, 1000, 1000, 2000)
    assert second.kind == _core.DOWNGRADE and second.tier == 1 and second.charged_cost == 20_000


def test_budget_rolls_over_at_the_utc_month_boundary():
    lim = _core.Limits(budget=100, period=_core.P_MONTH)
    s = _core.State()
    end_of_nov = calendar.timegm((2026, 11, 30, 23, 59, 59)) * 1_000_000
    assert _core.decide(lim, s, end_of_nov, 0, 0, 100, 100).admitted
    out = _core.decide(lim, s, end_of_nov, 0, 0, 1, 1)
    assert out.kind == _core.DENY_BUDGET and out.retry_after_s == 1
    assert _core.decide(lim, s, end_of_nov + 1_000_000, 0, 0, 100, 100).admitted


def test_a_clock_before_1970_is_refused_so_no_period_start_is_negative():
    # State.period_start -1 means "no period yet" and settle's period_start < 0 means "not
    # known": both rely on every real period start being >= 0
    lim = _core.Limits(budget=100, period=_core.P_MINUTE)
    import pytest

    with pytest.raises(ValueError, match="now_us"):
        _core.decide(lim, _core.State(), -1, 0, 1, 1, 2)
    with pytest.raises(ValueError, match="now_us"):
        _core.settle(lim, _core.State(), -60_000_001, 1, 1, -1)
    assert _core.decide(lim, _core.State(), 0, 0, 1, 1, 2).period_start_us == 0


def test_a_week_runs_from_monday_to_monday_utc():
    # 2026-11-22 is a Sunday: its week began on Monday 2026-11-16 and ends on the 23rd
    start, end = _core.period_bounds(T0, _core.P_WEEK)
    assert start == calendar.timegm((2026, 11, 16, 0, 0, 0)) * 1_000_000
    assert end == calendar.timegm((2026, 11, 23, 0, 0, 0)) * 1_000_000
    assert _core.period_bounds(end, _core.P_WEEK)[0] == end
    lim = _core.Limits(budget=100, period=_core.P_WEEK)
    s = _core.State()
    assert _core.decide(lim, s, end - 1, 0, 0, 100, 100).admitted
    assert _core.decide(lim, s, end - 1, 0, 0, 1, 1).retry_after_s == 1
    assert _core.decide(lim, s, end, 0, 0, 100, 100).admitted
