"""What a provider quota costs a decision in process: _core.decide against
_core.decide_routed with two candidate providers (the first with room), on one core.

Usage: python bench/micro_providers.py [--n 1000000] [--runs 5]

Prints, for each, the median decisions per second of the runs and their spread; only the
ratio measured in one run means anything on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import time

from sidecar import _core


def run_once(routed: bool, n: int, tenants: int) -> float:
    lim = _core.Limits(rpm=10**9, tpm=10**12, burst=1.0, budget=10**15, budget_in_usd=True,
                       period=_core.P_MONTH, low_water=0.2, prices=((2500, 10000), (150, 600)))
    states = [_core.State() for _ in range(tenants)]
    cands = [(0, _core.Quota(rpm=10**9, tpm=10**12, floors=(0.2, 0.2, 0.0)), _core.QuotaState()),
             (0, _core.Quota(rpm=10**9, tpm=10**12), _core.QuotaState()),
             (1, _core.Quota(rpm=10**9, tpm=10**12), _core.QuotaState())]
    now = 1_795_000_000_000_000
    decide, decide_routed = _core.decide, _core.decide_routed
    t0 = time.perf_counter()
    if routed:
        for i in range(n):
            decide_routed(lim, states[i % tenants], now + i, 0, 500, 200, 700, False, 1, 1, cands)
    else:
        for i in range(n):
            decide(lim, states[i % tenants], now + i, 0, 500, 200, 700, False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tenants", type=int, default=1000)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"decide": [], "decide_routed": []}
    for _ in range(args.runs):  # interleaved: both see the same machine
        results["decide"].append(run_once(False, args.n, args.tenants))
        results["decide_routed"].append(run_once(True, args.n, args.tenants))
    for name, rates in results.items():
        print(f"{name:>14}: {statistics.median(rates):>12,.0f} decisions/s "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f}; "
              f"{1e6 / statistics.median(rates):.2f} us each)")
    ratio = statistics.median(results["decide_routed"]) / statistics.median(results["decide"])
    print(f"decide_routed / decide: {ratio:.2f}")


if __name__ == "__main__":
    main()
