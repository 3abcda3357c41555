"""`kt serve --workers N`: processes share the gRPC and HTTP-authz ports over one Valkey."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

from tests.support.procs import SidecarProcess, workdir
from tests.support.valkey import Valkey

POLICY = """
tiers: [{name: default, model: gpt-4o}]
defaults:
  limits: {rpm: 1000000, tpm: 100000000}
  budget: {tokens: 100000000, period: day}
backend: {kind: redis, url: "%s", timeout_ms: 500}
"""


def authz(port: int, tenant: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nx-tenant-id: " + tenant.encode()
                  + b"\r\nx-kt-estimated-tokens: 1\r\ncontent-length: 0\r\n\r\n")
        return int(s.recv(4096).split(b" ", 2)[1])


def decisions(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kt_requests_total{"))


def test_two_workers_share_the_ports_and_each_has_its_side_port():
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % v.url)
        sc = SidecarProcess(policy, d, ("--workers", "2", "--http-authz", "127.0.0.1:0"))
        with sc:
            doc = json.loads(sc.ready.read_text())
            ports = doc["worker_http_ports"]
            assert doc["workers"] == 2 and len(set(ports)) == 2
            # one connection per request: the kernel spreads them over both workers
            assert all(authz(sc.http_authz_port, "w") == 200 for _ in range(200))
            counts = [decisions(p) for p in ports]
            assert sum(counts) == 200 and min(counts) > 0, counts


def test_workers_refuse_the_embedded_backend():
    with workdir() as d:
        policy = d / "policy.yaml"
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n")
        res = subprocess.run([sys.executable, "-m", "sidecar.cli", "serve", "--workers", "2",
                              "--config", str(policy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "needs the redis backend" in res.stderr
