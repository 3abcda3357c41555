"""Hostile clients (issue 12, docs/security.md), in process: each attack of the red-team
pass as a test that failed on the code before the fix. A client must not lower its own
bill (estimates, request ids), a stranger must not touch the books (admin port, tokens,
mTLS), and nothing a client sends may stall decisions (slow connections, deep JSON,
unbounded metric labels). The same attacks through a real Envoy: tests/e2e/test_e2e_envoy.py."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import trustme
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import auth
from sidecar._proto import usage_pb2
from sidecar.auth import TokenFile, is_loopback_host, is_loopback_peer
from sidecar.transports import http_authz
from sidecar.transports.http_side import ServerLimits
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import post_json

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 100000, tpm: 20000}
tenants:
  acme:
    limits: {rpm: 100000, tpm: 100000000}
    budget: {tokens: 100000000, period: month}
  other:
    limits: {rpm: 100000, tpm: 100000000}
    budget: {tokens: 100000000, period: month}
  spent:
    budget: {tokens: 100, period: month}
%(estimate)s
"""
ADMIN = "admin-token-for-the-books-0123"
GRPC = "grpc-token-envoy-sends-456789"
DEEP = b'{"model":"gpt-4o","max_tokens":10,"messages":' + b"[" * 1000 + b"]" * 1000 + b"}"


def policy(trusted: bool = False) -> str:
    return POLICY % {"estimate": "estimate: {trusted: true}" if trusted else ""}


@pytest.fixture
def tokens(tmp_path):
    (tmp_path / "admin").write_text(ADMIN + "\n")
    (tmp_path / "grpc").write_text(GRPC + "\n")
    return {"admin_token_file": str(tmp_path / "admin"),
            "grpc_token_file": str(tmp_path / "grpc")}


def admin_only(tokens):
    return {"admin_token_file": tokens["admin_token_file"]}


def check(sc, tenant, headers=None, body=None, metadata=None, channel=None):
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.headers["x-tenant-id"] = tenant
    http.headers.update(headers or {})
    if body is not None:
        http.raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()
    with (channel or grpc.insecure_channel(sc.grpc_target)) as ch:
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5,
                                                                   metadata=metadata)


def upstream_headers(resp):
    return {o.header.key: o.header.value for o in resp.ok_response.headers}


def spent(sc, tenant):
    return sc.backend.states[tenant].spent


def chat(max_tokens=None, text="hi"):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


# --- 1. the estimate is the operator's -----------------------------------------------
def test_a_client_estimate_of_zero_does_not_override_the_body():
    # the red team: `x-kt-estimated-tokens: 0` and max_tokens 100000 (alone a 413 for a
    # tpm 20000 tenant) was admitted 30 times of 30, nothing charged
    with RunningSidecar(policy()) as sc:
        for _ in range(30):
            resp = check(sc, "t-zero", {"x-kt-estimated-tokens": "0"}, chat(100000))
            assert resp.denied_response.status.code == 413
        resp = check(sc, "t-zero", {"x-kt-estimated-tokens": "1"}, chat(5000))
        remaining = {o.header.key: o.header.value
                     for o in resp.ok_response.response_headers_to_add}
        assert int(remaining["x-ratelimit-remaining-tokens"]) <= 20000 - 5000  # the body's


def test_a_trusted_estimate_is_used_but_never_below_what_the_body_shows():
    with RunningSidecar(policy(trusted=True)) as sc:
        check(sc, "acme", {"x-kt-estimated-tokens": "10"}, chat(3000, text="x" * 400))
        assert spent(sc, "acme") >= 3000 + 100  # max_tokens + the prompt, not 10
        before = spent(sc, "acme")
        check(sc, "acme", {"x-kt-estimated-tokens": "50000"}, chat(10))
        assert spent(sc, "acme") - before == 50000  # above the body: the filter knows more
        before = spent(sc, "acme")
        check(sc, "acme", {"x-kt-estimated-tokens": "7"})  # no body: the count itself
        assert spent(sc, "acme") - before == 7


def test_zero_never_means_free():
    # an estimate of 0 was admitted against an exhausted budget (cost 0 <= remaining 0)
    with RunningSidecar(policy(trusted=True)) as sc:
        assert check(sc, "spent", {"x-kt-estimated-tokens": "100"}).status.code == 0
        assert spent(sc, "spent") == 100
        for headers, body in (({"x-kt-estimated-tokens": "0"}, None),
                              ({}, {"max_tokens": 0}),
                              ({"x-kt-estimated-tokens": "0"}, {"max_tokens": 0, "messages": []})):
            resp = check(sc, "spent", headers, body)  # refused: over budget, or too large
            assert resp.denied_response.status.code in (413, 429), (headers, body)
        assert spent(sc, "spent") == 100


def test_an_rls_hits_addend_counts_only_when_the_estimate_is_trusted():
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    for trusted, expected in ((False, 512), (True, 3)):  # 512: default_request_tokens
        with RunningSidecar(policy(trusted)) as sc, grpc.insecure_channel(sc.grpc_target) as ch:
            req = rls_pb2.RateLimitRequest(domain="kt")
            d = req.descriptors.add()
            d.entries.add(key="tenant", value="acme")
            d.hits_addend.value = 3
            assert rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit(
                req, timeout=5).overall_code == rls_pb2.RateLimitResponse.OK
            assert spent(sc, "acme") == expected


# --- 2. request ids that cannot be replayed --------------------------------------------
def _hdrs(pairs):
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]))


def settle_through_ext_proc(sc, request_headers, used_in, used_out):
    """One request's ext_proc stream, as Envoy runs it after ext_authz: the reply carries
    usage, which the sidecar settles."""
    usage = json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": used_in,
                                                     "completion_tokens": used_out}}).encode()
    msgs = [pb.ProcessingRequest(request_headers=_hdrs(request_headers)),
            pb.ProcessingRequest(response_headers=_hdrs([(":status", "200"),
                                                         ("content-type", "application/json")])),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=usage, end_of_stream=True))]
    with grpc.insecure_channel(sc.grpc_target) as ch:
        list(external_processor_pb2_grpc.ExternalProcessorStub(ch).Process(iter(msgs),
                                                                         timeout=5))


def test_a_replayed_request_id_cannot_merge_settlements_within_or_across_tenants():
    # the red team: 25 requests reusing one x-request-id, estimate 1, each using 10,000
    # tokens, were charged 10,024 tokens (settlement idempotent per id, globally)
    with RunningSidecar(policy(trusted=True)) as sc:
        for tenant, n in (("acme", 25), ("other", 5)):
            for _ in range(n):
                resp = check(sc, tenant, {"x-request-id": "replayed",
                                          "x-kt-estimated-tokens": "1"})
                up = upstream_headers(resp)
                settle_through_ext_proc(sc, [
                    ("x-request-id", "replayed"), ("x-kt-tenant", up["x-kt-tenant"]),
                    ("x-kt-reservation", up["x-kt-reservation"])], 5000, 5000)
        assert spent(sc, "acme") == 25 * 10_000
        assert spent(sc, "other") == 5 * 10_000
        assert len(sc.sidecar.service.reservations) == 0


def test_reservation_ids_are_the_sidecars_own_and_never_repeat():
    with RunningSidecar(policy(trusted=True)) as sc:
        ids = {upstream_headers(check(sc, "acme", {"x-request-id": "same",
                                                   "x-kt-estimated-tokens": "1"}))[
            "x-kt-reservation"] for _ in range(200)}
        assert len(ids) == 200 and "same" not in ids
        assert all(len(i) == 24 and int(i, 16) >= 0 for i in ids)  # 96 random bits each


def test_without_a_reservation_id_each_request_is_charged_in_full():
    # Envoy's own failure mode let the requests through (no answer, no x-kt-reservation):
    # ext_proc settles each under a fresh id, so a repeated x-request-id merges nothing
    with RunningSidecar(policy()) as sc:
        for _ in range(3):
            settle_through_ext_proc(sc, [("x-request-id", "dup"), ("x-tenant-id", "acme")],
                                    100, 50)
        assert spent(sc, "acme") == 3 * 150


def test_a_report_cannot_move_a_reservation_to_another_tenant(tokens):
    with RunningSidecar(policy(trusted=True), config=admin_only(tokens)) as sc:
        rid = upstream_headers(check(sc, "acme", {"x-kt-estimated-tokens": "1000"}))[
            "x-kt-reservation"]
        status, body = post_json(sc.admin_base + "/v1/usage", {
            "request_id": rid, "tenant": "other", "input_tokens": 0, "output_tokens": 0}, ADMIN)
        assert status == 400 and "another tenant" in body["error"]["message"]
        assert spent(sc, "acme") == 1000 and "other" not in sc.backend.states
        status, body = post_json(sc.admin_base + "/v1/usage", {
            "request_id": rid, "tenant": "acme", "input_tokens": 10, "output_tokens": 5}, ADMIN)
        assert status == 200 and spent(sc, "acme") == 15  # its own tenant settles it


# --- 3. the books have a lock ------------------------------------------------------------
def get(url, token=None):
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_the_side_port_serves_no_books(tokens):
    with RunningSidecar(policy(), config=admin_only(tokens)) as sc:
        report = json.dumps({"request_id": "forged", "tenant": "acme", "input_tokens": 10**9,
                             "output_tokens": 0}).encode()
        data = b"POST /v1/usage HTTP/1.1\r\ncontent-length: %d\r\n\r\n%s" % (len(report),
                                                                              report)
        assert raw_status(sc.sidecar.http_port, data) == 405  # the side port is read-only
        assert get(sc.http_base + "/v1/spend")[0] == 404
        assert get(sc.http_base + "/v1/usage")[0] == 404
        assert get(sc.http_base + "/metrics")[0] == 200
        assert "acme" not in sc.backend.states


def test_the_admin_port_needs_its_token(tokens):
    with RunningSidecar(policy(), config=admin_only(tokens)) as sc:
        report = {"request_id": "forged", "tenant": "acme", "input_tokens": 10**9,
                  "output_tokens": 0}
        for token in (None, "wrong", GRPC, ADMIN + "x", ADMIN[:-1]):
            status, body = post_json(sc.admin_base + "/v1/usage", report, token)
            assert status == 401 and body["error"]["code"] == "unauthorized", token
            assert get(sc.admin_base + "/v1/spend", token)[0] == 401
        assert "acme" not in sc.backend.states
        status, _ = post_json(sc.admin_base + "/v1/usage", report, ADMIN)
        assert status == 200 and spent(sc, "acme") == 10**9
        status, body = get(sc.admin_base + "/v1/spend", ADMIN)
        assert status == 200 and json.loads(body)["tenants"]["acme"]
        metrics = get(sc.http_base + "/metrics")[1].decode()
        assert 'kt_auth_failures_total{listener="admin"} 10.0' in metrics


def test_without_a_token_the_admin_port_serves_loopback_callers():
    with RunningSidecar(policy()) as sc:
        assert get(sc.admin_base + "/v1/spend")[0] == 200  # this test runs on loopback


def test_a_rotated_token_file_is_picked_up(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "_RESTAT_S", 0.0)
    path = tmp_path / "token"
    path.write_text("first-token-0123456789\n")
    token = TokenFile(str(path))
    assert token.matches("Bearer first-token-0123456789")
    path.write_text("second-token-0123456789\n")
    assert token.matches("Bearer second-token-0123456789")
    assert not token.matches("Bearer first-token-0123456789")
    path.write_text("short\n")  # a bad rotation keeps the last good token
    assert token.matches("Bearer second-token-0123456789")
    assert not token.matches("bearer") and not token.matches("Basic second-token-0123456789")


@pytest.mark.parametrize("content", ["", "short\n", "has space in it 0123\n"])
def test_an_unusable_token_file_is_refused(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(auth.TokenError):
        TokenFile(str(path))


def test_the_grpc_token_guards_every_call_but_health(tokens):
    with RunningSidecar(policy(), config=tokens) as sc:
        for md in (None, [("authorization", "Bearer wrong")], [("authorization", ADMIN)]):
            with pytest.raises(grpc.RpcError) as err:
                check(sc, "acme", metadata=md)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert check(sc, "acme", metadata=[("authorization", f"Bearer {GRPC}")]).status.code == 0
        with grpc.insecure_channel(sc.grpc_target) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # kubelet probes
            with pytest.raises(grpc.RpcError) as err:  # ext_proc: a stream, refused too
                list(external_processor_pb2_grpc.ExternalProcessorStub(ch).Process(
                    iter([pb.ProcessingRequest(request_headers=_hdrs([]))]), timeout=5))
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            report = ch.unary_unary("/kt.v1.Usage/Report",
                                    request_serializer=usage_pb2.UsageReport.SerializeToString,
                                    response_deserializer=usage_pb2.UsageAck.FromString)
            rep = usage_pb2.UsageReport(request_id="r1", tenant="acme", input_tokens=5)
            with pytest.raises(grpc.RpcError) as err:
                report(rep, timeout=5)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert report(rep, timeout=5, metadata=[("authorization", f"Bearer {ADMIN}")]).applied
        assert spent(sc, "acme") > 0


def test_mtls_admits_only_clients_with_a_certificate_of_its_ca(tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("envoy.kt.test")
    stranger = trustme.CA().issue_cert("stranger.test")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cfg = {"grpc_tls_cert": str(tmp_path / "server.pem"),
           "grpc_tls_key": str(tmp_path / "server.key"),
           "grpc_client_ca": str(tmp_path / "ca.pem")}

    def channel(sc, leaf):
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=leaf.private_key_pem.bytes() if leaf else None,
            certificate_chain=leaf.cert_chain_pems[0].bytes() if leaf else None)
        return grpc.secure_channel(sc.grpc_target, creds)

    with RunningSidecar(policy(), config=cfg) as sc:
        assert check(sc, "acme", channel=channel(sc, client)).status.code == 0
        for leaf in (None, stranger):
            with pytest.raises(grpc.RpcError) as err:
                check(sc, "acme", channel=channel(sc, leaf))
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # the handshake fails
        with pytest.raises(grpc.RpcError):
            check(sc, "acme")  # plaintext


@pytest.mark.subprocess
@pytest.mark.parametrize("flag", ["--grpc", "--admin", "--http-authz"])
def test_kt_serve_refuses_an_unauthenticated_listener_beyond_loopback(flag, tmp_path):
    cmd = [sys.executable, "-m", "sidecar.cli", "serve", "--grpc", "127.0.0.1:0",
           "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", flag, "0.0.0.0:0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"kt serve: {flag} 0.0.0.0:0 is reachable beyond loopback "
                                 "without a credential; give ")


def test_what_counts_as_loopback():
    assert all(map(is_loopback_host, ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost",
                                      "unix:/run/kt.sock"]))
    assert not any(map(is_loopback_host, ["", "0.0.0.0", "::", "10.0.0.1", "192.168.1.2",
                                          "kt-sidecar.kt.svc", "127.0.0.1.nip.io"]))
    assert all(map(is_loopback_peer, ["ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/x"]))
    assert not any(map(is_loopback_peer, ["ipv4:10.1.2.3:5000", "ipv6:[fe80::1]:5000", "",
                                          "ipv4:", "dns:127.0.0.1:1"]))


def test_the_fast_path_needs_the_token_when_one_is_configured(tokens):
    from sidecar.transports.http_authz import start_http_authz

    with RunningSidecar(policy(), config=tokens) as sc:
        server, port = sc.run(start_http_authz(sc.sidecar.service, "127.0.0.1", 0,
                                               token=sc.sidecar.credentials.grpc))
        try:
            head = b"POST / HTTP/1.1\r\nx-tenant-id: acme\r\ncontent-length: 0\r\n"
            assert raw_status(port, head + b"\r\n") == 401
            assert raw_status(port, head + b"authorization: Bearer nope\r\n\r\n") == 401
            assert raw_status(port, head + f"authorization: Bearer {GRPC}\r\n\r\n".encode()) == 200
        finally:
            server.close()


def raw_status(port, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        return int(s.recv(65536).split(b" ", 2)[1])


# --- 4. nothing a client sends stalls the decisions -------------------------------------
def _closed_by_peer(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_clients_on_the_side_port_cost_no_threads_and_are_closed_in_time():
    # the red team: 6,000 slowloris connections made 6,008 threads, no timeout
    limits = ServerLimits(max_connections=64, request_timeout_s=0.5)
    with RunningSidecar(policy(), config={"side_limits": limits}) as sc:
        threads = threading.active_count()
        slow = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", sc.sidecar.http_port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nhost: kt\r\n")  # a head that never ends
            slow.append(s)
        try:
            assert threading.active_count() <= threads + 1  # + the slow-work thread at most
            # decisions go on meanwhile
            assert check(sc, "acme").status.code == 0
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not all(map(_closed_by_peer, slow)):
                for s in slow:  # a byte now and then is not progress
                    try:
                        s.sendall(b"x")
                    except OSError:
                        pass
                time.sleep(0.1)
            assert all(map(_closed_by_peer, slow))
            assert sc.sidecar.http_server.refused >= 200 - 64
            assert sc.sidecar.http_server.timed_out >= 1
            assert get(sc.http_base + "/metrics")[0] == 200  # served again once they are gone
        finally:
            for s in slow:
                s.close()


def test_a_scrape_on_a_kept_alive_connection_is_answered_each_time():
    with RunningSidecar(policy()) as sc, socket.create_connection(
            ("127.0.0.1", sc.sidecar.http_port), timeout=5) as s:
        for _ in range(3):
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: kt\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_fast_path_closes_connections_that_trickle_but_never_finish(monkeypatch):
    # the red team: each byte re-armed the 30 s idle timer, so 2,000 connections sending a
    # byte a second stayed open indefinitely
    from sidecar.transports.http_authz import start_http_authz

    monkeypatch.setattr(http_authz, "IDLE_TIMEOUT_S", 0.5)
    with RunningSidecar(policy()) as sc:
        server, port = sc.run(start_http_authz(sc.sidecar.service, "127.0.0.1", 0))
        try:
            trickling = [socket.create_connection(("127.0.0.1", port), timeout=5)
                         for _ in range(50)]
            busy = socket.create_connection(("127.0.0.1", port), timeout=5)
            request = b"POST / HTTP/1.1\r\nx-tenant-id: acme\r\ncontent-length: 0\r\n\r\n"
            head = b"POST / HTTP/1.1\r\nx-tenant-id: acme\r\n" + b"x" * 1000
            for i in range(20):  # 2 s: four idle timeouts
                for s in trickling:
                    try:
                        s.sendall(head[i:i + 1])
                    except OSError:
                        pass
                if i % 3 == 0:  # a whole request every 0.3 s is progress
                    busy.sendall(request)
                    assert busy.recv(65536).startswith(b"HTTP/1.1 200")
                time.sleep(0.1)
            assert all(map(_closed_by_peer, trickling))
            assert not _closed_by_peer(busy)
        finally:
            for s in trickling + [busy]:
                s.close()
            server.close()


def test_deep_json_is_a_400_on_every_path_and_one_log_line(caplog):
    # the red team: 503 on the fast path, gRPC UNKNOWN with a traceback per request, and
    # with Envoy failing open the request went upstream past an exhausted rpm
    from sidecar.transports.http_authz import start_http_authz
    from sidecar.transports.ext_proc import rewrite_model
    from sidecar.usage import usage_from_json

    caplog.set_level(logging.WARNING)
    with RunningSidecar(policy()) as sc:
        server, port = sc.run(start_http_authz(sc.sidecar.service, "127.0.0.1", 0))
        try:
            for _ in range(50):
                resp = check(sc, "deep", body=DEEP)
                assert resp.denied_response.status.code == 400
                assert json.loads(resp.denied_response.body)["error"]["code"] == "invalid_request"
                data = (b"POST / HTTP/1.1\r\nx-tenant-id: deep\r\ncontent-length: %d\r\n\r\n"
                        % len(DEEP)) + DEEP
                assert raw_status(port, data) == 400
        finally:
            server.close()
        status, body = post_json(sc.admin_base + "/v1/usage", {"request_id": [[[[1]]]]})
        assert status == 400
    assert rewrite_model(DEEP, "gpt-4o-mini") is None
    assert usage_from_json(b'{"usage":' + b"[" * 1000 + b"]" * 1000 + b"}") == (None, None)
    lines = [r for r in caplog.records if "nested too deeply" in r.getMessage()]
    assert len(lines) == 1  # one line for the burst of 100, not one per request
    assert not [r for r in caplog.records if r.exc_info]  # and no traceback


# --- 5. bounded metric labels ----------------------------------------------------------
def test_metrics_stay_bounded_whatever_models_the_reports_name():
    # the red team: 20,000 reports with distinct models grew /metrics to 43.7 MB
    with RunningSidecar(policy()) as sc:
        svc = sc.sidecar.service

        async def reports(start, n):
            for i in range(start, start + n):
                await svc.settle_usage(f"r{i}", "acme", f"model-{i}", 3, 2)
                await svc.settle_usage(f"u{i}", f"unnamed-{i}", f"model-{i}", 3, 2)

        sc.run(reports(0, 100))
        first = get(sc.http_base + "/metrics")[1]
        sc.run(reports(100, 9_900), timeout=120)  # 20,000 reports in all
        after = get(sc.http_base + "/metrics")[1]
        assert len(after) <= len(first) + 64  # only the counters' digits grew
        assert b"model-1" not in after and b"unnamed-" not in after
        text = after.decode()
        assert 'kt_tokens_total{model="_other",tenant="acme",type="input"} 30000.0' in text
        assert 'kt_tokens_total{model="_other",tenant="_other",type="output"} 20000.0' in text
        assert 'kt_unpriced_tokens_total{model="_other"} 100000.0' in text


def test_the_side_servers_speak_enough_http_for_curl_and_probes():
    with RunningSidecar(policy()) as sc:
        with socket.create_connection(("127.0.0.1", sc.sidecar.http_port), timeout=5) as s:
            s.sendall(b"HEAD /healthz HTTP/1.1\r\nhost: kt\r\n\r\n")
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 3\r\n" in head
            assert head.endswith(b"\r\n\r\n")  # no body after the head
        body = json.dumps({"request_id": "c1", "tenant": "acme", "input_tokens": 1,
                           "output_tokens": 1, "model": "m" * 2000}).encode()
        with socket.create_connection(("127.0.0.1", sc.sidecar.admin_port), timeout=5) as s:
            s.sendall(b"POST /v1/usage HTTP/1.1\r\nexpect: 100-continue\r\n"
                      b"content-length: %d\r\n\r\n" % len(body))
            assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"  # curl's way, at once
            s.sendall(body)
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")


def test_metadata_context_is_read_only_where_the_policy_says():
    # whoever reaches the gRPC port can send any metadata_context: with a header tenant it
    # is ignored; with tenant.metadata only that one field counts, and the header never does
    def with_metadata(tenant_header, org):
        req = external_auth_pb2.CheckRequest()
        req.attributes.request.http.headers["x-tenant-id"] = tenant_header
        fm = req.attributes.metadata_context.filter_metadata
        fm["envoy.filters.http.jwt_authn"].update({"jwt_payload": {"org": org}})
        fm["other.namespace"].update({"tenant": "acme"})
        return req

    for text, expected in ((policy(), "from-header"),
                           (policy().replace("tenant: {header: x-tenant-id, unknown: defaults}",
                                             'tenant: {metadata: "envoy.filters.http.jwt_authn:'
                                             'jwt_payload.org"}'), "from-jwt")):
        with RunningSidecar(text) as sc, grpc.insecure_channel(sc.grpc_target) as ch:
            resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(
                with_metadata("from-header", "from-jwt"), timeout=5)
            assert upstream_headers(resp)["x-kt-tenant"] == expected
