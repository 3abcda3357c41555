"""Red team, round 2: a calendar window never goes back. Two callers whose clocks differ
near a window's end hand the rules different windows (each computes its own:
policy/holders.Calendar); a cell already in the next window stays there, in the core, the
reference model and (tests/backends/test_redteam_holders_redis.py) the Lua scripts."""
from __future__ import annotations

from sidecar import _core
from tests.core import reference_model as ref
from tests.core.test_core_reference import T0, to_core

HOUR = 3_600_000_000


def test_a_cell_in_the_next_window_keeps_its_spend_for_a_caller_behind():
    now = T0 - 1_000_000  # a second before the window ends, by the deciding clock
    behind = ref.Limits(rpm=0, tpm=0, burst=1.0, budget=500, budget_in_usd=False,
                        period=ref.P_WINDOW, low_water=0.0, prices=[(0, 0)],
                        win_start=T0 - 168 * HOUR, win_end=T0, win_next=T0 + 168 * HOUR)
    ahead = ref.Limits(rpm=0, tpm=0, burst=1.0, budget=500, budget_in_usd=False,
                       period=ref.P_WINDOW, low_water=0.0, prices=[(0, 0)],
                       win_start=T0, win_end=T0 + 168 * HOUR, win_next=T0 + 336 * HOUR)
    for decide, limits, state in ((ref.decide_path, lambda x: x, ref.State),
                                  (_core.decide_path, to_core, _core.State)):
        st = state()
        # (the second cell only makes it a path of two, as the sidecar's would be)
        other = state()
        kinds = []
        for lim in (ahead, behind, ahead, behind):
            out = decide([(limits(lim), st), (limits(ref.Limits(
                rpm=0, tpm=0, burst=1.0, budget=-1, budget_in_usd=False, period=0,
                low_water=0.0, prices=[(0, 0)])), other)], now, 0, 400, 0, 400)
            kinds.append(out.kind)
        # the next window's 500 holds one request of 400, whoever's clock asks
        assert kinds == [_core.ALLOW, _core.DENY_BUDGET, _core.DENY_BUDGET, _core.DENY_BUDGET]
        assert (st.period_start, st.spent) == (T0, 400)
        # a settlement by the caller behind lands in that window too
        settle = ref.settle_path if decide is ref.decide_path else _core.settle_path
        settle([(limits(behind), st)], now, 0, [(-100, T0)])
        assert (st.period_start, st.spent) == (T0, 300)
