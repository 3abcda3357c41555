"""A flood of the admission queue through a real Envoy, for tests/e2e/test_queue_flood.py and
bench/attacks.py (queue_flood, queue_spam).

The stack is what an operator deploys: `kt serve` (embedded backend or one Valkey), the
Envoy config `kt envoy-config --config <policy>` prints (its ext_authz timeout over the
queue's wait, its circuit breakers on the sidecar's clusters), and a fake LLM upstream.
The flood is many keep-alive connections, each sending the next request as soon as the
last is answered; what is counted: answers by status, decisions by the failure mode (the
sidecar's own metrics), and Envoy's overflows of its circuit breaker to the sidecar.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from sidecar.cli import provider_options
from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from sidecar.policy.load import load_policy
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, workdir
from tests.support.upstream import FakeUpstream
from tests.support.valkey import Valkey

LOOP = "127.0.0.1"

# three low-priority tenants at rpm 60, one high-priority tenant with room to spare
FLOOD_POLICY = """
tenant: {header: x-tenant-id, unknown: deny}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
tenants:
  low-a: {limits: {rpm: 60}, priority: low}
  low-b: {limits: {rpm: 60}, priority: low}
  low-c: {limits: {rpm: 60}, priority: low}
  vip: {limits: %(vip_limits)s, priority: high}
queue: {%(queue)s}
backend: %(backend)s
"""


@dataclass
class FloodStack:
    workdir: Path
    sidecar: SidecarProcess
    envoy: EnvoyProcess

    @property
    def port(self) -> int:
        return self.envoy.listen_port

    def failure_mode_decisions(self) -> float:
        """Decisions the sidecar answered by its failure mode (any mode)."""
        text = self.sidecar.metrics()
        return sum(float(v) for v in re.findall(
            r"^kt_failure_mode_decisions_total\{[^}]*\} (\S+)$", text, re.M))

    def log_warnings(self, n: int = 5) -> list[str]:
        """The sidecar's first warnings and errors (why a failure mode answered)."""
        lines = self.sidecar.log.read_text(errors="replace").splitlines()
        return [line for line in lines if " WARNING " in line or " ERROR " in line][:n]

    def decisions(self, kind: str) -> float:
        return sum(float(v) for v in re.findall(
            rf'^kt_requests_total\{{decision="{kind}"[^}}]*\}} (\S+)$',
            self.sidecar.metrics(), re.M))

    def breaker_overflows(self) -> dict[str, int]:
        """Envoy's circuit-breaker overflows on the sidecar's clusters (its admin stats)."""
        url = f"http://{LOOP}:{self.envoy.admin_port}/stats?filter=^cluster\\.kt_sidecar"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as r:
            text = r.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name.endswith("_overflow"):
                out[name] = int(value)
        return out


@contextlib.contextmanager
def flood_stack(backend: str, queue: str, vip_limits: str = "{rpm: 6000}",
                redis_settings: str = "") -> Iterator[FloodStack]:
    """``backend``: "redis" (one Valkey, default settings but ``redis_settings``, e.g.
    "timeout_ms: 150") or "memory"; ``queue``: the policy's queue settings (inside the
    braces); ``vip_limits``: the high-priority tenant's limits."""
    with workdir("kt-flood-") as d, FakeUpstream("default") as up, \
            (Valkey(d) if backend == "redis" else contextlib.nullcontext()) as v:
        text = FLOOD_POLICY % {
            "queue": queue, "vip_limits": vip_limits,
            "backend": f'{{kind: redis, url: "{v.url}", {redis_settings}}}' if v is not None
            else '{kind: memory, state_file: ""}'}
        (d / "policy.yaml").write_text(text)
        policy = load_policy(d / "policy.yaml")
        with SidecarProcess(d / "policy.yaml", d) as sc:
            admin, listen = free_port(), free_port()
            # what `kt envoy-config --config policy.yaml` prints, with this test's ports
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"{LOOP}:{sc.grpc_port}", mode="authz",
                                usage="none",
                                tiers=[TierRoute("default", "gpt-4o", up.address),
                                       TierRoute("compact", "gpt-4o-mini", up.address)],
                                **provider_options(policy))
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                yield FloodStack(d, sc, envoy)


def _request(tenant: str) -> bytes:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-tenant-id: {tenant}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _answer(reader: asyncio.StreamReader) -> int:
    """One HTTP/1.1 response read off a keep-alive connection: its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _connection(port: int, tenant: str, until: float, counts: dict,
                      statuses: Optional[list] = None, limit: int = 0) -> None:
    """Requests one after another on one connection until ``until`` (or ``limit`` sent)."""
    request = _request(tenant)
    writer = None
    sent = 0
    try:
        reader, writer = await asyncio.open_connection(LOOP, port)
        while time.monotonic() < until and (not limit or sent < limit):
            writer.write(request)
            sent += 1
            status = await _answer(reader)
            counts[status] = counts.get(status, 0) + 1
            if statuses is not None:
                statuses.append(status)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
    finally:
        if writer is not None:
            writer.close()


async def flood(port: int, tenants: list[str], connections: int, seconds: float,
                vip: str = "", vip_requests: int = 0, vip_after_s: float = 0.0
                ) -> tuple[dict, list[int]]:
    """``connections`` keep-alive connections spread over ``tenants`` for ``seconds``;
    after ``vip_after_s``, ``vip_requests`` requests of tenant ``vip`` at once, each on a
    connection of its own. The flood's answers by status, and the vip's statuses."""
    until = time.monotonic() + seconds
    counts: dict = {}
    vip_statuses: list[int] = []
    tasks = [asyncio.ensure_future(_connection(port, tenants[i % len(tenants)], until, counts))
             for i in range(connections)]
    if vip:
        await asyncio.sleep(vip_after_s)
        vip_counts: dict = {}
        answers: list[list[int]] = [[] for _ in range(vip_requests)]
        await asyncio.gather(*(_connection(port, vip, until + 60, vip_counts, a, 1)
                               for a in answers))
        vip_statuses = [a[0] if a else 0 for a in answers]  # 0: the connection failed
    await asyncio.gather(*tasks)
    return counts, vip_statuses


def run_flood(port: int, tenants: list[str], connections: int, seconds: float,
              vip: str = "", vip_requests: int = 0, vip_after_s: float = 0.0
              ) -> tuple[dict, list[int]]:
    """flood() in a process of its own at a lower CPU priority (nice 10): on a machine
    where the load generator shares the cores with Envoy, the sidecar and Valkey, an
    unrestrained generator starves Valkey (its slowlog: calls of 30-50 ms), which is the
    test rig failing the store, not what is under test. The generator is then at most as
    fast as what it floods allows, which is all a flood needs."""
    args = json.dumps([port, tenants, connections, seconds, vip, vip_requests, vip_after_s])
    done = subprocess.run([sys.executable, "-m", "tests.support.flood", args],
                          capture_output=True, text=True, timeout=seconds + 120,
                          preexec_fn=lambda: os.nice(10))
    if done.returncode != 0:
        raise RuntimeError(f"the flood failed: {done.stderr[-2000:]}")
    counts, statuses = json.loads(done.stdout)
    return {int(k) if k.isdigit() else k: v for k, v in counts.items()}, statuses


if __name__ == "__main__":
    counts, statuses = asyncio.run(flood(*json.loads(sys.argv[1])))
    print(json.dumps([{str(k): v for k, v in counts.items()}, statuses]))
