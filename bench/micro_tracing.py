"""What traces cost (`kt serve --otlp-endpoint`, sidecar/tracing.py), in process: the same
requests decided and settled by the real flows (embedded backend, a tenant with a USD
budget), with tracing off and on, in alternating rounds of the same run.

- decide µs: the event loop's time per decision (nothing of tracing runs there);
- settle µs: the event loop's time per settlement (with tracing on: the span made and
  queued to the SDK's BatchSpanProcessor);
- CPU µs: the whole process's CPU per request, the exporter thread included (encoding
  and sending the batches over OTLP/HTTP to a receiver on loopback, whose own thread, a
  read and a 200, is counted too), after a flush of every span of the round.

  python bench/micro_tracing.py [--requests N] [--rounds R] [--sample-ratio X]

Prints the median (min-max) of R rounds of N requests each, off and on."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.backends.memory import MemoryBackend  # noqa: E402
from sidecar.flows import Flows  # noqa: E402
from sidecar.ledger.recorder import Ledger  # noqa: E402
from sidecar.model import Request  # noqa: E402
from sidecar.policy.load import parse_policy  # noqa: E402
from sidecar.tracing import RequestSpans  # noqa: E402

POLICY = b"""
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
defaults: {limits: {rpm: 100000000, tpm: 1000000000},
           budget: {usd: 1000000, period: month, low_water: 0.01}}
"""


class Receiver(ThreadingHTTPServer):
    """A collector's minimum: reads each export request and answers 200."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 (stdlib name)
                self.rfile.read(int(self.headers["content-length"]))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()


async def one_round(flows: Flows, spans, n: int, offset: int) -> tuple[float, float, float]:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 200,
                       "messages": [{"role": "user", "content": "hello " * 40}]}).encode()
    headers = [{"x-tenant-id": f"team-{i:03d}"} for i in range(50)]
    cpu0 = time.process_time()
    decide_s = settle_s = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        d = await flows.decider.decide(Request(headers=headers[i % 50], body=body))
        t1 = time.perf_counter()
        await flows.settlement.settle_usage(d.reservation_id, f"team-{i % 50:03d}", "gpt-4o",
                                            900, 200, "report")
        t2 = time.perf_counter()
        decide_s += t1 - t0
        settle_s += t2 - t1
    if spans is not None:
        assert spans.flush(30)
    cpu = time.process_time() - cpu0
    return decide_s / n * 1e6, settle_s / n * 1e6, cpu / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sample-ratio", type=float, default=1.0,
                    help="kt serve --otlp-sample-ratio for the rounds with tracing on")
    args = ap.parse_args()
    policy = parse_policy(POLICY, "<bench>")
    receiver = Receiver()
    spans = RequestSpans(f"http://127.0.0.1:{receiver.server_address[1]}", instance="bench",
                         sample_ratio=args.sample_ratio, max_queue_size=4 * args.requests)
    results: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}

    async def run() -> None:
        for r in range(args.rounds):
            for mode in ("off", "on"):  # alternating: the machine's drift hits both
                ledger = Ledger(None, instance="bench")
                ledger.spans = spans.request if mode == "on" else None
                flows = Flows(policy, MemoryBackend(), ledger=ledger)
                results[mode].append(await one_round(flows, spans if mode == "on" else None,
                                                     args.requests, r))

    asyncio.run(run())
    spans.close()
    receiver.shutdown()
    print(f"{args.requests} requests a round, {args.rounds} rounds, sample ratio "
          f"{args.sample_ratio}; median (min-max) µs per request")
    for k, name in enumerate(("decide (event loop)", "settle (event loop)",
                              "CPU, whole process")):
        cells = []
        for mode in ("off", "on"):
            v = [r[k] for r in results[mode]]
            cells.append(f"{mode} {statistics.median(v):6.2f} ({min(v):.2f}-{max(v):.2f})")
        print(f"{name:<22} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
