"""A deadline on every sink call that holds when the server hangs.

A stopped PostgreSQL (SIGSTOP, a frozen VM) keeps its kernel: TCP keepalives and
data are acknowledged, so neither keepalives, ``tcp_user_timeout`` nor the server's
``statement_timeout`` ever end a call, and a blocking call would hold the writer for
good. So each call runs in a thread of its own and the writer waits for it only so
long: past the deadline the sink is told to ``interrupt()`` (the PostgreSQL sink shuts
its socket down, which ends the blocked call at once) and the call is abandoned. Its
batch then spills and is replayed later; a call that completes after all the same
stored what a replay stores again, which the sinks ignore (PostgreSQL's primary key,
the event files' reader counts each key once).

At most one call is ever in flight: until an abandoned call returns, the sink counts as
failing without being called again. Once a call has run out its wait, the next calls
are waited for only briefly (``probe_wait_s``), so a hung sink costs the writer a
moment per retry, not a deadline, while a call that goes on running in the background
is still bounded by the deadline.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Sequence

from sidecar.ledger.events import Event
from sidecar.ledger.sinks import Sink, SinkError, SinkRefused

log = logging.getLogger("kt.ledger")


class SinkTimeout(SinkError):
    """The sink did not answer within the deadline (or has not answered an earlier call)."""


class SinkCaller:
    def __init__(self, sink: Sink, deadline_s: float = 5.0, probe_wait_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.deadline_s = deadline_s
        self.probe_wait_s = min(probe_wait_s, deadline_s)
        self.clock = clock
        self.timeouts = 0  # calls abandoned at their deadline
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0
        self._interrupted = False
        self._outcome: list[BaseException | None] = []
        self._hung = False  # the last call ran out its wait

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def enforce(self) -> None:
        """Interrupt a call that has run past its deadline (called by the writer often)."""
        if self.busy() and not self._interrupted \
                and self.clock() - self._started >= self.deadline_s:
            self._interrupted = True
            self.timeouts += 1
            log.warning("ledger: the %s sink has not answered in %.1f s: call interrupted",
                        self.sink.name, self.deadline_s)
            try:
                self.sink.interrupt()
            except Exception:  # noqa: BLE001 - the call stays abandoned either way
                log.exception("ledger: interrupting the %s sink failed", self.sink.name)

    def write(self, events: Sequence[Event], wait_s: Optional[float] = None) -> None:
        """sink.write(events), waited for at most ``wait_s`` (default: the deadline, or
        ``probe_wait_s`` while the sink hangs). Raises SinkError (SinkTimeout, SinkRefused)."""
        self.enforce()
        if self.busy():
            raise SinkTimeout(f"the {self.sink.name} sink has not answered a call for "
                              f"{self.clock() - self._started:.1f} s")
        if self._thread is not None and self._outcome == [None]:
            self._hung = False  # the abandoned call succeeded after all: the sink answers
        limit = self.probe_wait_s if self._hung else self.deadline_s
        wait = limit if wait_s is None else min(wait_s, limit)
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                self.sink.write(events)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
                outcome.append(exc)
            else:
                outcome.append(None)

        self._outcome = outcome
        self._interrupted = False
        self._started = self.clock()
        self._thread = threading.Thread(target=call, name="kt-ledger-sink", daemon=True)
        self._thread.start()
        self._thread.join(wait)
        if self._thread.is_alive():
            self._hung = True
            self.enforce()
            raise SinkTimeout(f"the {self.sink.name} sink did not answer in {wait:.1f} s")
        self._thread = None
        self._hung = False
        exc = outcome[0]
        if exc is None:
            return
        if isinstance(exc, SinkError):
            raise exc
        # a value the sink's own code cannot handle: isolated like a refusal, never
        # allowed to take the batch with it
        raise SinkRefused(f"{self.sink.name}: {type(exc).__name__}: {exc}") from None

    def close(self, wait_s: float = 1.0) -> bool:
        """Interrupt a call still running and wait a little for it; False if it is still
        running (then the sink must not be closed under it)."""
        if self.busy():
            self._started = self.clock() - self.deadline_s
            self.enforce()
            assert self._thread is not None
            self._thread.join(wait_s)
        return not self.busy()
