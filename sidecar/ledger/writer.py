"""Between the decision path and a sink: a bounded buffer and one writer thread.

``emit`` (called on the event loop) only appends to a deque: it never blocks, never
does I/O, never raises. The writer thread takes batches from it, makes every value
storable (sidecar/ledger/storable.py) and writes them to the sink, each call bounded
by a deadline that holds when the server hangs (sidecar/ledger/sinkcall.py):

- the sink cannot take the batch (down, hung past the deadline): the batch goes to the
  spill file (local disk, bounded) and the sink is retried every ``retry_interval_s``:
  the spill is replayed first, in order, then new events go straight to the sink again;
- the sink refuses the batch's content: the batch is split in halves, again and again,
  until the refused event stands alone; it goes to the dead-letter file with the
  sink's error, and every other event of the batch is written;
- an event no sink can store (an integer past 64 bits) goes to the dead-letter file
  before any sink sees it.

An event is lost only when the buffer is full (the writer cannot keep up even with
local disk), or the spill or dead-letter file cannot be written or is full; each is
counted and logged, and makes ``status()`` not ready for ``LOSS_UNREADY_S``.

Counters (exported by sidecar/metrics.py): accepted, written (by the sink, replays
included), spilled, replayed, dead_lettered, lost; the sink calls abandoned at their
deadline; the events buffered and the spill's bytes. ``status()`` is the readiness
detail.

A SIGKILL loses what is in the buffer (at most ``flush_interval_s`` of events, as
the writer drains it that often, or ``sink_timeout_s`` while a call hangs); what
reached the spill file survives and is replayed by the next start. A shutdown writes
or spills everything buffered, waiting for the sink at most ``SHUTDOWN_WAIT_S``.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional, Sequence

from sidecar.ledger.deadletter import DeadLetter, DeadLetterFile
from sidecar.ledger.events import Event
from sidecar.ledger.sinkcall import SinkCaller, SinkTimeout
from sidecar.ledger.sinks import Sink, SinkError, SinkRefused, SpillFile
from sidecar.ledger.storable import Unstorable, storable

log = logging.getLogger("kt.ledger")
LOSS_UNREADY_S = 60.0  # /readyz says not ready this long after an event is lost
SHUTDOWN_WAIT_S = 2.0  # at shutdown the sink gets this long per call, then events spill


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class EventLog:
    def __init__(self, sink: Sink, spill: SpillFile, buffer_events: int = 100_000,
                 batch_events: int = 5_000, flush_interval_s: float = 0.2,
                 retry_interval_s: float = 2.0, sink_timeout_s: float = 5.0,
                 dead_letters: Optional[DeadLetterFile] = None) -> None:
        self.sink = sink
        self.spill = spill
        self.dead_letters = dead_letters or DeadLetterFile(
            spill.path.with_name("dead-letter.jsonl"), spill.max_bytes)
        self.capacity = buffer_events
        self.batch_events = batch_events
        # events per sink call: halved after a call runs out its deadline, doubled back
        # after each that does not, so a slow (not hung) sink is not cut off for good
        self.call_events = batch_events
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.sink_timeout_s = sink_timeout_s
        self.caller = SinkCaller(sink, sink_timeout_s,
                                 probe_wait_s=min(1.0, retry_interval_s))
        self._buf: collections.deque[Event] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._idle = threading.Condition()
        self._busy = False
        self.accepted = 0
        self.written = 0
        self.spilled = 0
        self.replayed = 0
        self.dead_lettered = 0
        self.lost = 0
        self.sink_failures = 0
        self.last_error = ""
        self.last_dead_letter = ""
        self.sink_ok = True
        self._next_try = 0.0
        self._last_loss_log = 0.0
        self._lost_at = float("-inf")  # monotonic time of the last loss
        self._failing_since = 0.0

    # --- the event loop's side ----------------------------------------------
    def emit(self, event: Event) -> bool:
        """Hand one event to the writer; False (and counted as lost) if the buffer is full."""
        if len(self._buf) >= self.capacity:
            self.lost += 1
            now = time.monotonic()
            self._lost_at = now
            if now - self._last_loss_log >= 10:
                self._last_loss_log = now
                log.error("ledger buffer full (%d events): events are being lost (%d so far, "
                          "kt_ledger_events_total{state=\"lost\"}); the %s sink and the spill "
                          "file cannot keep up", self.capacity, self.lost, self.sink.name)
            return False
        self._buf.append(event)  # deque.append is atomic: no lock on the decision path
        self.accepted += 1
        if len(self._buf) >= self.batch_events:
            self._wake.set()
        return True

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def lost_total(self) -> int:
        """Events lost: buffer full, spill or dead-letter file failing, torn spill lines."""
        return self.lost + self.spill.malformed

    def status(self) -> tuple[bool, str]:
        """(ready, detail) for /readyz. Spilling is ready (the events wait on local disk,
        nothing is lost); losing events is not, for LOSS_UNREADY_S after the last loss."""
        name = self.sink.name
        if not self.last_error:
            detail = f"ledger {name} ok"
        else:
            detail = (f"ledger {name} sink failing for {time.monotonic() - self._failing_since:.0f}"
                      f" s, events spill to {self.spill.path} ({self.spilled} spilled, "
                      f"{self.spill.waiting_bytes()} bytes waiting of "
                      f"{self.spill.max_bytes / (1 << 20):g} MiB): {self.last_error}")
        if self.dead_lettered:
            detail += (f"; {self.dead_lettered} events set aside in {self.dead_letters.path} "
                       f"(last: {self.last_dead_letter})")
        losing = time.monotonic() - self._lost_at < LOSS_UNREADY_S
        if self.lost_total:
            detail += f"; {self.lost_total} events LOST"
            if losing:
                detail += " (the last within a minute)"
        return not losing, detail

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kt-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> int:
        """Write what is buffered (to the sink, or the spill file), then stop. Returns the
        events that could not be saved in ``timeout`` (counted lost and logged)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                left = len(self._buf)
                self.lost += left
                log.error("ledger: the writer did not finish in %.0f s at shutdown: %d "
                          "buffered events lost", timeout, left)
                return left
            self._thread = None
        else:
            self._drain(final=True)
        if self.caller.close():
            self.sink.close()
        return 0

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything emitted so far has been written or spilled (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._idle:
            while self._buf or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.05))
        return True

    # --- the writer thread --------------------------------------------------
    def _run(self) -> None:
        try:
            if self.spill.adopt_orphans():
                log.info("ledger: spill files of stopped processes adopted for replay")
        except Exception:  # noqa: BLE001 - never let this stop the writer
            log.exception("ledger: adopting spill files failed")
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            stopping = self._stop
            try:
                self._drain(final=stopping)
            except Exception:  # noqa: BLE001 - the writer must outlive any bug in one batch
                log.exception("ledger writer: unexpected error")
            if stopping:
                return

    def _take(self) -> list[Event]:
        batch: list[Event] = []
        buf = self._buf
        while buf and len(batch) < self.batch_events:
            batch.append(buf.popleft())
        return batch

    def _drain(self, final: bool = False) -> None:
        with self._idle:
            self._busy = True
        try:
            self.caller.enforce()
            if (not self.sink_ok or self.spill.pending()) and time.monotonic() >= self._next_try:
                if self.spill.pending():
                    self._replay(final)
                else:
                    self.sink_ok = True  # nothing to replay: the next batch tries the sink
            while True:
                batch = self._take()
                if not batch:
                    break
                try:
                    self._write(self._prepare(batch)[0], final)
                except Exception as exc:  # noqa: BLE001 - a bug must not lose events silently
                    log.exception("ledger writer: unexpected error")
                    self._lose(len(batch), f"unexpected error: {type(exc).__name__}: {exc}")
        finally:
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _prepare(self, events: Sequence[Event]) -> tuple[list[Event], list[int]]:
        """Every value made storable; an event no sink can store is set aside. Returns the
        events to write and, for each, its place in ``events``."""
        try:
            return list(map(storable, events)), list(range(len(events)))
        except Unstorable:
            pass  # rare: the same again, one by one
        out: list[Event] = []
        places: list[int] = []
        for i, e in enumerate(events):
            try:
                out.append(storable(e))
            except Unstorable as exc:
                self._set_aside(exc.event, "", "unstorable", str(exc))
            else:
                places.append(i)
        return out, places

    def _store_spilled(self, events: list[Event], final: bool) -> int:
        """_store for a replay: how many of ``events`` (a prefix) were dealt with."""
        prepared, places = self._prepare(events)
        handled = self._store(prepared, final, replay=True)
        return len(events) if handled == len(prepared) else places[handled]

    def _replay(self, final: bool) -> None:
        try:
            n, done = self.spill.replay(lambda events: self._store_spilled(events, final),
                                        self.batch_events)
        except OSError as exc:
            self._failed(f"spill file {self.spill.path}: {exc}")
            return
        if n:
            log.info("ledger: %d spilled events replayed to the %s sink", n, self.sink.name)
        if done:
            self._recovered()

    def _write(self, batch: list[Event], final: bool) -> None:
        if not batch:
            return
        # while anything waits in the spill, new events queue behind it (order is kept)
        if self.sink_ok and not self.spill.pending():
            handled = self._store(batch, final)
            if handled == len(batch):
                if self.last_error:
                    self._recovered()
                return
            batch = batch[handled:]
        try:
            self.spill.append(batch)
        except OSError as exc:
            self._lose(len(batch), f"spill file {self.spill.path}: {exc}")
            return
        self.spilled += len(batch)

    def _store(self, events: list[Event], final: bool, replay: bool = False) -> int:
        """Write events to the sink in order; a refused part is split until the refused
        event stands alone, which is set aside. Returns how many (a prefix) were written or
        set aside: fewer than all when the sink failed part way (then it is marked failing)."""
        wait = min(self.sink_timeout_s, SHUTDOWN_WAIT_S) if final else None
        n = self.call_events
        todo = [events[i:i + n] for i in range(0, len(events), n)]
        todo.reverse()  # parts still to write, the next one last
        while todo:
            part = todo.pop()
            try:
                self.caller.write(part, wait)
            except SinkRefused as exc:
                if len(part) == 1:
                    self._set_aside(part[0], self.sink.name, "refused", str(exc))
                else:
                    half = len(part) // 2
                    todo += [part[half:], part[:half]]
                continue
            except SinkError as exc:
                if isinstance(exc, SinkTimeout) and not final:
                    self.call_events = max(1, min(self.call_events, len(part)) // 2)
                self._failed(str(exc))
                return len(events) - len(part) - sum(map(len, todo))
            self.call_events = min(self.batch_events, self.call_events * 2)
            self.written += len(part)
            if replay:
                self.replayed += len(part)
        return len(events)

    def _set_aside(self, event: Event, sink: str, reason: str, error: str) -> None:
        letter = DeadLetter(at_us=wall_clock_us(), sink=sink, reason=reason, error=error,
                            event=event)
        try:
            self.dead_letters.append([letter])
        except (OSError, ValueError, TypeError) as exc:
            self._lose(1, f"dead-letter file {self.dead_letters.path}: {exc}")
            return
        self.dead_lettered += 1
        self.last_dead_letter = f"{reason}: {error}"[:300]
        log.error("ledger: an event was set aside in %s (%s: %s): tenant %r, request %r",
                  self.dead_letters.path, reason, error[:300],
                  getattr(event, "tenant", ""), getattr(event, "request_id", ""))

    def _lose(self, n: int, error: str) -> None:
        self.lost += n
        self._lost_at = time.monotonic()
        log.error("ledger: %d events lost: %s", n, error)

    def _failed(self, error: str) -> None:
        if self.sink_ok or error != self.last_error:
            log.warning("ledger: the %s sink failed, events spill to %s until it answers "
                        "(retry every %.0f s): %s", self.sink.name, self.spill.path,
                        self.retry_interval_s, error)
        if self.sink_ok:
            self._failing_since = time.monotonic()
        self.sink_ok = False
        self.sink_failures += 1
        self.last_error = error
        self._next_try = time.monotonic() + self.retry_interval_s

    def _recovered(self) -> None:
        if self.last_error:
            log.info("ledger: the %s sink answers again", self.sink.name)
        self.sink_ok = True
        self.last_error = ""
