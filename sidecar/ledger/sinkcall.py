"""A deadline on every sink call that holds when the server hangs.

A stopped PostgreSQL (SIGSTOP, a frozen VM) keeps its kernel: TCP keepalives and
data are acknowledged, so neither keepalives, ``tcp_user_timeout`` nor the server's
``statement_timeout`` ever end a call, and a blocking call would hold the writer for
good. So calls run in a thread of their own (one, kept for every call) and the writer
waits for each only so long: past the deadline the sink is told to ``interrupt()`` (the PostgreSQL sink shuts
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
import queue
import threading
import time
from typing import Callable, Optional, Sequence

from sidecar.ledger.events import Event
from sidecar.ledger.sinks import Sink, SinkError, SinkRefused

log = logging.getLogger("kt.ledger")


class SinkTimeout(SinkError):
    """The sink did not answer within the deadline (or has not answered an earlier call)."""


class _Call:
    __slots__ = ("events", "done", "error")

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self.done = threading.Event()
        self.error: Optional[BaseException] = None


class SinkCaller:
    def __init__(self, sink: Sink, deadline_s: float = 5.0, probe_wait_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.deadline_s = deadline_s
        self.probe_wait_s = min(probe_wait_s, deadline_s)
        self.clock = clock
        self.timeouts = 0  # calls interrupted at their deadline
        self._calls: queue.SimpleQueue[Optional[_Call]] = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._call: Optional[_Call] = None  # the last call, until it is known to be over
        self._started = 0.0
        self._interrupted = False
        self._hung = False  # the last call ran out its wait

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            try:
                self.sink.write(call.events)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
                call.error = exc
            call.done.set()

    def busy(self) -> bool:
        return self._call is not None and not self._call.done.is_set()

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
        if self._call is not None and self._call.error is None:
            self._hung = False  # the abandoned call succeeded after all: the sink answers
        limit = self.probe_wait_s if self._hung else self.deadline_s
        wait = limit if wait_s is None else min(wait_s, limit)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="kt-ledger-sink",
                                            daemon=True)
            self._thread.start()
        call = self._call = _Call(events)
        self._interrupted = False
        self._started = self.clock()
        self._calls.put(call)
        if not call.done.wait(wait):
            self._hung = True
            self.enforce()
            raise SinkTimeout(f"the {self.sink.name} sink did not answer in {wait:.1f} s")
        self._call = None
        self._hung = False
        exc = call.error
        if exc is None:
            return
        if isinstance(exc, SinkError):
            raise exc
        # a value the sink's own code cannot handle: isolated like a refusal, never
        # allowed to take the batch with it
        raise SinkRefused(f"{self.sink.name}: {type(exc).__name__}: {exc}") from None

    def close(self, wait_s: float = 1.0) -> bool:
        """Interrupt a call still running and wait a little for it, then stop the call
        thread; False if the call is still running (then the sink must not be closed)."""
        if self.busy():
            assert self._call is not None
            self._started = self.clock() - self.deadline_s
            self.enforce()
            self._call.done.wait(wait_s)
        if self.busy():
            return False
        if self._thread is not None:
            self._calls.put(None)
            self._thread = None
        return True
