"""Calendar windows (docs/budgets.md): a day, week or month starting at local midnight in
an IANA time zone, on a chosen day, computed with zoneinfo from the clock. Exact instants
at daylight-saving changes (a 23- and a 25-hour day), a month from the 15th across one, a
week from Monday; the policy's checks; and a budget that rolls over at local midnight,
decided by the embedded backend through the Decider."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import pytest

from sidecar import _core
from sidecar.backends.memory import MemoryBackend
from sidecar.flows import Flows
from sidecar.model import Kind, Request
from sidecar.policy import schema
from sidecar.policy.holders import Calendar
from sidecar.policy.load import PolicyError, parse_policy
from tests.support.clock import ManualClock

H = 3_600_000_000


def us(text: str) -> int:
    """An ISO instant (UTC) in µs."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int((dt - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds()) * 1_000_000


def cal(**kw) -> Calendar:
    return Calendar(schema.Budget(tokens=1, **kw))


def test_a_berlin_day_is_23_hours_when_the_clocks_go_forward_and_25_when_back():
    day = cal(period="day", timezone="Europe/Berlin")
    start, end, nxt = day.window(us("2026-03-29T12:00:00Z"))
    assert (start, end) == (us("2026-03-28T23:00:00Z"), us("2026-03-29T22:00:00Z"))
    assert end - start == 23 * H and nxt - end == 24 * H
    start, end, _ = day.window(us("2026-10-25T12:00:00Z"))
    assert (start, end) == (us("2026-10-24T22:00:00Z"), us("2026-10-25T23:00:00Z"))
    assert end - start == 25 * H


def test_a_month_from_the_15th_in_new_york_across_the_spring_change():
    month = cal(period="month", timezone="America/New_York", start_day=15)
    start, end, nxt = month.window(us("2026-03-10T12:00:00Z"))
    # from Feb 15, 00:00 EST (05:00Z) to Mar 15, 00:00 EDT (04:00Z): DST began Mar 8
    assert (start, end) == (us("2026-02-15T05:00:00Z"), us("2026-03-15T04:00:00Z"))
    assert nxt == us("2026-04-15T04:00:00Z")
    assert month.window(end - 1)[1] == end and month.window(end)[0] == end  # exact edge


def test_a_week_from_monday_in_berlin_and_one_from_sunday_in_utc():
    week = cal(period="week", timezone="Europe/Berlin")
    # Sunday 2026-11-22 23:30 UTC is already Monday 00:30 in Berlin: a new week
    assert week.window(us("2026-11-22T22:59:59Z"))[:2] == (
        us("2026-11-15T23:00:00Z"), us("2026-11-22T23:00:00Z"))
    assert week.window(us("2026-11-22T23:30:00Z"))[0] == us("2026-11-22T23:00:00Z")
    sunday = cal(period="week", start_weekday="sunday")
    assert sunday.window(us("2026-11-25T10:00:00Z"))[:2] == (
        us("2026-11-22T00:00:00Z"), us("2026-11-29T00:00:00Z"))


@pytest.mark.parametrize("budget, message", [
    ("{tokens: 10, period: day, timezone: Europe/Berlln}",
     "$.tenants.k.budget.timezone: unknown IANA time zone 'Europe/Berlln' (e.g. Europe/Berlin)"),
    ("{tokens: 10, period: hour, timezone: UTC}",
     "$.tenants.k.budget.period: a time zone or start applies to day, week and month, not hour"),
    ("{tokens: 10, period: month, start_day: 31}",
     "$.tenants.k.budget.start_day: a month's start day: 1..28, with period month"),
    ("{tokens: 10, period: day, start_weekday: monday}",
     "$.tenants.k.budget.start_weekday: a week's first day, with period week"),
])
def test_calendar_settings_are_checked_with_one_line_each(budget, message):
    text = f"tiers: [{{name: d, model: m}}]\ntenants:\n  k: {{budget: {budget}}}\n"
    with pytest.raises(PolicyError) as info:
        parse_policy(text.encode(), "p.yaml")
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(f"p.yaml: {message}")


def test_a_daily_budget_rolls_over_at_local_midnight_not_utc():
    clock = ManualClock()
    text = """
tenant: {header: x-tenant-id}
tiers: [{name: d, model: m}]
tenants:
  tokyo-key: {budget: {tokens: 2000, period: day, timezone: Asia/Tokyo}}
"""
    policy = parse_policy(text.encode(), "<test>")
    assert policy.tenants["tokyo-key"].limits.period == _core.P_WINDOW
    body = json.dumps({"model": "m", "max_tokens": 1500,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    flows = Flows(policy, MemoryBackend(clock=clock))

    def ask():
        return asyncio.run(flows.decider.decide(Request(headers={"x-tenant-id": "tokyo-key"},
                                                        body=body)))

    midnight_tokyo = us("2026-11-22T15:00:00Z")  # 2026-11-23 00:00 in Tokyo (UTC+9)
    clock.now = midnight_tokyo - 1_000_000
    assert ask().kind is Kind.ALLOW
    refused = ask()
    assert refused.kind is Kind.DENY_BUDGET and refused.outcome.retry_after_s == 1
    clock.now = midnight_tokyo
    assert ask().kind is Kind.ALLOW  # a new Tokyo day, 9 hours before UTC's
