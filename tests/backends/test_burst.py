"""Bursts on a healthy store are decided by the store, never by the failure mode.

Two `kt serve` processes on one Valkey, with the backend's default settings, take bursts
of concurrent ext_authz checks (gRPC, as Envoy sends them), plain and routed (provider
quotas). Valkey answers all along, so not one check may be answered by the failure mode:
counted from the answers themselves (503 limiter_unavailable, fail_open) and from each
sidecar's kt_failure_mode_decisions_total. No timing is asserted: a slow, loaded machine
makes the bursts slower, and must not make them fail.
"""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from tests.support.procs import SidecarProcess, workdir
from tests.support.valkey import Valkey

pytestmark = pytest.mark.valkey

POLICY = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
%(providers)s
defaults:
  limits: {rpm: 1000000, tpm: 100000000}
backend: {kind: redis, url: "%(url)s", failure_mode: closed}
"""
PROVIDERS = """
providers:
  - {id: p1, models: [gpt-4o], rate_limits: {requests_per_minute: 1000000}}
  - {id: p2, models: [gpt-4o-mini], rate_limits: {requests_per_minute: 1000000}}
"""
BURSTS = (100, 400, 1000)


async def _burst(ports: list[int], n: int) -> list[tuple[int, str]]:
    """``n`` checks at once, spread over the sidecars; each answer's (HTTP status, body)."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in ports]
    try:
        stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]

        async def check(i: int) -> tuple[int, str]:
            req = external_auth_pb2.CheckRequest()
            http = req.attributes.request.http
            http.headers.update({"x-tenant-id": f"burst-{i % 50}",
                                 "content-type": "application/json"})
            http.body = json.dumps({"model": "gpt-4o", "max_tokens": 10,
                                    "messages": [{"role": "user", "content": "hi"}]})
            # the caller waits as long as a loaded machine needs: only the answer counts
            resp = await stubs[i % len(stubs)].Check(req, timeout=60)
            if resp.status.code == 0:
                return 200, ""
            return resp.denied_response.status.code, resp.denied_response.body

        return await asyncio.gather(*(check(i) for i in range(n)))
    finally:
        for c in channels:
            await c.close()


@pytest.mark.parametrize("routed", [False, True], ids=["plain", "routed"])
def test_bursts_on_a_healthy_valkey_get_no_failure_mode_answer(routed):
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % {"url": v.url, "providers": PROVIDERS if routed else ""})
        (d / "a").mkdir()
        (d / "b").mkdir()
        with SidecarProcess(policy, d / "a") as a, SidecarProcess(policy, d / "b") as b:
            answers: list[tuple[int, str]] = []
            for n in BURSTS:
                answers += asyncio.run(_burst([a.grpc_port, b.grpc_port], n))
            by_failure_mode = sum(sc.metric("kt_failure_mode_decisions_total", mode=mode)
                                  for sc in (a, b) for mode in ("open", "closed", "envoy"))
            why = [line for sc in (a, b) for line in sc.log.read_text().splitlines()
                   if " WARNING " in line][:4]
    refused = [a for a in answers if a[0] != 200]
    assert len(answers) == sum(BURSTS)
    assert by_failure_mode == 0, (by_failure_mode, why)
    assert not [r for r in refused if "limiter_unavailable" in r[1]], refused[:3]
    assert refused == []  # limits far away: every check is allowed
