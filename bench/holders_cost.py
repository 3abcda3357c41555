"""What a three-level decision (key -> team -> org, docs/budgets.md) costs against a
one-level one on the Redis backend, in one run: the sidecar's CPU per decision (this
process: the Decider, the batcher, the encoding) and Valkey's CPU per decision (INFO cpu
deltas), rounds alternated on one Valkey started here. Decisions go through the Decider
as a transport sends them, 32 at a time (batched per event-loop tick, as in production).

The one-level tenants decide without capacity leases (--leases adds a third row with
them): a lease moves a hot tenant's decisions into the process, which a path never does,
so the Valkey path is the fair comparison.

  python bench/holders_cost.py [--decisions N] [--rounds R] [--leases]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import uvloop  # noqa: E402

from sidecar.backends.redis import RedisBackend  # noqa: E402
from sidecar.flows import Flows  # noqa: E402
from sidecar.model import Request  # noqa: E402
from sidecar.policy.load import parse_policy  # noqa: E402
from tests.support.procs import workdir  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

TENANTS = 200
CONCURRENCY = 32
HUGE = 10**12  # budgets and limits no run reaches: every decision is admitted


def policy_text(url: str, leases: bool) -> str:
    lines = [
        "tenant: {header: x-tenant-id, unknown: deny}",
        "tiers: [{name: premium, model: gpt-4o}, {name: economy, model: gpt-4o-mini}]",
        "pricing: {gpt-4o: {input: 0.0025, output: 0.01}, gpt-4o-mini: {input: 0.00015, output: 0.0006}}",
        f"backend: {{kind: redis, url: '{url}', leases: {'true' if leases else 'false'}, timeout_ms: 2000}}",
        "tenants:",
        "  org: {budget: {usd: 9000000, period: month}}",
        "  team: {parent: org, budget: {usd: 9000000, period: month}}",
    ]
    for i in range(TENANTS):
        own = f"limits: {{rpm: {HUGE}, tpm: {HUGE}}}, budget: {{usd: 9000000, period: day}}"
        lines.append(f"  flat-{i}: {{{own}}}")
        lines.append(f"  key-{i}: {{parent: team, {own}}}")
    return "\n".join(lines) + "\n"


BODY = json.dumps({"model": "gpt-4o", "max_tokens": 50,
                   "messages": [{"role": "user", "content": "hello there"}]}).encode()


async def one_round(flows: Flows, prefix: str, n: int) -> float:
    """Process CPU seconds for n decisions of tenants ``prefix``-i."""
    requests = [Request(headers={"x-tenant-id": f"{prefix}-{i % TENANTS}"}, body=BODY)
                for i in range(n)]
    start = time.process_time()
    for at in range(0, n, CONCURRENCY):
        out = await asyncio.gather(*(flows.decider.decide(r)
                                     for r in requests[at:at + CONCURRENCY]))
        if not all(d.admitted for d in out):
            raise SystemExit(f"a decision was refused: {[d for d in out if not d.admitted][:1]}")
    return time.process_time() - start


def valkey_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


async def main_async(a: argparse.Namespace, url: str, r: redis.Redis) -> dict:
    rows = {"one level": ("flat", False), "three levels": ("key", False)}
    if a.leases:
        rows["one level, leases on"] = ("flat", True)
    flows = {}
    for name, (prefix, leases) in rows.items():
        policy = parse_policy(policy_text(url, leases).encode(), "<bench>")
        backend = RedisBackend(policy.backend)
        await backend.start()
        flows[name] = Flows(policy, backend)
        await one_round(flows[name], prefix, 2 * TENANTS)  # warm: keys, encodings
    results: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in rows}
    for _ in range(a.rounds):
        for name, (prefix, _) in rows.items():
            before = valkey_cpu(r)
            cpu = await one_round(flows[name], prefix, a.decisions)
            results[name][0].append(cpu / a.decisions * 1e6)
            results[name][1].append((valkey_cpu(r) - before) / a.decisions * 1e6)
    for f in flows.values():
        await f.backend.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--leases", action="store_true")
    a = ap.parse_args()
    with workdir() as d, Valkey(d) as v:
        r = redis.Redis(port=v.port)
        results = uvloop.run(main_async(a, v.url, r))
    base_cpu = statistics.median(results["one level"][0])
    base_valkey = statistics.median(results["one level"][1])
    for name, (cpu, vk) in results.items():
        print(f"{name:>22}: sidecar {statistics.median(cpu):6.1f} µs CPU/decision "
              f"(min {min(cpu):.1f}, max {max(cpu):.1f}), x{statistics.median(cpu) / base_cpu:.2f}; "
              f"Valkey {statistics.median(vk):5.1f} µs CPU/decision "
              f"(min {min(vk):.1f}, max {max(vk):.1f}), x{statistics.median(vk) / base_valkey:.2f}")
    print(f"({a.rounds} alternated rounds of {a.decisions} decisions, {CONCURRENCY} at a time, "
          f"{TENANTS} tenants each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
