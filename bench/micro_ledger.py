"""What the ledger costs the event loop, in process: µs per call of each hook the decision
service makes (budget_seen after every decision with a budget, refused per refusal,
closed per settlement: build the event, append to the writer's deque). The writer thread's
own cost (encode, write, fsync) is off the loop; bench/ledger_sizing.py measures it.

  python bench/micro_ledger.py [--calls N] [--runs R]

Prints the median (min–max) of R runs."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.ledger.recorder import Ledger  # noqa: E402
from sidecar.ledger.sinks import FileSink, SpillFile  # noqa: E402
from sidecar.ledger.writer import EventLog  # noqa: E402


def measure(fn, calls: int) -> float:
    started = time.perf_counter()
    fn(calls)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        # writer not started: emit() appends to the deque only, as on the loop; the
        # buffer is sized so nothing is refused
        events = EventLog(FileSink(d, fsync=False), SpillFile(Path(d) / "spill.jsonl"),
                          buffer_events=10 * args.calls + 10)
        led = Ledger(events, instance="bench")
        tenants = [f"team-{i:03d}" for i in range(50)]

        def budget_seen(n: int) -> None:
            for i in range(n):
                t = tenants[i % 50]
                led.budget_seen(t, t, "usd", 50_000_000_000, (i % 1000) * 1000, 0)

        def refused(n: int) -> None:
            for i in range(n):
                led.refused(tenants[i % 50], "rate_limited", 1_800_000_000_000_000 + i)

        def closed(n: int) -> None:
            for i in range(n):
                led.closed(request_id=f"req-{i}", tenant=tenants[i % 50], outcome="settled",
                           settled_by="ext_proc_json", decided_us=1_800_000_000_000_000,
                           model_asked="gpt-4o", model_served="gpt-4o", tier="default",
                           decision="allow", estimate_tokens=1200, input_tokens=900,
                           output_tokens=200, cached_tokens=0, cost_nano_usd=4_250_000,
                           budget_unit="usd", budget_charge=4_250_000)
            events._buf.clear()

        for name, fn in (("budget_seen (every decision with a budget)", budget_seen),
                         ("refused (every refusal)", refused),
                         ("closed (every settlement: event built and queued)", closed)):
            runs = [measure(fn, args.calls) for _ in range(args.runs)]
            print(f"{name:<52} {statistics.median(runs):6.2f} µs "
                  f"({min(runs):.2f}-{max(runs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
