"""Throttled logging: a flood of like events costs one log line a minute, not one each."""
from __future__ import annotations

import logging
import time


class BurstLog:
    """Logs the first of a burst of like events at once, then at most one line per
    ``interval_s`` saying how many more came: a client sending a thousand bad requests
    a second costs one log line a minute, not a thousand tracebacks a second."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock=time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last = -interval_s
        self._suppressed = 0

    def warning(self, msg: str, *args, **kwargs) -> bool:
        """Log (True) or count (False) one event."""
        now = self.clock()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (%d more like it in the %.0f s before, not logged)"
            args = (*args, self._suppressed, now - self._last)
        self._last = now
        self._suppressed = 0
        self.logger.warning(msg, *args, **kwargs)
        return True
