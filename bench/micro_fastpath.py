"""The fast path's own Python, in process: HTTP ext_authz requests as Envoy sends them,
fed to the sidecar's protocol objects (32 connections, one request in flight on each,
as behind Envoy) on uvloop, answered from the embedded backend with the bench policy.
No sockets, no Envoy, no Redis: what is left is the sidecar's per-request CPU from
parse to rendered answer, the part a code change can move.

With ``--backend redis`` the decisions go to a real Valkey (started here, on a loopback
port) with the bench's policy, leases on, as bench/run.py's fast path runs: its tenants
are hot, so most decisions are made within leases; the CPU counted is this process's only
(the sidecar's part, Valkey's not).

  python bench/micro_fastpath.py [--requests N] [--runs R] [--profile] [--backend redis
                                 [--no-leases]]

Prints the median (min–max) of R runs in µs of CPU per request and requests/s of CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import statistics
import sys
import time
import uuid
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import TENANTS, body, policy  # noqa: E402
from sidecar.backends.memory import MemoryBackend  # noqa: E402
from sidecar.backends.redis import RedisBackend  # noqa: E402
from sidecar.policy.load import parse_policy  # noqa: E402
from sidecar.flows import Flows  # noqa: E402
from sidecar.transports.http_authz import AuthzProtocol  # noqa: E402

CONNECTIONS = 32


class _Transport:
    """Collects what the protocol writes; counts answers."""

    def __init__(self) -> None:
        self.answers = 0

    def write(self, data: bytes) -> None:
        self.answers += 1

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the fast path closed a well-formed keep-alive connection")


def requests(n: int) -> list[bytes]:
    payload = body("chat_short").encode()
    out = []
    for i in range(n):
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: kt\r\n"
                f"content-type: application/json\r\nx-tenant-id: t{i % TENANTS}\r\n"
                f"x-request-id: {uuid.uuid4()}\r\ncontent-length: {len(payload)}\r\n\r\n")
        out.append(head.encode() + payload)
    return out


async def one_run(service: Flows, reqs: list[bytes]) -> float:
    protos, transports = [], []
    for _ in range(CONNECTIONS):
        p, t = AuthzProtocol(service.decider), _Transport()
        p.connection_made(t)  # type: ignore[arg-type]
        protos.append(p)
        transports.append(t)
    start = time.process_time()
    sent = 0
    while sent < len(reqs):
        for p in protos:
            if sent < len(reqs):
                p.data_received(reqs[sent])
                sent += 1
        while sum(t.answers for t in transports) < sent:
            await asyncio.sleep(0)
    took = time.process_time() - start
    for p in protos:
        p.connection_lost(None)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one run, top functions")
    ap.add_argument("--backend", choices=["memory", "redis"], default="memory")
    ap.add_argument("--no-leases", action="store_true",
                    help="--backend redis: every decision in Redis (backend.leases: false)")
    a = ap.parse_args()
    with contextlib.ExitStack() as stack:
        return measure(a, stack)


def measure(a: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    loop = uvloop.new_event_loop()
    if a.backend == "redis":
        from tests.support.procs import workdir
        from tests.support.valkey import Valkey

        valkey = stack.enter_context(Valkey(stack.enter_context(workdir())))
        text = policy(valkey.url)
        if a.no_leases:
            text = text.replace("leases: true", "leases: false")
        pol = parse_policy(text.encode(), "<bench policy, redis>")
        backend = RedisBackend(pol.backend)  # type: ignore[arg-type]
        loop.run_until_complete(backend.start())
        stack.callback(lambda: loop.run_until_complete(backend.close()))
        service = Flows(pol, backend)
    else:
        text = policy("redis://unused")
        pol = parse_policy(text[:text.index("backend:")].encode(), "<bench policy, embedded>")
        service = Flows(pol, MemoryBackend())
    reqs = requests(a.requests)
    loop.run_until_complete(one_run(service, reqs[:2000]))  # warm caches
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        loop.run_until_complete(one_run(service, reqs))
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    per_req = [loop.run_until_complete(one_run(service, reqs)) / len(reqs) * 1e6
               for _ in range(a.runs)]
    med = statistics.median(per_req)
    print(f"fast path in process: {med:.1f} µs CPU per request (min {min(per_req):.1f}, "
          f"max {max(per_req):.1f}; {a.runs} runs of {a.requests}) = "
          f"{1e6 / med:,.0f} requests per CPU-second; backend {a.backend}")
    backend = service.backend
    if isinstance(backend, RedisBackend) and backend.leases is not None:
        stats = backend.leases.stats
        print(f"  decisions within leases: {stats['local_decisions'] / backend.decisions:.3f}, "
              f"round trips per decision {backend.round_trips / backend.decisions:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
