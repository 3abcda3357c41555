"""Decisions over a path of cells (a holder and its parents, several windows, a model's
cell): the Cython core's decide_path/settle_path against the reference model, field by
field and state by state, and the rules a path adds, each shown on a small case."""
from __future__ import annotations

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar import _core
from tests.core import reference_model as ref
from tests.core.test_core_reference import T0, requests, to_core

PATH_FIELDS = ("kind", "reason", "tier", "retry_after_s", "remaining_requests",
               "remaining_tokens", "budget_remaining", "charged_tokens", "charged_cost",
               "reset_requests_us", "reset_tokens_us", "budget_reset_us", "wait_us", "cell")


@st.composite
def paths(draw, min_cells=1, max_cells=5):
    """Cells that share one tier list (one request's prices), each its own unit, period,
    limits and low water: budgets small enough that a few requests cross them."""
    ntiers = draw(st.integers(1, 3))
    prices = sorted(((draw(st.integers(0, 5_000)), draw(st.integers(0, 10_000)))
                     for _ in range(ntiers)), reverse=True)
    cells = []
    for _ in range(draw(st.integers(min_cells, max_cells))):
        in_usd = draw(st.booleans())
        cells.append(ref.Limits(
            rpm=draw(st.sampled_from([0, 0, 1, 3, 60, 600])),
            tpm=draw(st.sampled_from([0, 0, 500, 1000, 20_000])),
            burst=draw(st.sampled_from([1.0, 1.5, 2.0])),
            budget=draw(st.one_of(st.just(-1),
                                  st.integers(0, 60_000_000 if in_usd else 30_000))),
            budget_in_usd=in_usd,
            period=draw(st.integers(0, 6)),
            low_water=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])),
            prices=list(prices)))
        if cells[-1].period == ref.P_WINDOW:
            # a calendar window (a time zone, an anchor) around the sequence's start
            hour = 3_600_000_000
            cells[-1].win_start = T0 - draw(st.integers(0, 48)) * hour
            cells[-1].win_end = T0 + draw(st.integers(1, 72)) * hour
            cells[-1].win_next = cells[-1].win_end + draw(st.integers(1, 200)) * hour
    return cells


def both(cells: list[ref.Limits]):
    model = [(lim, ref.State()) for lim in cells]
    core = [(to_core(lim), _core.State()) for lim in cells]
    return model, core


def same_states(model, core) -> None:
    for (_, a), (_, b) in zip(model, core, strict=True):
        assert (b.spent, b.period_start, b.req_level, b.tok_level) == (
            a.spent, a.period_start, a.req_level, a.tok_level)


@given(paths(), requests)
def test_core_path_matches_reference_model(cells, seq):
    model, core = both(cells)
    now = T0
    for gap, tier, inp, out, firm_out, shadow in seq:
        now += gap
        tier = min(tier, len(cells[0].prices) - 1)
        firm = inp + (out if firm_out else 0)
        want = ref.decide_path(model, now, tier, inp, out, firm, shadow)
        got = _core.decide_path(core, now, tier, inp, out, firm, shadow)
        for name in PATH_FIELDS:
            assert getattr(got, name) == getattr(want, name), (name, got, want)
        assert got.charges == want.charges
        same_states(model, core)


@given(paths(), requests, st.lists(st.tuples(st.integers(0, 90_000_000),
                                             st.integers(-3000, 3000),
                                             st.integers(-3000, 3000)), max_size=10))
def test_settle_path_matches_reference_model(cells, seq, adjustments):
    model, core = both(cells)
    now = T0
    for gap, tier, inp, out, _, shadow in seq:
        now += gap
        tier = min(tier, len(cells[0].prices) - 1)
        ref.decide_path(model, now, tier, inp, out, inp, shadow)
        _core.decide_path(core, now, tier, inp, out, inp, shadow)
    for gap, d_tokens, d_cost in adjustments:
        now += gap
        deltas = [(d_cost, ref.lim_bounds(lim, now)[0]) for lim in cells]
        assert _core.settle_path(core, now, d_tokens, deltas) == ref.settle_path(
            model, now, d_tokens, deltas)
        same_states(model, core)


@given(paths(max_cells=1), requests)
def test_a_one_cell_path_is_decide_exactly(cells, seq):
    """The tenant without a parent, extra windows or model cells decides as today."""
    lim = to_core(cells[0])
    a, b = _core.State(), _core.State()
    now = T0
    for gap, tier, inp, out, firm_out, shadow in seq:
        now += gap
        tier = min(tier, len(cells[0].prices) - 1)
        firm = inp + (out if firm_out else 0)
        x = _core.decide_path([(lim, a)], now, tier, inp, out, firm, shadow)
        y = _core.decide(lim, b, now, tier, inp, out, firm, shadow)
        for name in PATH_FIELDS[:-1] + ("period_start_us",):
            assert getattr(x, name) == getattr(y, name), name
        assert x.cell == (-1 if y.kind == _core.ALLOW else 0)
        assert (a.spent, a.req_level, a.tok_level) == (b.spent, b.req_level, b.tok_level)


def test_a_parent_without_room_refuses_and_no_cell_is_charged():
    key = _core.Limits(rpm=100, tpm=100_000, budget=10_000, period=_core.P_DAY)
    team = _core.Limits(budget=1_000, period=_core.P_MONTH)
    cells = [(key, _core.State()), (team, _core.State())]
    assert _core.decide_path(cells, T0, 0, 400, 400, 800).kind == _core.ALLOW
    refused = _core.decide_path(cells, T0, 0, 100, 200, 300)
    assert (refused.kind, refused.reason, refused.cell) == (_core.DENY_BUDGET, _core.R_BUDGET, 1)
    assert refused.charges == ((0, refused.charges[0][1]), (0, refused.charges[1][1]))
    assert [s.spent for _, s in cells] == [800, 800]
    # the headers stay the key's own: its budget shows 9,200 left, not the team's 200
    assert refused.budget_limit == 10_000 and refused.budget_remaining == 9_200
    # the month ends: the team's window rolls over, retry-after said so
    month_end = calendar.timegm((2026, 12, 1, 0, 0, 0)) * 1_000_000
    assert refused.retry_after_s == (month_end - T0) // 1_000_000
    assert _core.decide_path(cells, month_end, 0, 100, 200, 300).admitted


def test_the_lowest_cell_downgrades_and_every_cell_pays_the_lower_price():
    prices = ((1000, 1000), (10, 10))
    key = _core.Limits(budget=10_000_000_000, budget_in_usd=True, prices=prices)
    team = _core.Limits(budget=1_000_000, budget_in_usd=True, low_water=0.5, prices=prices)
    tokens = _core.Limits(budget=1_000_000, prices=prices)  # a window in tokens
    cells = [(key, _core.State()), (team, _core.State()), (tokens, _core.State())]
    first = _core.decide_path(cells, T0, 0, 300, 300, 600)
    assert (first.kind, first.tier, first.charges[1][0]) == (_core.ALLOW, 0, 600_000)
    second = _core.decide_path(cells, T0, 0, 300, 300, 600)
    assert (second.kind, second.tier, second.cell) == (_core.DOWNGRADE, 1, 1)
    assert [c for c, _ in second.charges] == [6_000, 6_000, 600]


def test_the_cell_that_waits_longest_refuses_by_rate():
    key = _core.Limits(rpm=60)  # one request a second
    team = _core.Limits(rpm=6)  # one every ten seconds
    cells = [(key, _core.State()), (team, _core.State())]
    for _ in range(6):
        assert _core.decide_path(cells, T0, 0, 1, 1, 2).admitted
    out = _core.decide_path(cells, T0, 0, 1, 1, 2)
    assert (out.kind, out.reason, out.cell, out.retry_after_s) == (
        _core.DENY_RATE, _core.R_RPM, 1, 10)
    assert out.remaining_requests == 54  # the key's own bucket, untouched by the refusal


def test_the_soft_estimate_is_trimmed_to_the_smallest_bucket():
    cells = [(_core.Limits(tpm=1000), _core.State()), (_core.Limits(tpm=300), _core.State())]
    soft = _core.decide_path(cells, T0, 0, 100, 1024, 100)
    assert soft.admitted and soft.charged_tokens == 300
    firm = _core.decide_path(cells, T0, 0, 100, 1024, 400)  # fits 1000, not 300
    assert (firm.kind, firm.reason, firm.cell) == (_core.TOO_LARGE, _core.R_TPM, 1)


def test_a_path_is_bounded_and_its_tiers_agree():
    with pytest.raises(ValueError, match="cells"):
        _core.decide_path([(_core.Limits(), _core.State())] * 33, T0, 0, 1, 1, 2)
    two = _core.Limits(prices=((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="tiers"):
        _core.decide_path([(_core.Limits(), _core.State()), (two, _core.State())], T0, 0, 1, 1, 2)
