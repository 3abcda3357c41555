"""Redis's clock as seen from this host: the offset between this host's monotonic clock
and each node's TIME, so that a call carries its caller's deadline in the clock of the
node that runs it (lua/deadline.lua)."""
from __future__ import annotations

import time
from typing import Any, Optional

# how fast the offset between this host's monotonic clock and Redis's TIME may drift
# (a bound, 100 ppm: NTP keeps both far closer)
CLOCK_DRIFT = 1e-4


def mono_us() -> int:
    return time.monotonic_ns() // 1000


class ClockOffsets:
    """A lower bound of (Redis's TIME - this host's monotonic clock) in µs, and when it was
    measured (monotonic µs), per node ("" on a single node, a node's name on a cluster:
    each primary has its own clock); absent until first read."""

    def __init__(self) -> None:
        self._offsets: dict[str, tuple[int, int]] = {}

    def observe(self, reply: Any, sent_us: int, answered_us: int, node: str = "") -> None:
        """One reading of Redis's TIME, taken between ``sent_us`` and ``answered_us`` on
        this host's monotonic clock. Keeps the best lower bound of the offset between the
        two clocks: a decision's deadline is its caller's (monotonic) deadline plus that
        bound, so Redis may refuse a decision a little early (by the reading's round
        trip, ~0.1 ms on a LAN) but never applies one after its caller gave up on it."""
        redis_us = int(reply[0]) * 1_000_000 + int(reply[1])
        lo, hi = redis_us - answered_us, redis_us - sent_us
        current = self.offset(answered_us, node)
        # a tighter bound, or Redis's clock was set back (the old bound is then too high)
        if current is None or lo > current or hi < current:
            self._offsets[node] = (lo, answered_us)

    def offset(self, now_us: int, node: str = "") -> Optional[int]:
        """The offset's lower bound now: the last one, less the drift it may have had since."""
        known = self._offsets.get(node)
        if known is None:
            return None
        return known[0] - int(CLOCK_DRIFT * (now_us - known[1]))

    def deadline_us(self, deadline_s: float, node: str = "") -> int:
        """A monotonic deadline (s) in the node's clock (µs); 0 (no deadline) while that
        node's clock has not been read."""
        offset = self.offset(mono_us(), node)
        return int(deadline_s * 1e6) + offset if offset is not None else 0
