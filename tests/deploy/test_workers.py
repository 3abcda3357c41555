"""`kt serve --workers N`: processes share the gRPC and HTTP-authz ports over one Valkey,
and look like one sidecar from outside: one /metrics, one /v1/spend, one readiness."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from sidecar.model import Request
from sidecar.policy.load import parse_policy
from sidecar.server import make_backend
from sidecar.server_config import ServerConfig
from sidecar.flows import Flows
from sidecar.worker_metrics import RetiredCounts, merge_metrics
from tests.support.procs import (EnvoyProcess, SidecarProcess, eventually, free_port,
                                 metric_value, wait_until, workdir)
from tests.support.upstream import FakeUpstream
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


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def decisions(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kt_requests_total{"))


@pytest.mark.valkey
def test_two_workers_are_one_sidecar_on_the_side_port():
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % v.url)
        sc = SidecarProcess(policy, d, ("--workers", "2", "--http-authz", "127.0.0.1:0"))
        with sc:
            doc = json.loads(sc.ready.read_text())
            assert doc["workers"] == 2 and sc.http_port not in doc["worker_http_ports"]
            # one connection per request: the kernel spreads them over both workers
            assert all(authz(sc.http_authz_port, "w") == 200 for _ in range(40))
            per_worker = [decisions(get(p, "/metrics")[1]) for p in doc["worker_http_ports"]]
            assert sum(per_worker) == 40 and min(per_worker) > 0, per_worker  # both decided
            status, text = get(sc.http_port, "/metrics")
            assert status == 200 and decisions(text) == 40  # before: 24 here, 16 elsewhere
            assert text.count("# TYPE kt_requests_total counter") == 1
            # histograms add up bucket by bucket
            count = [line for line in text.splitlines()
                     if line.startswith('kt_decision_latency_seconds_count{transport="http"}')]
            assert count and float(count[0].rsplit(" ", 1)[1]) == 40
            assert get(sc.http_port, "/readyz") == (200, "ready: 2 workers\n")
            # a usage report to the pod's admin port reaches a worker (its own admin port),
            # which settles it; the pod's /v1/spend counts it once, whichever worker took it
            report = json.dumps({"request_id": "r-1", "tenant": "w", "model": "gpt-4o",
                                 "input_tokens": 7, "output_tokens": 3}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{sc.admin_port}/v1/usage",
                                         data=report, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200
            assert get(sc.http_port, "/v1/spend")[0] == 404  # the side port has no books
            status, spend = get(sc.admin_port, "/v1/spend")
            row = json.loads(spend)["tenants"]["w"]["gpt-4o"]  # by name: the ledger's spend
            assert status == 200 and (row["input_tokens"], row["output_tokens"]) == (7, 3), spend
            # the management API through the pod's admin port: a freeze reaches one worker,
            # which writes it to Valkey; every worker refuses the holder within a second
            req = urllib.request.Request(f"http://127.0.0.1:{sc.admin_port}/v1/tenants/w/freeze",
                                         data=b"{}", headers={"content-type": "application/json"},
                                         method="POST")
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200 and json.load(r)["action"] == "freeze"
            wait_until(lambda: all(authz(sc.http_authz_port, "w") == 403 for _ in range(20)), 5,
                       "every worker refuses the frozen holder")
            status, got = get(sc.admin_port, "/v1/tenants/w")
            assert status == 200 and json.loads(got)["frozen"]["by"] == "loopback 127.0.0.1"
            # one readiness: a worker that cannot answer makes the pod not ready
            stopped = doc["worker_pids"][1]
            os.kill(stopped, signal.SIGSTOP)
            try:
                status, text = get(sc.http_port, "/readyz")
                assert status == 503 and "worker 1 does not answer" in text, text
                assert get(sc.http_port, "/healthz")[0] == 200  # alive: no restart for this
            finally:
                os.kill(stopped, signal.SIGCONT)
            wait_until(lambda: get(sc.http_port, "/readyz")[0] == 200, 10, "ready again")


@pytest.mark.valkey
def test_a_worker_that_dies_is_restarted_and_readiness_follows():
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % v.url)
        with SidecarProcess(policy, d, ("--workers", "2")) as sc:
            doc = json.loads(sc.ready.read_text())
            os.kill(doc["worker_pids"][0], signal.SIGKILL)
            wait_until(lambda: get(sc.http_port, "/readyz")[0] == 503, 10, "not ready")
            wait_until(lambda: get(sc.http_port, "/readyz")[0] == 200, 60, "restarted")


def test_gauges_merge_by_meaning_counters_by_sum():
    a = ('# TYPE kt_backend_ready gauge\nkt_backend_ready{backend="redis"} 1.0\n'
         '# TYPE kt_requests counter\nkt_requests_total{decision="allow",transport="grpc"} 3.0\n'
         '# TYPE kt_queue gauge\nkt_queue 2.0\n')
    b = a.replace("} 1.0", "} 0.0").replace("} 3.0", "} 4.0").replace("kt_queue 2.0", "kt_queue 5.0")
    merged = {(s.name, tuple(s.labels.values())): s.value
              for fam in merge_metrics([a, b]) for s in fam.samples}
    assert merged[("kt_backend_ready", ("redis",))] == 0.0  # one worker not ready: not ready
    assert merged[("kt_requests_total", ("allow", "grpc"))] == 7.0
    assert merged[("kt_queue", ())] == 7.0  # an unlisted gauge (a queue depth) adds up


@pytest.mark.subprocess
def test_workers_refuse_the_embedded_backend():
    with workdir() as d:
        policy = d / "policy.yaml"
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n")
        res = subprocess.run([sys.executable, "-m", "sidecar.cli", "serve", "--workers", "2",
                              "--config", str(policy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "needs the redis backend" in res.stderr


def authz_reservation(port: int, tenant: str, estimate: int) -> str:
    """One fast-path decision; the reservation id it answered with (x-kt-reservation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nx-tenant-id: " + tenant.encode()
                  + b"\r\nx-kt-estimated-tokens: %d\r\ncontent-length: 0\r\n\r\n" % estimate)
        head = s.recv(4096).split(b"\r\n\r\n", 1)[0].decode()
    assert head.split(" ", 2)[1] == "200", head
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    return {k.lower(): v for k, v in headers.items()}["x-kt-reservation"]


def pid_that_decided(doc: dict, before: list[float]) -> int:
    """The worker whose kt_requests_total grew since ``before`` (per worker side port)."""
    after = [decisions(get(p, "/metrics")[1]) for p in doc["worker_http_ports"]]
    grew = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b]
    assert len(grew) == 1, (before, after)
    return doc["worker_pids"][grew[0]]


@pytest.mark.valkey
def test_usage_of_a_request_whose_worker_died_is_charged_once():
    # Envoy sends a request's decision and, after the response, its usage over one
    # connection, to one worker. When that worker dies, the connection and the usage of the
    # requests it admitted move to a sibling, which held no reservation for them: before,
    # it charged their usage in full on top of the estimate the dead worker had charged
    # (issue: 3 requests charged twice). The workers now share reservations through Redis.
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % v.url + "estimate: {trusted: true}\n")
        with SidecarProcess(policy, d, ("--workers", "2", "--http-authz", "127.0.0.1:0")) as sc:
            doc = json.loads(sc.ready.read_text())
            before = [decisions(get(p, "/metrics")[1]) for p in doc["worker_http_ports"]]
            rid = authz_reservation(sc.http_authz_port, "died", 2000)
            os.kill(pid_that_decided(doc, before), signal.SIGKILL)
            report = json.dumps({"request_id": rid, "tenant": "died", "model": "gpt-4o",
                                 "input_tokens": 100, "output_tokens": 50}).encode()

            def reported() -> bool:  # to whichever worker answers (the survivor, or the new)
                req = urllib.request.Request(f"http://127.0.0.1:{sc.admin_port}/v1/usage",
                                             data=report,
                                             headers={"content-type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status == 200

            wait_until(reported, 60, "the usage report settled by a live worker")
            r = redis.Redis.from_url(v.url)
            try:
                spent = int(r.hget("kt:{died}:budget", "s") or 0)
            finally:
                r.close()
    assert spent == 150  # the usage replaced the estimate; before: 2000 + 150


@pytest.mark.valkey
def test_counters_never_go_backwards_when_a_worker_dies():
    # the pod's /metrics sums the workers' own counters: a worker killed and restarted
    # starts again from zero, and the sum fell (issue: kt_requests_total 824 -> 668). What
    # the dead worker had counted, as last scraped, now stays in the sum.
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % v.url)
        with SidecarProcess(policy, d, ("--workers", "2", "--http-authz", "127.0.0.1:0")) as sc:
            doc = json.loads(sc.ready.read_text())
            assert all(authz(sc.http_authz_port, "w") == 200 for _ in range(40))
            per_worker = [decisions(get(p, "/metrics")[1]) for p in doc["worker_http_ports"]]
            assert min(per_worker) > 0, per_worker  # both decided: either death loses some
            status, text = get(sc.http_port, "/metrics")  # Prometheus scrapes
            assert status == 200 and decisions(text) == 40
            os.kill(doc["worker_pids"][0], signal.SIGKILL)
            wait_until(lambda: get(sc.http_port, "/readyz")[0] == 503, 10, "not ready")
            wait_until(lambda: get(sc.http_port, "/readyz")[0] == 200, 60, "restarted")
            status, text = get(sc.http_port, "/metrics")
            assert status == 200 and decisions(text) == 40, text  # before: 40 - worker 0's
            assert all(authz(sc.http_authz_port, "w") == 200 for _ in range(10))
            status, text = get(sc.http_port, "/metrics")
            assert status == 200 and decisions(text) == 50
            # histograms too, bucket by bucket
            count = [line for line in text.splitlines()
                     if line.startswith('kt_decision_latency_seconds_count{transport="http"}')]
            assert count and float(count[0].rsplit(" ", 1)[1]) == 50, count


def exposition(allow: int, deny: int, queue: int) -> str:
    """A worker's /metrics as prometheus-client writes it."""
    r = CollectorRegistry()
    requests = Counter("kt_requests", "decisions", ["decision"], registry=r)
    if allow:
        requests.labels("allow").inc(allow)
    if deny:
        requests.labels("deny").inc(deny)
    Gauge("kt_queue", "depth", registry=r).set(queue)
    return generate_latest(r).decode()


def test_the_counts_of_a_worker_that_exited_stay_in_the_sum():
    retired = RetiredCounts()
    retired.add(exposition(3, 0, 2))
    retired.add(exposition(0, 5, 2))  # a series no live worker has any more
    merged = {(s.name, tuple(s.labels.values())): s.value
              for fam in merge_metrics([exposition(1, 0, 4)], retired) for s in fam.samples}
    assert merged[("kt_requests_total", ("allow",))] == 4.0
    assert merged[("kt_requests_total", ("deny",))] == 5.0
    assert merged[("kt_queue", ())] == 4.0  # a gauge of a dead worker is gone with it


@pytest.mark.envoy
@pytest.mark.valkey
def test_requests_in_flight_when_their_worker_dies_behind_envoy_are_charged_once():
    # the whole path: Envoy (kt envoy-config, usage by its access log) in front of two
    # workers, streams held open by the upstream, the worker that decided them SIGKILLed,
    # then the streams end. Before: budget = 6 estimates + 6 usages (3144 for 90 here).
    n = 6
    with workdir() as d, Valkey(d) as v, FakeUpstream("up") as up:
        policy = d / "policy.yaml"
        policy.write_text(POLICY % v.url)
        with SidecarProcess(policy, d, ("--workers", "2")) as sc:
            doc = json.loads(sc.ready.read_text())
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin, mode="authz",
                                sidecar_address=f"127.0.0.1:{sc.grpc_port}", usage="als",
                                authz_timeout_s=2.0,  # a loaded machine is not what is tested
                                tiers=[TierRoute("default", "gpt-4o", up.address)])
            with EnvoyProcess(render(opts), d, admin, listen):
                statuses: list[int] = []

                def stream() -> None:
                    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=30)
                    try:
                        conn.request("POST", "/v1/chat/completions", json.dumps({
                            "model": "gpt-4o", "max_tokens": 500, "stream": True,
                            "stream_options": {"include_usage": True},
                            "messages": [{"role": "user", "content": "hi"}]}),
                            {"content-type": "application/json", "x-tenant-id": "inflight"})
                        resp = conn.getresponse()
                        resp.read()
                        statuses.append(resp.status)
                    finally:
                        conn.close()

                before = [decisions(get(p, "/metrics")[1]) for p in doc["worker_http_ports"]]
                clients = [threading.Thread(target=stream) for _ in range(n)]
                for c in clients:
                    c.start()
                wait_until(lambda: len(up.requests) == n, 30, "every stream at the upstream")
                os.kill(pid_that_decided(doc, before), signal.SIGKILL)  # one connection
                up.release_stream.set()
                for c in clients:
                    c.join(30)
                assert statuses == [200] * n

                def usage_delivered() -> bool:
                    status, text = get(sc.http_port, "/metrics")
                    return status == 200 and metric_value(
                        text, "kt_usage_log_entries_total") >= n

                wait_until(usage_delivered, 30, "the streams' usage at the live workers")
        r = redis.Redis.from_url(v.url)
        try:
            spent = int(r.hget("kt:{inflight}:budget", "s") or 0)
        finally:
            r.close()
    assert spent == n * (10 + 5)  # each stream's usage, once; its estimate replaced


@pytest.mark.valkey
def test_a_worker_shares_its_reservations_and_drops_those_it_settled_itself():
    # a worker shares every reservation whatever the policy says (ServerConfig, as the
    # supervisor starts it), so a sibling can settle it; one the worker settles itself is
    # dropped at once rather than held in Redis for its 15 minutes
    with workdir() as d, Valkey(d) as v:
        policy = parse_policy((POLICY % v.url + "estimate: {trusted: true}\n").encode(), "<t>")
        backend = make_backend(policy, ServerConfig(share_reservations=True))
        svc = Flows(policy, backend)
        r = redis.Redis.from_url(v.url)

        async def main():
            await backend.start()
            try:
                decided = await svc.decider.decide(Request(headers={"x-tenant-id": "own",
                                                            "x-kt-estimated-tokens": "9"}))
                key = f"kt:{{own}}:reserved:{decided.reservation_id}"
                await eventually(lambda: r.exists(key) == 1, "the reservation shared")
                await svc.settlement.settle_usage(decided.reservation_id, None, "gpt-4o", 4, 3,
                                       "access_log")
                await eventually(lambda: r.exists(key) == 0, "the settled reservation dropped")
            finally:
                await backend.close()

        try:
            asyncio.run(main())
        finally:
            r.close()
    assert svc.metrics.registry.get_sample_value(
        "kt_settlements_total", {"source": "access_log"}) == 1
