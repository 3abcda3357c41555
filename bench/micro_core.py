"""In-process decisions per second of the Cython core, on one core.

Usage: python bench/micro_core.py [--n 2000000] [--runs 5] [--json OUT]

Reports the median and spread of repeated runs, and, measured in the same run,
a reference: a do-nothing Cython-free Python call with the same arguments, so
the figure reads as a ratio to the cost of merely calling from Python.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from sidecar import _core


def _noop(lim, st, now, tier, i, o, f, c):
    return None


def run_once(fn, n: int, tenants: int) -> float:
    lim = _core.Limits(rpm=10**9, tpm=10**12, burst=1.0, budget=10**15, budget_in_usd=True,
                       period=_core.P_MONTH, low_water=0.2, prices=((2500, 10000), (150, 600)))
    states = [_core.State() for _ in range(tenants)]
    now = 1_795_000_000_000_000
    t0 = time.perf_counter()
    for i in range(n):
        fn(lim, states[i % tenants], now + i, 0, 200, 150, 350, False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--json", help="write results here")
    a = ap.parse_args()
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    except (AttributeError, OSError):
        pass
    run_once(_core.decide, 100_000, a.tenants)  # warm-up
    core = [run_once(_core.decide, a.n, a.tenants) for _ in range(a.runs)]
    noop = [run_once(_noop, a.n, a.tenants) for _ in range(a.runs)]
    res = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "decisions_per_s_median": statistics.median(core),
        "decisions_per_s_min": min(core), "decisions_per_s_max": max(core),
        "noop_calls_per_s_median": statistics.median(noop),
        "ratio_to_noop_call": statistics.median(core) / statistics.median(noop),
        "runs": a.runs, "n": a.n,
    }
    print(f"core.decide: {res['decisions_per_s_median']/1e6:.2f} M decisions/s median "
          f"(min {res['decisions_per_s_min']/1e6:.2f}, max {res['decisions_per_s_max']/1e6:.2f}, "
          f"{a.runs} runs of {a.n}); a do-nothing Python call with the same arguments: "
          f"{res['noop_calls_per_s_median']/1e6:.2f} M/s (ratio {res['ratio_to_noop_call']:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
