"""Red-team probe: Valkey SIGSTOPped at the moment admitted streams end (their
settlements go out into the stall), then let go.

  PYTHONPATH=. python bench/redteam_valkey_stall.py [--streams 20] [--stall 3]

`kt serve` on one Valkey (default backend settings), Envoy from `kt envoy-config`'s
renderer, the fake upstream holding each stream after its first chunk (include_usage is
added by the gateway, so usage is readable). The streams are admitted, Valkey is stopped,
the streams are released (they end, their access-log entries reach the sidecar, whose
settlements meet the stall), Valkey is continued. Printed: the upstream's bill, the
budget used (a probe the upstream fails: refunded), GET /v1/spend, the settle outcomes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.redteam_shutdown import POLICY, budget_used, post  # noqa: E402
from sidecar.envoy_config import EnvoyOptions, TierRoute, render  # noqa: E402
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port,  # noqa: E402
                                 wait_until, workdir)
from tests.support.upstream import FakeUpstream  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

LOOP = "127.0.0.1"
USAGE = (1000, 3000)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--stall", type=float, default=3.0)
    args = ap.parse_args()
    with workdir("kt-redteam-stall-") as d, FakeUpstream("llm") as up, Valkey(d) as v:
        (d / "policy.yaml").write_text(POLICY + f'backend: {{kind: redis, url: "{v.url}"}}\n')
        with SidecarProcess(d / "policy.yaml", d) as sc:
            eadmin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=eadmin,
                                sidecar_address=f"{LOOP}:{sc.grpc_port}",
                                tiers=[TierRoute("default", "gpt-4o", up.address)])
            with EnvoyProcess(render(opts), d, eadmin, listen):
                up.release_stream.clear()
                body = {"model": "gpt-4o", "stream": True, "max_tokens": 4000,
                        "messages": [{"role": "user", "content": "A long story."}]}
                results: list = []
                threads = [threading.Thread(target=lambda: results.append(post(
                    listen, body, {"x-fake-usage": "%d,%d" % USAGE})))
                    for _ in range(args.streams)]
                for t in threads:
                    t.start()
                wait_until(lambda: len(up.requests) == args.streams, 15, "streams admitted")
                assert v.proc is not None
                os.kill(v.proc.pid, signal.SIGSTOP)
                try:
                    up.release_stream.set()
                    for t in threads:
                        t.join(30)
                    time.sleep(args.stall)
                finally:
                    os.kill(v.proc.pid, signal.SIGCONT)
                time.sleep(3.0)
                used = budget_used(listen)
                time.sleep(1.0)
                sc.wait_usage_delivered()
                cells = sc.spend().get("streamer", {})
                spend = sum(c.get("cost_nano_usd", 0) for c in cells.values())
                text = sc.metrics()
                outcomes = re.findall(r"^(kt_settle_outcomes_total\{[^}]*\} \S+)$", text, re.M)
                closed = re.findall(r"^(kt_reservations_closed_total\{[^}]*\} \S+)$", text, re.M)
                bill = sum(1 for r in results if r[0] == 200) * (USAGE[0] * 2500 + USAGE[1] * 10_000)
                print(json.dumps({"statuses": sorted({r[0] for r in results}),
                                  "served": sum(1 for r in results if r[0] == 200),
                                  "bill_nano": bill, "budget_used_nano": used,
                                  "spend_nano": spend, "settle_outcomes": outcomes,
                                  "reservations_closed": closed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
