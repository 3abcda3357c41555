"""The HTTP ext_authz fast path through a real socket: same answers as the gRPC path,
keep-alive and pipelining, and malformed input answered without harm."""
from __future__ import annotations

import json
import socket

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from sidecar.transports import http_authz
from sidecar.transports.http_authz import start_http_authz
from tests.support.inproc import RunningSidecar

POLICY = """
tenant: {header: x-tenant-id, unknown: deny}
tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]
defaults:
  limits: {rpm: 2, tpm: 1000}
  budget: {tokens: 5000, period: day, low_water: 0.5}
tenants:
  a: {}
  b: {}
estimate: {trusted: true}  # a trusted filter sets x-kt-estimated-tokens in these tests
"""


@pytest.fixture
def sidecar():
    with RunningSidecar(POLICY) as sc:
        server, port = sc.run(start_http_authz(sc.sidecar.service.decider, "127.0.0.1", 0))
        sc.http_authz_port = port
        yield sc
        server.close()


def http(port: int, raw: bytes, expect: int = 1) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes, read `expect` responses (or until the server closes)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        buf = b""
        while len(out) < expect:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = {k.decode().lower(): v.decode().strip()
                       for k, v in (l.split(b":", 1) for l in lines[1:])}
            n = int(headers.get("content-length", 0))
            while len(buf) < n:
                buf += s.recv(65536)
            out.append((status, headers, buf[:n]))
            buf = buf[n:]
    return out


def request(tenant: str | None, tokens: str = "10", body: bytes = b"") -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"host: kt"]
    if tenant is not None:
        lines.append(b"x-tenant-id: " + tenant.encode())
    lines.append(b"x-kt-estimated-tokens: " + tokens.encode())
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def grpc_check(sc, tenant, tokens="10"):
    with grpc.insecure_channel(sc.grpc_target) as ch:
        req = external_auth_pb2.CheckRequest()
        h = req.attributes.request.http.headers
        if tenant is not None:
            h["x-tenant-id"] = tenant
        h["x-kt-estimated-tokens"] = tokens
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def test_same_answers_as_grpc_for_the_same_sequence(sidecar):
    # tenant a over HTTP, tenant b over gRPC, same clock and same sequence of requests
    cases = [("x", "10"), (None, "10"), ("a", "bad")]
    for i in range(4):
        status, headers, body = http(sidecar.http_authz_port, request("a"))[0]
        resp = grpc_check(sidecar, "b")
        if resp.status.code == 0:
            assert status == 200
            g = {o.header.key: o.header.value for o in resp.ok_response.headers}
            g.update({o.header.key: o.header.value for o in resp.ok_response.response_headers_to_add})
            g["x-kt-tenant"] = "a"
        else:
            assert status == resp.denied_response.status.code
            g = {o.header.key: o.header.value for o in resp.denied_response.headers}
            assert json.loads(body)["error"]["type"] == json.loads(
                resp.denied_response.body)["error"]["type"]
        headers.pop("content-length")
        # the reservation ids differ (the sidecar makes a fresh one per request)
        assert (headers.pop("x-kt-reservation", None) is None) == (
            g.pop("x-kt-reservation", None) is None), i
        assert headers == g, i
    for tenant, tokens in cases:
        status, _, body = http(sidecar.http_authz_port, request(tenant, tokens))[0]
        resp = grpc_check(sidecar, tenant, tokens)
        assert status == resp.denied_response.status.code
        assert json.loads(body) == json.loads(resp.denied_response.body)


def test_keep_alive_and_pipelined_requests_answer_in_order(sidecar):
    raw = request("a", "1") + request("a", "1") + request("a", "1")
    answers = http(sidecar.http_authz_port, raw, expect=3)
    assert [a[0] for a in answers] == [200, 200, 429]  # rpm 2
    assert answers[2][1]["retry-after"] == "30"


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nno-colon-here\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\ncontent-length: ten\r\n\r\n", 400),
    ("POST / HTTP/1.1\r\ncontent-length: \u00b2\r\n\r\n".encode(), 400),  # a digit to str, not int
    (b"POST / HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nx: " + b"y" * 40000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nx-tenant-id: \xff\xfe\r\n\r\n", 400),
    # smuggling-style: a length and a chunked encoding, two lengths, a space before the
    # colon (each read one way by one hop and another by the next), an upgrade
    (b"POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
     400),
    (b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!", 400),
    (b"POST / HTTP/1.1\r\nx-tenant-id : a\r\ncontent-length: 0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n", 400),
])
def test_malformed_http_gets_a_clear_answer_and_the_server_keeps_serving(sidecar, raw, status):
    answers = http(sidecar.http_authz_port, raw)
    assert answers and answers[0][0] == status
    assert json.loads(answers[0][2])["error"]["type"] == "invalid_request_error"
    # and the next connection is served normally
    assert http(sidecar.http_authz_port, request("a", "1"))[0][0] in (200, 429)


def test_a_malformed_request_behind_a_good_one_keeps_the_good_ones_answer(sidecar):
    bad = "POST / HTTP/1.1\r\ncontent-length: \u00b2\r\n\r\n".encode()
    answers = http(sidecar.http_authz_port, request("a", "1") + bad, expect=2)
    assert [a[0] for a in answers] == [200, 400]


def test_a_head_trickled_past_its_limit_is_refused_not_held():
    # llhttp holds an unfinished header line itself: the fast path counts what it holds,
    # so a header that never ends is refused at MAX_HEAD (plus the piece that crossed it)
    parser = http_authz._Parser(None, None, None)  # type: ignore[arg-type]
    parser.feed(b"POST / HTTP/1.1\r\nx: ")
    fed = 0
    with pytest.raises(http_authz._Refused) as refused:
        while fed < 4 * http_authz.MAX_HEAD:
            parser.feed(b"y" * 1024)
            fed += 1024
    assert refused.value.status == 431
    assert fed <= http_authz.MAX_HEAD + 1024


def test_pipelined_requests_split_anywhere_are_each_answered(sidecar):
    raw = request("b", "1", b'{"x": 1}') * 3
    with socket.create_connection(("127.0.0.1", sidecar.http_authz_port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(raw), 7):  # cut inside request lines, headers and bodies
            s.sendall(raw[i:i + 7])
        buf = b""
        while buf.count(b"HTTP/1.1 ") < 3:
            chunk = s.recv(65536)
            assert chunk, buf
            buf += chunk
    assert [line.split(b" ")[1] for line in buf.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")
            ] == [b"200", b"200", b"429"]  # rpm 2


def test_a_half_sent_request_then_close_harms_nothing(sidecar):
    with socket.create_connection(("127.0.0.1", sidecar.http_authz_port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\ncontent-length: 100\r\n\r\n{\"partial")
    assert http(sidecar.http_authz_port, request("a", "1"))[0][0] in (200, 429)
