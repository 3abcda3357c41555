"""The ledger's writer cannot be poisoned or hung (docs/ledger.md, "How events travel"):
every value is made storable before a sink sees it, a refused event is isolated and set
aside with its reason while the rest of its batch is written, a sink call that hangs is
abandoned at its deadline and its events spill, the spill is bounded and counted, and a
shutdown during an outage spills everything. The same against a real PostgreSQL
(stopped, refusing, SIGSTOPped, and under a real `kt serve`): tests/ledger/test_ledger_sinks_postgres.py."""
from __future__ import annotations

import hashlib
import threading

import msgspec
import pytest
from prometheus_client import generate_latest

from sidecar.ledger.deadletter import decode_dead_letter
from sidecar.ledger.events import RefusalsEvent, encode_line
from sidecar.ledger.sinks import FileSink, SinkError, SinkRefused, SpillFile, event_files, read_events
from sidecar.ledger.storable import (TEXT_MAX, Unstorable, original_text, storable,
                                     storable_text)
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.writer import EventLog
from sidecar.metrics import Metrics
from tests.ledger.test_ledger import usage_event

# (value, whether its stored form can be undone exactly: short enough once escaped)
HOSTILE = [("gpt-4o\x00", True), ("a\\x00", True), ("a\\\\x00", True),
           ("\udcff\udcfe", True), ("é\x00ü", True), ("x" * (TEXT_MAX + 1), False),
           ("\x00" * 600, False), ("\\" * 300, False), ("y" * 600 + "\x00", False),
           ("y" * 600 + "\x01", False), ("\x00" * 100, True)]


# --- values made storable ----------------------------------------------------
def test_ordinary_values_are_stored_as_they_are():
    for s in ("", "gpt-4o", "claude-sonnet-4@2025", "é ü 模型", "x" * TEXT_MAX, "tab\there"):
        assert storable_text(s) is s
    e = usage_event(1)
    assert storable(e) is e


def test_every_hostile_value_becomes_storable_bounded_and_tells_itself_apart():
    stored = [storable_text(s) for s, _ in HOSTILE]
    for (original, exact), s in zip(HOSTILE, stored, strict=True):
        assert "\x00" not in s and len(s) <= TEXT_MAX, repr(s[:40])
        s.encode("utf-8")  # valid UTF-8: no lone surrogate left
        assert "\\" in s  # an escaped value always holds a backslash; an ordinary one never
        # short enough: the escape is undone exactly; too long: a prefix and the hash
        assert original_text(s) == (original if exact else None), repr(original[:20])
    # two different originals never share a stored value (no primary key folds them)
    assert len(set(stored)) == len(HOSTILE)
    long = "y" * 600 + "\x00"
    assert storable_text(long).endswith("\\~" + hashlib.sha256(long.encode()).hexdigest())


def test_an_event_keeps_its_numbers_and_a_64_bit_overflow_is_named():
    e = msgspec.structs.replace(usage_event(1), model_asked="gpt-4o\x00", request_id="\udcff")
    got = storable(e)
    assert (got.model_asked, got.request_id) == ("gpt-4o\\x00", "\\udcff")
    assert got.input_tokens == e.input_tokens and got.cost_nano_usd == e.cost_nano_usd
    encode_line(got)  # now every sink's encoder takes it
    big = msgspec.structs.replace(e, cost_nano_usd=1 << 64)
    with pytest.raises(Unstorable, match=f"cost_nano_usd = {1 << 64} is outside the 64-bit"):
        storable(big)
    r = RefusalsEvent(minute_us=0, tenant="t\x00", reason="rate_limited", count=1)
    assert storable(r).tenant == "t\\x00"


# --- a writer against sinks that refuse or hang ---------------------------------
class Picky:
    """A file sink that refuses, as PostgreSQL does a value it cannot hold, every batch
    holding an event whose model is 'poison'."""

    name = "picky"

    def __init__(self, directory) -> None:
        self.files = FileSink(directory, fsync=False)
        self.calls = 0

    def write(self, events) -> None:
        self.calls += 1
        if any(getattr(e, "model_asked", "") == "poison" for e in events):
            raise SinkRefused("picky: value refused")
        self.files.write(events)

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        self.files.close()


def written(directory) -> list[str]:
    return [e.request_id for e in read_events(event_files(directory))]


def dead_letters(path) -> list:
    return [decode_dead_letter(line) for line in path.read_bytes().splitlines()]


def test_a_refused_event_is_isolated_and_set_aside_and_the_rest_is_written(tmp_path):
    sink = Picky(tmp_path / "events")
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"), batch_events=1000,
                   flush_interval_s=3600, retry_interval_s=0.01)
    bad = {17, 60}
    for i in range(100):
        log.emit(usage_event(i, model_asked="poison") if i in bad else usage_event(i))
    log.close()  # one batch of 100, written at shutdown
    assert written(tmp_path / "events") == [f"req-{i}" for i in range(100) if i not in bad]
    letters = dead_letters(tmp_path / "dead-letter.jsonl")
    assert [d.event.request_id for d in letters] == ["req-17", "req-60"]
    assert {(d.sink, d.reason, d.error) for d in letters} == {
        ("picky", "refused", "picky: value refused")}
    assert (log.written, log.dead_lettered, log.spilled, log.lost) == (98, 2, 0, 0)
    assert sink.calls <= 2 * 2 * 7 + 1  # halving: a few calls per bad event, not one per event
    ready, detail = log.status()
    assert ready and "2 events set aside in" in detail and "picky: value refused" in detail


def test_a_refused_event_in_the_spill_does_not_block_its_replay(tmp_path):
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([usage_event(0), usage_event(1, model_asked="poison"), usage_event(2)])
    log = EventLog(Picky(tmp_path / "events"), SpillFile(tmp_path / "spill.jsonl"),
                   flush_interval_s=0.01)
    log.start()
    log.emit(usage_event(3))
    assert log.flush()
    log.close()
    assert written(tmp_path / "events") == ["req-0", "req-2", "req-3"]
    assert [d.event.request_id for d in dead_letters(tmp_path / "dead-letter.jsonl")] == ["req-1"]
    assert not (tmp_path / "spill.jsonl").exists()


def test_an_unstorable_event_never_reaches_the_sink(tmp_path):
    sink = Picky(tmp_path / "events")
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"))
    log.emit(usage_event(0))
    log.emit(msgspec.structs.replace(usage_event(1), budget_charge=1 << 63, tenant="a\x00"))
    log.close()
    assert written(tmp_path / "events") == ["req-0"] and sink.calls == 1
    (letter,) = dead_letters(tmp_path / "dead-letter.jsonl")
    assert (letter.reason, letter.sink) == ("unstorable", "")
    assert letter.event.budget_charge == 1 << 63 and letter.event.tenant == "a\\x00"


class Hung:
    """A sink whose server stopped answering: write blocks until interrupt() (as the
    PostgreSQL sink's socket shutdown does), then fails; or until it is thawed."""

    name = "hung"

    def __init__(self, directory) -> None:
        self.files = FileSink(directory, fsync=False)
        self.frozen = True
        self.interrupts = 0
        self._wake = threading.Event()

    def write(self, events) -> None:
        if self.frozen:
            self._wake.clear()
            self._wake.wait(60)
            raise SinkError("hung: connection shut down")
        self.files.write(events)

    def interrupt(self) -> None:
        self.interrupts += 1
        self._wake.set()

    def thaw(self) -> None:
        self.frozen = False
        self._wake.set()

    def close(self) -> None:
        self.files.close()


def test_a_hung_sink_is_abandoned_at_its_deadline_and_its_events_spill(tmp_path):
    sink = Hung(tmp_path / "events")
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"), batch_events=10,
                   flush_interval_s=0.01, retry_interval_s=0.05, sink_timeout_s=0.3)
    log.start()
    try:
        for i in range(50):
            log.emit(usage_event(i))
        assert log.flush(30)  # the writer came back from the hung call by itself
        assert log.spilled == 50 and log.written == 0 and log.lost == 0
        assert sink.interrupts >= 1 and log.caller.timeouts >= 1
        ready, detail = log.status()
        assert ready and "hung sink failing" in detail and "did not answer" in detail
        for i in range(50, 80):  # still hung: these spill too, behind the first
            log.emit(usage_event(i))
        assert log.flush(30) and log.spilled == 80
        sink.thaw()
        for i in range(80, 90):
            log.emit(usage_event(i))

        def all_written() -> bool:
            log.flush(30)
            return log.written == 90 and not log.spill.pending()

        from tests.support.procs import wait_until

        wait_until(all_written, 30, "the spill replayed once the sink answers")
    finally:
        log.close()
    assert written(tmp_path / "events") == [f"req-{i}" for i in range(90)]  # in order
    # the ten emitted after the thaw may queue behind the spill (order is kept)
    assert log.lost == 0 and log.replayed == log.spilled >= 80
    assert log.status() == (True, "ledger hung ok")


def test_a_shutdown_while_the_sink_hangs_spills_everything(tmp_path):
    sink = Hung(tmp_path / "events")
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"), batch_events=1000,
                   flush_interval_s=3600, sink_timeout_s=30)
    log.start()
    for i in range(210):
        log.emit(usage_event(i))
    assert log.close() == 0  # the final call waits at most SHUTDOWN_WAIT_S, then spills
    assert (log.spilled, log.lost, log.written) == (210, 0, 0)
    spilled = [e.request_id for e in read_events([tmp_path / "spill.jsonl"])]
    assert spilled == [f"req-{i}" for i in range(210)]


def test_a_full_spill_loses_events_counted_and_the_ledger_says_not_ready(tmp_path):
    class Down(Picky):
        def write(self, events):
            raise SinkError("connection refused")

    size = sum(len(encode_line(usage_event(i))) for i in range(20))
    spill = SpillFile(tmp_path / "spill.jsonl", max_bytes=size + 200)
    log = EventLog(Down(tmp_path / "events"), spill, batch_events=10, flush_interval_s=3600)
    ledger = Ledger(log)
    m = Metrics()
    m.watch_ledger(ledger)
    for i in range(30):
        log.emit(usage_event(i))
    log.close()
    assert (log.spilled, log.lost) == (20, 10)  # two batches fit, the third is past the limit
    assert spill.waiting_bytes() == size
    ready, detail = log.status()
    assert not ready and "10 events LOST" in detail
    text = generate_latest(m.registry).decode()
    assert 'kt_ledger_events_total{state="lost"} 10.0' in text
    assert "kt_ledger_ready 0.0" in text and f"kt_ledger_spill_bytes {float(size)}" in text


def test_readyz_fails_while_ledger_events_are_lost_and_not_while_they_spill(tmp_path):
    import urllib.error
    import urllib.request

    from tests.support.inproc import RunningSidecar
    from tests.ledger.test_ledger_service import POLICY

    class Down(Picky):
        def write(self, events):
            raise SinkError("connection refused")

    (tmp_path / "blocker").write_text("not a directory")
    spill = SpillFile(tmp_path / "spill.jsonl")
    log = EventLog(Down(tmp_path / "events"), spill, flush_interval_s=0.01,
                   retry_interval_s=3600)
    led = Ledger(log, instance="t")

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(sc.http_base + "/readyz", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with RunningSidecar(POLICY, ledger=led) as sc:
        log.emit(usage_event(1))
        assert log.flush() and log.spilled == 1
        status, body = readyz()  # the sink is down, the event waits on local disk
        assert status == 200 and "ledger picky sink failing" in body, body
        spill.path = tmp_path / "blocker" / "spill.jsonl"  # and now the spill cannot be written
        log.emit(usage_event(2))
        assert log.flush() and log.lost == 1
        status, body = readyz()
        assert status == 503 and "1 events LOST" in body, body
        assert sc.sidecar.metrics.registry.get_sample_value("kt_ledger_ready") == 0


def test_a_slow_sink_gets_smaller_calls_instead_of_being_cut_off_for_good(tmp_path):
    class Slow(Picky):
        """Takes 20 ms per event: a full batch of 100 runs past the 0.5 s deadline."""

        def write(self, events):
            self.calls += 1
            threading.Event().wait(0.02 * len(events))
            self.files.write(events)
            self.sizes.append(len(events))

    sink = Slow(tmp_path / "events")
    sink.sizes = []
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"), batch_events=100,
                   flush_interval_s=0.01, retry_interval_s=0.05, sink_timeout_s=0.5)
    log.start()
    try:
        for i in range(200):
            log.emit(usage_event(i))

        def all_written() -> bool:
            log.flush(30)
            return not log.spill.pending() and not log.buffered and not log.last_error

        from tests.support.procs import wait_until

        wait_until(all_written, 60, "every event written in smaller calls")
    finally:
        log.close()
    assert log.caller.timeouts >= 1 and min(sink.sizes) < 25  # cut, then smaller calls
    got = written(tmp_path / "events")
    # calls cut at the deadline may have completed after all: each event at least once,
    # in order of first appearance, none lost
    assert list(dict.fromkeys(got)) == [f"req-{i}" for i in range(200)] and log.lost == 0
