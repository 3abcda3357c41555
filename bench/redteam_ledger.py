"""Red-team probe: the PostgreSQL ledger fed hostile model names through a real Envoy, then
hung (SIGSTOP) while requests go on, then let go.

  PYTHONPATH=. python bench/redteam_ledger.py [--hang 8]

`kt serve` (embedded backend, `ledger: {sink: postgres}`), Envoy from `kt envoy-config`'s
renderer, the fake upstream (it serves and reports whatever model the body names). Sent:
normal requests, requests whose model is hostile (NUL, a lone surrogate, a newline and
ANSI escape, 60 KB), and requests while PostgreSQL is SIGSTOPped. Printed: requests
answered 200, rows in kt_usage_events, dead letters, /readyz during and after the hang,
the sidecar's ledger metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.attacks import request  # noqa: E402
from sidecar.envoy_config import EnvoyOptions, TierRoute, render  # noqa: E402
from sidecar.ledger.postgres import migrate  # noqa: E402
from tests.support.postgres import Postgres  # noqa: E402
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, workdir  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

LOOP = "127.0.0.1"
HOSTILE = ["gpt-4o\u0000", "\ud800gpt", "gpt\n\x1b[31mfake row", "m" * 60_000, "gpt-4o\\"]


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (PostgreSQL serves each connection from a child: a
    SIGSTOP of the postmaster alone hangs nothing)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def readyz(sc: SidecarProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LOOP}:{sc.http_port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()[:200]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()[:200]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hang", type=float, default=8.0)
    args = ap.parse_args()
    with workdir("kt-redteam-ledger-") as d, Postgres(d) as pg, FakeUpstream("llm") as up:
        migrate(pg.dsn)
        (d / "policy.yaml").write_text(f"""
tenant: {{header: x-tenant-id, unknown: defaults}}
tiers:
  - {{name: default, model: gpt-4o}}
pricing:
  gpt-4o: {{input: 0.0025, output: 0.01}}
defaults:
  limits: {{rpm: 100000, tpm: 100000000}}
ledger: {{sink: postgres, dsn: '{pg.dsn}', flush_interval_s: 0.05, retry_interval_s: 0.3,
          sink_timeout_s: 1}}
""")
        with SidecarProcess(d / "policy.yaml", d) as sc:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"{LOOP}:{sc.grpc_port}",
                                tiers=[TierRoute("default", "gpt-4o", up.address)])
            with EnvoyProcess(render(opts), d, admin, listen):
                ok, statuses = 0, {}

                def send(model: str) -> None:
                    nonlocal ok
                    body = json.dumps({"model": model, "max_tokens": 5, "messages": [
                        {"role": "user", "content": "hi"}]}).encode()
                    status, _, _ = request(listen, "POST", "/v1/chat/completions", body,
                                           {"content-type": "application/json",
                                            "x-tenant-id": "ledger-t"})
                    ok += status == 200
                    statuses[model[:12]] = status

                for _ in range(10):
                    send("gpt-4o")
                for m in HOSTILE:
                    send(m)
                time.sleep(1.0)
                assert pg.proc is not None
                stopped = family(pg.proc.pid)
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    for _ in range(20):
                        send("gpt-4o")
                    time.sleep(args.hang)
                    during = readyz(sc)
                finally:
                    for pid in stopped:
                        os.kill(pid, signal.SIGCONT)
                time.sleep(6.0)
                after = readyz(sc)
                text = sc.metrics()
                ledger = [line for line in text.splitlines()
                          if line.startswith(("kt_ledger_events_total", "kt_ledger_ready",
                                              "kt_ledger_sink_up", "kt_ledger_sink_timeouts"))]
                with psycopg.connect(pg.dsn) as conn:
                    rows = conn.execute("SELECT count(*) FROM kt_usage_events").fetchone()[0]
                    models = [r[0][:40] for r in conn.execute(
                        "SELECT DISTINCT model_served FROM kt_usage_events").fetchall()]
                dead = list(d.rglob("dead-letter*.jsonl"))
                print(json.dumps({"answered_200": ok, "statuses": statuses,
                                  "stopped_pids": len(stopped), "rows": rows, "models": models,
                                  "dead_letter_lines": sum(len(p.read_text().splitlines())
                                                           for p in dead),
                                  "readyz_during_hang": during, "readyz_after": after,
                                  "ledger_metrics": ledger}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
