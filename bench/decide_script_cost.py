"""Valkey's CPU per decision for lua/decide.lua (as decide_one.lua sends it) of this tree and
of another checkout, in one Valkey, rounds alternated: what a change to the scripts costs
Redis (INFO cpu deltas over pipelined EVALSHA calls, 200 tenants with a budget; the
network read and parse of the pipeline are included, the same for both).

  python bench/decide_script_cost.py --against /path/to/other/checkout [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tests.support.procs import workdir  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

FILES = ("common.lua", "decide.lua", "deadline.lua", "decide_one.lua")
CALLS = 20_000


def source(tree: Path) -> str:
    return "\n".join((tree / "lua" / f).read_text() for f in FILES)


def cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, type=Path, help="another checkout's root")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    with workdir() as d, Valkey(d) as v:
        r = redis.Redis(port=v.port)
        shas = {"this tree": r.script_load(source(ROOT)),
                str(a.against): r.script_load(source(a.against))}
        per_call: dict[str, list[float]] = {name: [] for name in shas}
        for _ in range(a.rounds):
            for n, (name, sha) in enumerate(shas.items()):
                before = cpu(r)
                p = r.pipeline(transaction=False)
                for i in range(CALLS):
                    t = f"t{n}-{i % 200}"
                    # decide.lua's ARGV: server clock, tier 0, 100 + 50 tokens, rpm 10^9,
                    # tpm 10^12, a day's budget of 10^15 nano-USD, one tier; no deadline
                    p.evalsha(sha, 3, f"kt:{{{t}}}:rpm", f"kt:{{{t}}}:tpm", f"kt:{{{t}}}:budget",
                              0, 0, 100, 50, 100, 0, 10**9, 10**12, 1.0, 10**15, 1, 2, 0.0, 1,
                              2500, 10000, 0)
                    if len(p) >= 1000:
                        p.execute()
                p.execute()
                per_call[name].append((cpu(r) - before) / CALLS * 1e6)
        for name, xs in per_call.items():
            print(f"{name}: {statistics.median(xs):.2f} µs of Valkey CPU per decision "
                  f"(min {min(xs):.2f}, max {max(xs):.2f}; {a.rounds} rounds of {CALLS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
