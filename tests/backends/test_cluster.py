"""The Redis backend on a 3-node Valkey cluster (docs/redis.md): the exactness,
idempotency and failure tests that hold on a single node hold here too, with the
tenants' keys spread over the nodes. (The end-to-end tests through a real Envoy run on
the cluster as well: tests/e2e/test_e2e_envoy.py's http-cluster parameter.)"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from redis.crc import key_slot

from sidecar.backends.redis import RedisBackend
from sidecar.model import Kind, Request
from sidecar.policy import schema
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService
from tests.support.procs import post_json, workdir
from tests.support.valkey import ValkeyCluster
from tests.backends.test_redis_backend import (clear_of_a_period_boundary, hammer, policy_text,
                                      start_sidecars)

SLOT_RANGES = [(0, 5460), (5461, 10922), (10923, 16383)]  # as ValkeyCluster assigns them


def node_of(tenant: str) -> int:
    """Which of the cluster's three nodes holds a tenant's keys (one hash tag: one slot)."""
    slot = key_slot(f"kt:{{{tenant}}}:budget".encode())
    return next(i for i, (lo, hi) in enumerate(SLOT_RANGES) if lo <= slot <= hi)


def tenant_on(node: int, prefix: str) -> str:
    return next(t for t in (f"{prefix}-{i}" for i in range(1000)) if node_of(t) == node)


def spent(c: ValkeyCluster, tenant: str) -> int:
    r = redis.Redis(port=c.nodes[node_of(tenant)].port)
    try:
        return int(r.hget(f"kt:{{{tenant}}}:budget", "s") or 0)
    finally:
        r.close()


def test_two_sidecars_admit_exactly_the_limit_and_charge_exactly_the_admitted(empty_cluster):
    # the same count as on one node (test_redis_backend), for a tenant on each node
    tenants = [tenant_on(i, "exact") for i in range(3)]
    with workdir() as d:
        procs = start_sidecars(d, policy_text(empty_cluster.url, cluster=True), 2)
        try:
            clear_of_a_period_boundary(86400)  # the default budget is per day

            async def all_tenants():
                started = time.monotonic()
                out = await asyncio.gather(*(hammer([p.grpc_port for p in procs], t, 200)
                                             for t in tenants))
                return out, time.monotonic() - started

            results, elapsed = asyncio.run(all_tenants())
        finally:
            for p in procs:
                p.stop()
    for tenant, res in zip(tenants, results, strict=True):
        admitted = [est for ok, est in res if ok]
        # rpm 100, burst 1: 100 in the bucket, refilling 100/60 per second while we run
        assert 100 <= len(admitted) <= 100 + int(elapsed * 100 / 60) + 1, (tenant, len(admitted))
        assert spent(empty_cluster, tenant) == sum(admitted)  # to the token, on the tenant's node


def test_a_usage_report_is_applied_once(empty_cluster):
    tenant = tenant_on(2, "report")
    with workdir() as d:
        (a,) = start_sidecars(d, policy_text(empty_cluster.url, cluster=True), 1)
        try:
            async def decide():
                async with grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}") as ch:
                    check = external_auth_pb2.CheckRequest()
                    check.attributes.request.http.headers.update(
                        {"x-tenant-id": tenant, "x-kt-estimated-tokens": "2000"})
                    resp = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(
                        check, timeout=10)
                    assert resp.status.code == 0
                    return {o.header.key: o.header.value
                            for o in resp.ok_response.headers}["x-kt-reservation"]

            rid = asyncio.run(decide())
            assert spent(empty_cluster, tenant) == 2000
            doc = {"request_id": rid, "tenant": tenant, "model": "gpt-4o",
                   "input_tokens": 100, "output_tokens": 50}
            acks = []
            for _ in range(3):  # repeats are recognised and change nothing
                status, ack = post_json(f"http://127.0.0.1:{a.admin_port}/v1/usage", doc)
                assert status == 200, ack
                acks.append(ack["applied"])
                assert spent(empty_cluster, tenant) == 150  # the estimate replaced, once
            assert acks == [True, False, False]
        finally:
            a.stop()


@pytest.mark.parametrize("mode,kind", [("open", Kind.FAIL_OPEN), ("closed", Kind.FAIL_CLOSED)])
def test_a_stalled_node_fails_only_its_own_tenants_and_they_recover(empty_cluster, mode, kind):
    stalled_tenant, other_tenant = tenant_on(1, "stalled"), tenant_on(0, "healthy")
    policy = parse_policy(policy_text(empty_cluster.url, cluster=True, timeout=100,
                                      failure_mode=mode).encode(), "<test>")
    assert isinstance(policy.backend, schema.RedisBackend)
    svc = DecisionService(policy, RedisBackend(policy.backend))

    def req(tenant: str) -> Request:
        return Request(headers={"x-tenant-id": tenant, "x-kt-estimated-tokens": "5"})

    async def main():
        await svc.backend.start()
        try:
            assert (await svc.decide(req(stalled_tenant))).kind is Kind.ALLOW
            empty_cluster.nodes[1].pause()
            try:
                # answered by the failure mode after the 100 ms timeout: a wait for the
                # node (resumed only after this) would fail here instead of hanging
                stalled = await asyncio.wait_for(asyncio.gather(
                    *(svc.decide(req(stalled_tenant)) for _ in range(10))), 10)
                healthy = await asyncio.gather(*(svc.decide(req(other_tenant))
                                                 for _ in range(10)))
            finally:
                empty_cluster.nodes[1].resume()
            deadline = time.monotonic() + 10
            while True:  # back to decisions once the node answers again
                after = await svc.decide(req(stalled_tenant))
                if after.kind is Kind.ALLOW or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            return stalled, healthy, after
        finally:
            await svc.backend.close()

    stalled, healthy, after = asyncio.run(main())
    assert {o.kind for o in stalled} == {kind}
    assert {o.kind for o in healthy} == {Kind.ALLOW}  # another node's tenant is unaffected
    assert after.kind is Kind.ALLOW
    # the node ran what was queued on it when it resumed, but each decision carried its
    # deadline in the node's clock (lua/deadline.lua): the ones answered by the failure
    # mode were not applied. Charged: the decision before the stall and the one after.
    assert spent(empty_cluster, stalled_tenant) == 5 + 5


def test_readiness_follows_a_stopped_node_and_its_return_without_traffic(empty_cluster):
    # the heartbeat reads every node's clock: a node that stops answering makes the
    # sidecar not ready, and its return makes it ready again with no decision in between
    # (a probe that kept the traffic away would otherwise keep it away for good)
    policy = parse_policy(policy_text(empty_cluster.url, cluster=True, timeout=100).encode(), "<test>")
    assert isinstance(policy.backend, schema.RedisBackend)
    backend = RedisBackend(policy.backend)

    async def until(ready: bool, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while backend.status().ready is not ready:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def main():
        await backend.start()
        try:
            ready_at_start = backend.status().ready
            empty_cluster.nodes[2].pause()
            try:
                went_unready = await until(False, 10)
            finally:
                empty_cluster.nodes[2].resume()
            came_back = await until(True, 10)
            return ready_at_start, went_unready, came_back, backend.decisions
        finally:
            await backend.close()

    ready_at_start, went_unready, came_back, decisions = asyncio.run(main())
    assert (ready_at_start, went_unready, came_back) == (True, True, True)
    assert decisions == 0


def test_a_sidecar_started_before_its_cluster_answers_becomes_ready_without_traffic(empty_cluster):
    for n in empty_cluster.nodes:
        n.pause()
    policy = parse_policy(policy_text(empty_cluster.url, cluster=True, timeout=100,
                                      failure_mode="closed").encode(), "<test>")
    assert isinstance(policy.backend, schema.RedisBackend)
    backend = RedisBackend(policy.backend)
    svc = DecisionService(policy, backend)
    request = Request(headers={"x-tenant-id": "early", "x-kt-estimated-tokens": "5"})

    async def main():
        try:
            # starts anyway (it used to end with redis-py's RedisClusterException): not
            # ready, and a decision is answered by the failure mode, not an exception
            await backend.start()
            ready_at_start = backend.status().ready
            early = await asyncio.wait_for(svc.decide(request), 10)
        finally:
            for n in empty_cluster.nodes:
                n.resume()
        try:
            deadline = time.monotonic() + 15
            while not backend.status().ready and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            ready_later, decisions = backend.status().ready, backend.decisions
            after = await svc.decide(request)
            return ready_at_start, early.kind, ready_later, decisions, after.kind
        finally:
            await backend.close()

    assert asyncio.run(main()) == (False, Kind.FAIL_CLOSED, True, 0, Kind.ALLOW)
