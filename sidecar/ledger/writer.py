"""Between the decision path and a sink: a bounded buffer and one writer thread.

``emit`` (called on the event loop) only appends to a deque: it never blocks, never
does I/O, never raises. The writer thread takes batches from it and writes them to
the sink; when the sink fails, the batch goes to the spill file (local disk) and the
sink is retried every ``retry_interval_s``: the spill is replayed first, in order,
then new events go straight to the sink again. An event is lost only when the buffer
is full (the writer cannot keep up even with local disk) or the spill file cannot be
written either; both are counted and logged, never silent.

Counters (exported as ``kt_ledger_events_total{state}`` by ``LedgerCollector``):
accepted, written (by the sink, replays included), spilled, replayed, lost; the
gauge ``kt_ledger_buffered_events``. ``status()`` is the readiness detail.

A SIGKILL loses what is in the buffer (at most ``flush_interval_s`` of events, as
the writer drains it that often); what reached the spill file survives and is
replayed by the next start.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional

from sidecar.ledger.events import Event
from sidecar.ledger.sinks import Sink, SinkError, SpillFile

log = logging.getLogger("kt.ledger")


class EventLog:
    def __init__(self, sink: Sink, spill: SpillFile, buffer_events: int = 100_000,
                 batch_events: int = 5_000, flush_interval_s: float = 0.2,
                 retry_interval_s: float = 2.0) -> None:
        self.sink = sink
        self.spill = spill
        self.capacity = buffer_events
        self.batch_events = batch_events
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
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
        self.lost = 0
        self.sink_failures = 0
        self.last_error = ""
        self.sink_ok = True
        self._next_try = 0.0
        self._last_loss_log = 0.0

    # --- the event loop's side ----------------------------------------------
    def emit(self, event: Event) -> bool:
        """Hand one event to the writer; False (and counted as lost) if the buffer is full."""
        if len(self._buf) >= self.capacity:
            self.lost += 1
            now = time.monotonic()
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

    def status(self) -> tuple[bool, str]:
        """(ready, detail) for /readyz: not ready while the sink fails (events then spill)."""
        if not self.last_error:
            return True, f"ledger {self.sink.name} ok"
        return False, (f"ledger {self.sink.name} sink failing, events spill to {self.spill.path} "
                       f"({self.spilled} spilled, {self.lost} lost): {self.last_error}")

    # --- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kt-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered (to the sink, or the spill file), then stop."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._drain(final=True)
        self.sink.close()

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
                log.exception("ledger writer: unexpected error (the batch was counted as lost)")
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
            if (not self.sink_ok or self.spill.pending()) and time.monotonic() >= self._next_try:
                if self.spill.pending():
                    self._replay()
                else:
                    self.sink_ok = True  # nothing to replay: the next batch tries the sink
            while True:
                batch = self._take()
                if not batch:
                    break
                self._write(batch)
        finally:
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _replay(self) -> None:
        try:
            n = self.spill.replay(self.sink, self.batch_events)
        except SinkError as exc:
            self._failed(str(exc))
            return
        except OSError as exc:
            self._failed(f"spill file {self.spill.path}: {exc}")
            return
        if n:
            log.info("ledger: %d spilled events replayed to the %s sink", n, self.sink.name)
        self.replayed += n
        self.written += n
        self._recovered()

    def _write(self, batch: list[Event]) -> None:
        # while anything waits in the spill, new events queue behind it (order is kept)
        if self.sink_ok and not self.spill.pending():
            try:
                self.sink.write(batch)
            except SinkError as exc:
                self._failed(str(exc))
            else:
                self.written += len(batch)
                if self.last_error:
                    self._recovered()
                return
        try:
            self.spill.append(batch)
        except OSError as exc:
            self.lost += len(batch)
            self.last_error = f"spill file {self.spill.path}: {exc}"
            log.error("ledger: %d events lost: the %s sink failed and the spill file cannot be "
                      "written (%s)", len(batch), self.sink.name, exc)
            return
        self.spilled += len(batch)

    def _failed(self, error: str) -> None:
        if self.sink_ok or error != self.last_error:
            log.warning("ledger: the %s sink failed, events spill to %s until it answers "
                        "(retry every %.0f s): %s", self.sink.name, self.spill.path,
                        self.retry_interval_s, error)
        self.sink_ok = False
        self.sink_failures += 1
        self.last_error = error
        self._next_try = time.monotonic() + self.retry_interval_s

    def _recovered(self) -> None:
        if self.last_error:
            log.info("ledger: the %s sink answers again", self.sink.name)
        self.sink_ok = True
        self.last_error = ""
