"""Policy size: load time and memory of large policies, and what a live reload costs the
decisions running meanwhile.

Usage: python bench/policy_load.py [--tenants 10000 100000] [--skip-reload] [--json OUT]

For each size N it writes a policy with N tenants (block-style YAML, as a ConfigMap holds
it: a mix of limits, token and USD budgets, priorities) and measures, each in a fresh
process so the figures do not mix:

- load: ``load_policy`` (read, parse, validate, compile) wall time, and the process's RSS
  before, after and at peak (ru_maxrss);
- reload: a running sidecar (embedded backend, the server's own reload loop) makes
  decisions back to back on its event loop while the file is replaced by the N-tenant
  policy; reported: how long until the new policy served, the longest gap between two
  consecutive decisions during that time (the stall), and the same gap measured before
  the file changed (the baseline on this machine).

The red-team baseline (issue 11) on this machine class: 100,000 tenants took 615 s and
1.29 GB in `kt check-config`, and a live reload of them stopped every decision for 119 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def policy_text(tenants: int, variant: int = 0) -> str:
    """A policy with ``tenants`` tenants; ``variant`` changes every limit slightly, so a
    reload really has new values to compile."""
    lines = [
        "tenant: {header: x-tenant-id, unknown: defaults}",
        "tiers:",
        "  - {name: default, model: gpt-4o}",
        "  - {name: compact, model: gpt-4o-mini}",
        "pricing:",
        "  gpt-4o: {input: 0.0025, output: 0.01}",
        "  gpt-4o-mini: {input: 0.00015, output: 0.0006}",
        "defaults:",
        "  limits: {rpm: 60, tpm: 20000}",
        "  budget: {tokens: 100000, period: day, low_water: 0.2}",
        "backend: {kind: memory, state_file: ''}",
        "tenants:",
    ]
    for i in range(tenants):
        name = f"tenant-{i:07d}"
        rpm = 60 + (i % 50) * 10 + variant
        tpm = 20000 + (i % 97) * 1000 + variant
        lines.append(f"  {name}:")
        lines.append(f"    priority: {('low', 'normal', 'high')[i % 3]}")
        lines.append("    limits:")
        lines.append(f"      rpm: {rpm}")
        lines.append(f"      tpm: {tpm}")
        if i % 4 == 0:
            lines.append("      burst: 1.5")
        lines.append("    budget:")
        if i % 2 == 0:
            lines.append(f"      usd: {10 + i % 200}")
            lines.append("      period: month")
        else:
            lines.append(f"      tokens: {100000 + (i % 31) * 5000}")
            lines.append("      period: day")
        lines.append("      low_water: 0.2")
    return "\n".join(lines) + "\n"


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def child_load(path: str) -> dict:
    from sidecar.policy.load import load_policy

    before = _rss_kb()
    t0 = time.perf_counter()
    policy = load_policy(path)
    elapsed = time.perf_counter() - t0
    after = _rss_kb()
    peak = _hwm_kb()  # VmHWM: ru_maxrss would carry the parent's peak across exec
    return {"tenants": len(policy.tenants), "load_s": elapsed, "rss_before_mb": before / 1024,
            "rss_after_mb": after / 1024, "rss_peak_mb": peak / 1024}


def child_reload(path: str, tenants: int) -> dict:
    import asyncio

    from sidecar.model import Request
    from sidecar.server import Sidecar
    from sidecar.server_config import ServerConfig

    Path(path).write_text(policy_text(10))  # a small policy to start from

    async def main() -> dict:
        cfg = ServerConfig(grpc_addr="127.0.0.1:0", http_addr="127.0.0.1:0", policy_path=path,
                           reload_interval_s=0.1, grace_s=0.1)
        sc = Sidecar(cfg)
        await sc.start()
        req = Request(headers={"x-tenant-id": "tenant-0000001"}, tokens=10)
        try:
            def reloads() -> float:
                return sc.metrics.policy_reloads.labels("ok")._value.get()

            async def decide_for(seconds: float, until=None) -> tuple[int, float]:
                n, worst = 0, 0.0
                last = time.perf_counter()
                end = last + seconds
                while True:
                    await sc.service.decider.decide(req)
                    await asyncio.sleep(0)  # let the loop's other work run, as a server's would
                    now = time.perf_counter()
                    worst = max(worst, now - last)
                    last = now
                    n += 1
                    if until is not None and until():
                        return n, worst
                    if now > end:
                        return n, worst

            n0, base_gap = await decide_for(2.0)
            start_reloads = reloads()
            Path(path + ".tmp").write_text(policy_text(tenants, variant=1))
            os.replace(path + ".tmp", path)
            t0 = time.perf_counter()
            n1, gap = await decide_for(3600.0, until=lambda: reloads() > start_reloads)
            swapped = time.perf_counter() - t0
            assert len(sc.policy.tenants) == tenants, "the new policy is not serving"
            return {"tenants": tenants, "reload_to_serving_s": swapped,
                    "max_decision_gap_during_reload_ms": gap * 1000,
                    "decisions_during_reload": n1,
                    "max_decision_gap_before_ms": base_gap * 1000,
                    "decisions_per_s_before": n0 / 2.0}
        finally:
            await sc.stop()

    return asyncio.run(main())


def run_child(mode: str, path: str, tenants: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, path, str(tenants)],
                         capture_output=True, text=True, cwd=REPO, check=False,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--skip-reload", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        mode, path, n = a.child
        res = child_load(path) if mode == "load" else child_reload(path, int(n))
        print(json.dumps(res))
        return
    import yaml

    results = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, "
                          f"Python {platform.python_version()}, PyYAML {yaml.__version__}, "
                          f"libyaml {'yes' if getattr(yaml, '__with_libyaml__', False) else 'no'}",
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="kt-policy-bench-") as d:
        for n in a.tenants:
            path = os.path.join(d, f"policy-{n}.yaml")
            Path(path).write_text(policy_text(n))
            size_mb = os.path.getsize(path) / 1e6
            load = run_child("load", path, n)
            row = {"tenants": n, "file_mb": size_mb, **load}
            print(f"{n:>7} tenants ({size_mb:.1f} MB YAML): load_policy {load['load_s']:.2f} s, "
                  f"RSS {load['rss_before_mb']:.0f} -> {load['rss_after_mb']:.0f} MB "
                  f"(peak {load['rss_peak_mb']:.0f} MB)", flush=True)
            # the same policy as JSON (what a generator would write): msgspec reads it
            jpath = os.path.join(d, f"policy-{n}.json")
            Path(jpath).write_text(json.dumps(yaml.load(Path(path).read_bytes(),
                                                        Loader=yaml.CSafeLoader)))
            jload = run_child("load", jpath, n)
            row["json"] = {"file_mb": os.path.getsize(jpath) / 1e6, **jload}
            print(f"{'':>7} as JSON ({row['json']['file_mb']:.1f} MB): load_policy "
                  f"{jload['load_s']:.2f} s, RSS {jload['rss_before_mb']:.0f} -> "
                  f"{jload['rss_after_mb']:.0f} MB (peak {jload['rss_peak_mb']:.0f} MB)",
                  flush=True)
            if not a.skip_reload:
                rel = run_child("reload", os.path.join(d, f"live-{n}.yaml"), n)
                row["reload"] = rel
                print(f"{'':>7} live reload: serving after {rel['reload_to_serving_s']:.2f} s; "
                      f"longest gap between decisions {rel['max_decision_gap_during_reload_ms']:.1f} ms "
                      f"(before the change: {rel['max_decision_gap_before_ms']:.1f} ms, "
                      f"{rel['decisions_per_s_before']:.0f} decisions/s), "
                      f"{rel['decisions_during_reload']} decisions during the reload", flush=True)
            results["runs"].append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
