"""A clock the test moves, for backends that take one (the Lua scripts' clock override)."""
from __future__ import annotations

import time


class ManualClock:
    """µs since the epoch, starting at the wall clock's current second and moving only
    when the test sets ``now`` or calls ``advance``. It starts at real time because the
    scripts' PEXPIREAT must lie in the future (tests/inproc.FakeClock starts at a fixed
    instant, for the embedded backend)."""

    def __init__(self) -> None:
        self.now = int(time.time()) * 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000)
