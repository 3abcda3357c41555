"""The suite's one fixed instant and the clock tests move from it.

Every fake clock in the suite starts at ``T0_US``: 2026-11-18T11:06:40Z unless
``KT_TEST_T0`` names another instant (ISO 8601, UTC), which is how
tests/test_any_date.py runs the time-dependent tests at a month's last second and a
year's first. Nothing here reads today's date, so no test depends on it."""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

DEFAULT_T0 = "2026-11-18T11:06:40Z"


def _instant_us(text: str) -> int:
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    delta = at - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


T0_US = _instant_us(os.environ.get("KT_TEST_T0") or DEFAULT_T0)


def utc_day(us: int, days_after: int = 0) -> str:
    """The UTC date (YYYY-MM-DD) of ``us`` plus ``days_after`` days."""
    at = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=us)
    return (at + timedelta(days=days_after)).strftime("%Y-%m-%d")


def utc_month(us: int) -> str:
    return utc_day(us)[:7]


class ManualClock:
    """µs since the epoch, starting at ``T0_US`` and moving only when the test sets
    ``now`` or calls ``advance``; passed to the Lua scripts as their clock override."""

    def __init__(self, now_us: int = T0_US) -> None:
        self.now = now_us

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000)
