"""Red-team probe: `kt serve` (embedded backend, or one Valkey) stopped while streams it admitted are
still running, then started again on the same state file and ports.

  PYTHONPATH=. python bench/redteam_shutdown.py [--signal TERM|KILL] [--streams 4] [--wait 2.5]
                                        [--max-tokens 4000]
                                        [--backend memory|redis]

A real Envoy from `kt envoy-config`'s renderer, the fake upstream (tests/support/upstream.py)
holding each stream after its first chunk. The streams are admitted, the sidecar is
signalled, the streams are released and end (their access-log entries find no sidecar),
the sidecar is started again. Printed: the upstream's bill (its x-fake-usage, priced),
the tenant's budget used (x-kt-budget-remaining of a probe the upstream fails, refunded)
and its durable spend (GET /v1/spend: settled, and held for requests never settled), in
nano-USD.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.envoy_config import EnvoyOptions, TierRoute, render  # noqa: E402
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port,  # noqa: E402
                                 wait_until, workdir)
from tests.support.upstream import FakeUpstream  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

LOOP = "127.0.0.1"
POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01, max_output_tokens: 16384}
defaults:
  limits: {rpm: 100000, tpm: 100000000}
  budget: {usd: 100, period: month}
tenants:
  streamer: {}
"""
USAGE = (1000, 3000)
BUDGET_NANO = 100 * 10**9


def post(port: int, body: dict, headers: dict) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(LOOP, port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"content-type": "application/json", "x-tenant-id": "streamer", **headers})
        r = conn.getresponse()
        try:
            data = r.read()
        except (http.client.IncompleteRead, ConnectionError):
            data = b""
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def budget_used(port: int) -> int:
    _, h, _ = post(port, {"model": "gpt-4o", "max_tokens": 1, "messages": []},
                   {"x-fake-status": "503"})
    usd = float(h.get("x-kt-budget-remaining", "nan"))
    return BUDGET_NANO - round(usd * 1e9)


def run(sig: signal.Signals, streams: int, wait_before_signal: float,
        max_tokens: int, backend: str) -> dict:
    with workdir("kt-redteam-stop-") as d, FakeUpstream("llm") as up, \
            (Valkey(d) if backend == "redis" else contextlib.nullcontext()) as v:
        (d / "policy.yaml").write_text(POLICY + (
            f'backend: {{kind: redis, url: "{v.url}"}}\n' if v is not None else ""))
        sc = SidecarProcess(d / "policy.yaml", d)
        grpc, http_, admin_port = free_port(), free_port(), free_port()
        sc.args[sc.args.index("--grpc") + 1] = f"{LOOP}:{grpc}"
        sc.args[sc.args.index("--http") + 1] = f"{LOOP}:{http_}"
        sc.args[sc.args.index("--admin") + 1] = f"{LOOP}:{admin_port}"
        sc.start()
        try:
            eadmin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=eadmin,
                                sidecar_address=f"{LOOP}:{grpc}",
                                tiers=[TierRoute("default", "gpt-4o", up.address)])
            with EnvoyProcess(render(opts), d, eadmin, listen):
                up.release_stream.clear()
                body = {"model": "gpt-4o", "stream": True,
                        "messages": [{"role": "user", "content": "A long story."}]}
                if max_tokens:
                    body["max_tokens"] = max_tokens
                results: list = []
                threads = [threading.Thread(target=lambda: results.append(post(
                    listen, body, {"x-fake-usage": "%d,%d" % USAGE}))) for _ in range(streams)]
                for t in threads:
                    t.start()
                wait_until(lambda: len(up.requests) == streams, 10, "streams admitted")
                used_admitted = budget_used(listen)
                time.sleep(wait_before_signal)  # past the snapshot's flush interval
                assert sc.proc is not None
                sc.proc.send_signal(sig)
                sc.proc.wait(15)
                exit_code = sc.proc.returncode
                up.release_stream.set()
                for t in threads:
                    t.join(30)
                time.sleep(1.0)  # Envoy tries to deliver the entries: no sidecar
                sc.start()
                time.sleep(1.0)
                used_after = budget_used(listen)
                time.sleep(0.5)
                with urllib.request.urlopen(
                        f"http://{LOOP}:{admin_port}/v1/spend", timeout=10) as r:
                    doc = json.load(r)
                tenants = doc["tenants"]
                spend = sum(m.get("cost_nano_usd", 0)
                            for m in tenants.get("streamer", {}).values())
                held = doc.get("held", {}).get("streamer", {}).get("amount", 0)
                bill = streams * (USAGE[0] * 2500 + USAGE[1] * 10_000)
                return {"signal": sig.name, "backend": backend, "exit_code": exit_code,
                        "statuses": [r[0] for r in results],
                        "bill_nano": bill, "budget_used_while_open_nano": used_admitted,
                        "budget_used_after_restart_nano": used_after,
                        "spend_after_restart_nano": spend,
                        "held_after_restart_nano": held,
                        "budget_minus_settled_minus_held_nano": used_after - spend - held,
                        "spend_records": tenants}
        finally:
            sc.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--signal", default="TERM", choices=["TERM", "KILL"])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--wait", type=float, default=2.5,
                    help="seconds between the admissions and the signal")
    ap.add_argument("--backend", default="memory", choices=["memory", "redis"])
    ap.add_argument("--max-tokens", type=int, default=4000, help="0: none in the body")
    args = ap.parse_args()
    print(json.dumps(run(getattr(signal, "SIG" + args.signal), args.streams, args.wait,
                         args.max_tokens, args.backend), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
