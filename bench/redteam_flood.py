"""Red-team probe: a flood spread over invented tenant ids (`unknown: defaults`), so no
tenant's own limit or queue share holds it back, against one `kt serve` on a healthy Valkey.

  PYTHONPATH=. python bench/redteam_flood.py [--connections 64] [--tenants 500]
                                             [--seconds 10] [--usage als] [--rpm 600]

A real Envoy from `kt envoy-config --config`'s options (authz, the usage access log by
default, the sidecar clusters' breakers sized from the queue), the fake upstream, the flood
generator of tests/support/flood.py (keep-alive connections, nice 10). Defaults: low
priority, --rpm each (600: never the limit here), a queue of 1,000. In the middle, 20
requests of a high-priority named tenant at once. Printed: answers by status, decisions
by kind (allow, fail_open, overloaded...), failure-mode decisions, Envoy's breaker
overflows, the vip's admitted of 20, the sidecar's first warnings.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.cli import provider_options  # noqa: E402
from sidecar.envoy_config import EnvoyOptions, TierRoute, render  # noqa: E402
from sidecar.policy.load import load_policy  # noqa: E402
from tests.support.flood import FloodStack, run_flood  # noqa: E402
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, workdir  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

LOOP = "127.0.0.1"
POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
defaults: {priority: low, limits: {rpm: %d}}
tenants:
  vip: {limits: {rpm: 6000}, priority: high}
queue: {max_wait_ms: 2000, max_size: 1000}
backend: {kind: redis, url: "%s"}
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--tenants", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rpm", type=int, default=600, help="each invented tenant's rpm")
    ap.add_argument("--usage", default="als", choices=["als", "none"])
    args = ap.parse_args()
    with workdir("kt-redteam-flood-") as d, FakeUpstream("default") as up, Valkey(d) as v:
        (d / "policy.yaml").write_text(POLICY % (args.rpm, v.url))
        policy = load_policy(d / "policy.yaml")
        with SidecarProcess(d / "policy.yaml", d) as sc:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"{LOOP}:{sc.grpc_port}", mode="authz",
                                usage=args.usage,
                                tiers=[TierRoute("default", "gpt-4o", up.address),
                                       TierRoute("compact", "gpt-4o-mini", up.address)],
                                **provider_options(policy))
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                s = FloodStack(d, sc, envoy)
                tenants = [f"inv-{i}" for i in range(args.tenants)]
                counts, vip = run_flood(listen, tenants, args.connections, args.seconds,
                                        "vip", 20, args.seconds / 2)
                text = sc.metrics()
                decisions: dict[str, float] = {}
                for kind, value in re.findall(
                        r'^kt_requests_total\{decision="(\w+)"[^}]*\} (\S+)$', text, re.M):
                    decisions[kind] = decisions.get(kind, 0) + float(value)
                print(json.dumps({
                    "connections": args.connections, "tenants": args.tenants,
                    "seconds": args.seconds, "answers": counts, "decisions": decisions,
                    "failure_mode": s.failure_mode_decisions(),
                    "breaker_overflows": sum(s.breaker_overflows().values()),
                    "vip_admitted_of_20": sum(x == 200 for x in vip),
                    "warnings": s.log_warnings(5)},
                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
