"""Does persisting the embedded backend's state stall decisions? Decision latency while
the state file of many tenants is flushed.

Usage: python bench/state_flush.py [--tenants 100000] [--seconds 6] [--churn 10000]
                                   [--interval 1.0] [--json OUT]
       python bench/state_flush.py --journal [--settlements 20000] [--batch 64]

Fills an embedded backend (sidecar/backends/memory.py) with `tenants` tenants that each
hold budget spend, started with a state file in a temporary directory (flushed every
`interval` seconds), lets the first snapshot (of every tenant) pass, then for `seconds` makes one decision every millisecond on the event
loop, charging `churn` tenants per second (so each snapshot has that many changed), and
records how late each decision was: the time from when its tick was due to when its
decision returned. A flush that runs on the event loop shows up as late decisions; one
that runs in a thread does not. Prints p50 / p99 / p99.9 / max lateness, the decisions
later than 10 ms and the snapshots written meanwhile (their sizes and timestamps).

--journal: what the journal costs a settlement (each is fsynced before it returns, many per
fsync): `settlements` settlements, `batch` at a time (as the access-log receiver settles a
message's entries together), with a state file and without one; settlements/s, the
process's CPU per settlement, and fsyncs (groups) per settlement.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sidecar import _core  # noqa: E402
from sidecar.backends.memory import MemoryBackend  # noqa: E402

LIMITS = _core.Limits(rpm=10**6, tpm=10**9, budget=10**12, period=_core.P_MONTH)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(tenants: int, seconds: float, churn: int, interval: float, state: str) -> dict:
    backend = MemoryBackend(state_file=state, flush_interval_s=interval)
    await backend.start()
    for i in range(tenants):
        backend.decide_now(f"tenant-{i}", LIMITS, 0, 10, 0, 10, False)
    # the first snapshot holds every tenant: measured from the next one on (the steady
    # state: `churn` tenants changed per snapshot)
    await asyncio.sleep(min(interval * 2, 3.0))
    snapshots: list[tuple[float, int]] = []
    last_stat = None
    late: list[float] = []
    per_tick = max(1, churn // 1000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    tick = 0
    n = 0
    while loop.time() - started < seconds:
        tick += 1
        due = started + tick / 1000
        await asyncio.sleep(max(0.0, due - loop.time()))
        for _ in range(per_tick):
            await backend.decide(f"tenant-{n % tenants}", LIMITS, 0, 10, 0, 10, False)
            n += 1
        late.append(loop.time() - due)
        try:
            st = os.stat(state)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != last_stat:
                last_stat = stamp
                snapshots.append((loop.time() - started, st.st_size))
        except FileNotFoundError:
            pass
    await backend.close()
    ms = [x * 1000 for x in late]
    return {"tenants": tenants, "seconds": seconds, "churn_per_s": churn,
            "interval_s": interval, "ticks": len(ms),
            "late_ms": {"p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99),
                        "p999": percentile(ms, 0.999), "max": max(ms),
                        "mean": statistics.fmean(ms)},
            "decisions_later_than_10ms": sum(1 for x in ms if x > 10),
            "snapshots_seen": len(snapshots),
            "snapshot_bytes": snapshots[-1][1] if snapshots else 0}


async def journal(settlements: int, batch: int, state: str) -> dict:
    start = _core.period_bounds(time.time_ns() // 1000, _core.P_MONTH)[0]
    out = {}
    for label, path in (("without_state_file", ""), ("with_state_file", state)):
        backend = MemoryBackend(state_file=path, flush_interval_s=3600)
        await backend.start()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, settlements, batch):
            await asyncio.gather(*(backend.settle(f"tenant-{j % 1000}", LIMITS, f"r-{j}", 5, 5,
                                                  start)
                                   for j in range(i, min(i + batch, settlements))))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await backend.close()
        out[label] = {"settlements_per_s": settlements / wall,
                      "cpu_us_per_settlement": 1e6 * cpu / settlements}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--churn", type=int, default=10_000, help="tenants charged per second")
    ap.add_argument("--interval", type=float, default=1.0, help="flush interval (s)")
    ap.add_argument("--journal", action="store_true", help="measure the journal instead")
    ap.add_argument("--settlements", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    if a.journal:
        with tempfile.TemporaryDirectory(prefix="kt-bench-state-") as d:
            res = asyncio.run(journal(a.settlements, a.batch, os.path.join(d, "spend.json")))
        for label, r in res.items():
            print(f"journal, {a.settlements} settlements {a.batch} at a time, {label}: "
                  f"{r['settlements_per_s']:.0f}/s, {r['cpu_us_per_settlement']:.1f} µs CPU each")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
        return
    with tempfile.TemporaryDirectory(prefix="kt-bench-state-") as d:
        res = asyncio.run(run(a.tenants, a.seconds, a.churn, a.interval,
                              os.path.join(d, "spend.json")))
    lm = res["late_ms"]
    print(f"state flush, {res['tenants']} tenants, {res['churn_per_s']} charged/s, flush every "
          f"{res['interval_s']} s: decision lateness p50 {lm['p50']:.2f} ms, p99 {lm['p99']:.2f} "
          f"ms, p99.9 {lm['p999']:.2f} ms, max {lm['max']:.2f} ms; "
          f"{res['decisions_later_than_10ms']} of {res['ticks']} ticks later than 10 ms; "
          f"{res['snapshots_seen']} snapshots seen ({res['snapshot_bytes']} bytes)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
