"""What a client can send past the decision, through a real Envoy as `kt envoy-config`
prints it: only the metered API reaches a provider (with the operator's key), header
names with underscores are dropped, and a client cannot make its usage unreadable by
asking for a compressed reply or a stream without usage (docs/security.md)."""
from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
from typing import Iterator, Optional

import pytest

from sidecar.endpoints import Endpoint, EndpointError, parse_endpoint
from sidecar.envoy_config import EnvoyOptions, TierRoute, Upstream, render
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, workdir
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.envoy

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 10000, tpm: 10000000}
tenants:
  gzip: {}
  streamer: {}
  passer: {}
  low:
    limits: {rpm: 10000, tpm: 10000000}
    budget: {tokens: 10000, period: day, low_water: 0.5}
"""
PROVIDER_KEY = "sk-operator-secret"


class Edge:
    def __init__(self, sidecar: SidecarProcess, envoy: EnvoyProcess,
                 upstreams: dict[str, FakeUpstream], usage: str) -> None:
        self.sidecar, self.envoy, self.upstreams = sidecar, envoy, upstreams
        self.usage = usage

    def send(self, method: str, path: str, body: Optional[dict] = None,
             headers: Optional[dict] = None, tenant: str = "t-edge"
             ) -> tuple[int, dict, bytes]:
        h = {"x-tenant-id": tenant, "content-type": "application/json"}
        h.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy.listen_port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def decisions(self) -> float:
        return sum(float(v) for v in re.findall(r"^kt_requests_total\{[^}]*\} (\S+)$",
                                                self.sidecar.metrics(), re.M))

    def reached(self) -> list[dict]:
        return [r for up in self.upstreams.values() for r in up.requests]

    def spend(self, tenant: str) -> dict:
        if self.usage == "als":  # ext_proc settles before the response ends
            self.sidecar.wait_usage_delivered(("allow", "downgrade"))
        return self.sidecar.spend().get(tenant, {})


@contextlib.contextmanager
def edge(usage: str = "als", passed: tuple[Endpoint, ...] = (),
         mode: str = "authz") -> Iterator[Edge]:
    with workdir() as d, FakeUpstream("default") as up, FakeUpstream("compact") as compact:
        (d / "policy.yaml").write_text(POLICY)
        (d / "provider.key").write_text(PROVIDER_KEY)
        with SidecarProcess(d / "policy.yaml", d, ("--http-authz", "127.0.0.1:0")) as sidecar:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(
                listen_port=listen, admin_port=admin, authz_timeout_s=1.0, rls_timeout_s=1.0,
                mode=mode,  # type: ignore[arg-type]
                sidecar_address=f"127.0.0.1:{sidecar.grpc_port}",
                sidecar_http_address=f"127.0.0.1:{sidecar.http_authz_port}",
                usage=usage,  # type: ignore[arg-type]
                **({"pass_endpoints": passed} if passed else {}),
                tiers=[TierRoute("default", "gpt-4o", [Upstream(
                           "127.0.0.1", up.port, api_key_file=str(d / "provider.key"))]),
                       TierRoute("compact", "gpt-4o-mini", compact.address)])
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                yield Edge(sidecar, envoy, {"default": up, "compact": compact}, usage)


@pytest.fixture(scope="module", params=["als", "ext_proc"])
def gw(request) -> Iterator[Edge]:
    with edge(request.param) as e:
        yield e


def chat(**extra) -> dict:
    return {"model": "gpt-4o", "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}], **extra}


# --- only the metered API reaches a provider --------------------------------------------
NOT_METERED = [("POST", "/v1/batches"), ("GET", "/v1/files"), ("POST", "/v1/files"),
               ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/models"),
               ("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
               ("POST", "/v1/messages/batches"), ("POST", "/v1/chat/completions/x"),
               ("POST", "/v1/chat/completions/../../files"), ("POST", "/v1//chat/completions"),
               ("POST", "/V1/CHAT/COMPLETIONS"), ("POST", "/"), ("DELETE", "/v1/files/file-1")]


def test_only_the_metered_api_reaches_the_provider(gw):
    decided = gw.decisions()
    before = len(gw.reached())
    for method, path in NOT_METERED:
        status, headers, body = gw.send(method, path, chat())
        assert status == 404, (method, path, status, body)
        assert headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == "unknown_url"
        assert "POST /v1/chat/completions" in err["message"]
    # none reached a provider (with or without the operator's key), none was decided
    assert len(gw.reached()) == before, gw.reached()[before:]
    assert gw.decisions() == decided
    # the metered endpoints do, with the key, decided; a query string does not matter
    for path in ("/v1/chat/completions", "/v1/chat/completions?x=1", "/v1/completions",
                 "/v1/responses", "/v1/embeddings", "/v1/messages"):
        status, _, body = gw.send("POST", path, chat())
        assert status == 200, (path, body)
        got = gw.upstreams["default"].requests[-1]
        assert got["path"] == path and got["method"] == "POST"
        assert got["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert got["headers"]["x-kt-decision"] == "allow"


@pytest.mark.parametrize("mode", ["http-authz", "rls"])
def test_the_other_modes_route_only_the_metered_api(mode):
    with edge(mode=mode) as e:
        decided = e.decisions()
        for method, path in NOT_METERED[:6]:
            status, _, body = e.send(method, path, chat())
            assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"
        assert e.reached() == [] and e.decisions() == decided
        status, _, body = e.send("POST", "/v1/chat/completions", chat())
        assert status == 200, body
        assert e.decisions() == decided + 1
        assert e.upstreams["default"].requests[-1]["headers"]["authorization"] == (
            f"Bearer {PROVIDER_KEY}")


def test_a_passed_endpoint_reaches_the_provider_and_is_still_decided():
    with edge(passed=(parse_endpoint("GET:/v1/models"),
                      parse_endpoint("POST:/v1/batches"))) as e:
        decided = e.decisions()
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/batches")):
            status, _, _ = e.send(method, path, tenant="passer")
            assert status == 200
            got = e.upstreams["default"].requests[-1]
            assert (got["method"], got["path"]) == (method, path)
            assert got["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
            assert got["headers"]["x-kt-tenant"] == "passer"  # the decision's header
        assert e.decisions() == decided + 2
        # only what was listed: the same path with another method is not routed
        before = len(e.reached())
        assert e.send("POST", "/v1/models")[0] == 404
        assert e.send("GET", "/v1/files")[0] == 404
        assert len(e.reached()) == before


def test_pass_path_specs_are_checked():
    assert parse_endpoint("GET:/v1/models") == Endpoint("GET", "/v1/models")
    for bad in ("/v1/models", "get:/v1/models", "GET:/v1/../files", "GET:/v1//models",
                "GET:/v1/models?x=1", "GET:/v1/*", "GET:v1/models", "GET:/v1/%2e%2e/files",
                "GET:/v1/./models", "TRACE:/v1/models", "GET:/" + "a" * 300, "GET:/"):
        with pytest.raises(EndpointError):
            parse_endpoint(bad)


# --- header names with underscores ------------------------------------------------------
def test_header_names_with_underscores_are_dropped_at_the_edge(gw):
    status, _, body = gw.send("POST", "/v1/chat/completions", chat(), headers={
        "x_kt_tier": "compact", "x_kt_priority": "high", "x_kt_decision": "allow",
        "x_tenant_id": "someone-else"})
    assert status == 200, body
    reply = json.loads(body)
    assert reply["served_by"] == "default"
    got = reply["received_headers"]
    assert not [k for k in got if "_" in k], got
    assert got["x-kt-tenant"] == "t-edge"


def test_method_override_headers_never_reach_the_provider(gw):
    # the gateway routes and decides by the method Envoy sees: a POST the provider took
    # for a DELETE or GET (frameworks that honour these headers) would pass the 404 route
    status, _, body = gw.send("POST", "/v1/chat/completions?x=1", chat(), headers={
        "x-http-method-override": "DELETE", "x-http-method": "GET",
        "x-method-override": "PUT"})
    assert status == 200, body
    got = json.loads(body)["received_headers"]
    assert not {"x-http-method-override", "x-http-method", "x-method-override"} & set(got), got


# --- usage stays readable ---------------------------------------------------------------
def test_a_client_asking_for_a_compressed_reply_still_pays_its_usage(gw):
    before = gw.spend("gzip").get("gpt-4o", {"input_tokens": 0, "output_tokens": 0})
    status, headers, body = gw.send("POST", "/v1/chat/completions", chat(), tenant="gzip",
                                    headers={"accept-encoding": "gzip, br",
                                             "x-fake-usage": "1200,3400"})
    assert status == 200
    assert "content-encoding" not in headers
    assert "accept-encoding" not in json.loads(body)["received_headers"]
    rec = gw.spend("gzip")["gpt-4o"]
    assert (rec["input_tokens"] - before["input_tokens"],
            rec["output_tokens"] - before["output_tokens"]) == (1200, 3400)


STREAM_BODIES = {
    "no_stream_options": {},
    "stream_options_null": {"stream_options": None},
    "stream_options_empty": {"stream_options": {}},
    # the client's own members stay; include_usage false is overridden by the last key
    "include_usage_false": {"stream_options": {"include_usage": False, "other": 1}},
}


@pytest.mark.parametrize("case", sorted(STREAM_BODIES))
def test_a_streamed_chat_asks_the_provider_for_its_usage(gw, case):
    gw.upstreams["default"].release_stream.set()
    tenant = "streamer"
    before = gw.spend(tenant).get("gpt-4o", {"input_tokens": 0, "output_tokens": 0})
    status, _, body = gw.send("POST", "/v1/chat/completions",
                              chat(stream=True, **STREAM_BODIES[case]), tenant=tenant,
                              headers={"x-fake-usage": "321,654"})
    assert status == 200 and b"[DONE]" in body
    got = gw.upstreams["default"].requests[-1]["body"]
    assert "_unparsed" not in got  # Content-Length matched the rewritten body
    assert got["stream_options"]["include_usage"] is True
    if case == "include_usage_false":
        assert got["stream_options"]["other"] == 1
    assert (got["model"], got["messages"], got["max_tokens"]) == (
        "gpt-4o", [{"role": "user", "content": "hi"}], 20)
    rec = gw.spend(tenant)["gpt-4o"]
    assert (rec["input_tokens"] - before["input_tokens"],
            rec["output_tokens"] - before["output_tokens"]) == (321, 654)


def test_a_stream_flag_spelled_with_escapes_still_asks_for_usage(gw):
    # "str\u0065am" is "stream" to the provider's JSON parser
    gw.upstreams["default"].release_stream.set()
    before = gw.spend("streamer").get("gpt-4o", {"input_tokens": 0, "output_tokens": 0})
    raw = (b'{"model": "gpt-4o", "max_tokens": 20, "messages": [{"role": "user", '
           b'"content": "hi"}], "str\\u0065am": true, "stream_\\u006fptions": {}}')
    conn = http.client.HTTPConnection("127.0.0.1", gw.envoy.listen_port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=raw, headers={
        "x-tenant-id": "streamer", "content-type": "application/json",
        "x-fake-usage": "5,6"})
    assert b"[DONE]" in conn.getresponse().read()
    conn.close()
    got = gw.upstreams["default"].requests[-1]["body"]
    assert got["stream"] is True and got["stream_options"] == {"include_usage": True}
    rec = gw.spend("streamer")["gpt-4o"]
    assert (rec["input_tokens"] - before["input_tokens"],
            rec["output_tokens"] - before["output_tokens"]) == (5, 6)


def send_chunked(port: int, body: bytes, tenant: str, piece: int = 65536) -> bytes:
    """A request whose body is sent chunked (no Content-Length); the answer's status line.
    Envoy may answer and close before the body is all sent: that is not an error here."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nx-tenant-id: %s\r\n"
                  b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                  % tenant.encode())
        try:
            for i in range(0, len(body), piece):
                part = body[i:i + piece]
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        got = b""
        while b"\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got.split(b"\r\n", 1)[0]


def test_a_streamed_request_sent_chunked_is_asked_for_usage_or_refused_never_held(gw):
    """The Lua filter buffers a streamed chat body to add include_usage: one within Envoy's
    buffer limit (1 MiB) gets it; one beyond is Envoy's 413 at once. (Behind ext_authz's
    pause, the same filter waited for a body end that never came: no answer at all.)"""
    gw.upstreams["default"].release_stream.set()
    before = len(gw.reached())
    body = json.dumps(chat(stream=True, messages=[{"role": "user", "content": "x" * 500_000}]))
    assert send_chunked(gw.envoy.listen_port, body.encode(), "t-edge") == b"HTTP/1.1 200 OK"
    got = gw.upstreams["default"].requests[-1]["body"]
    assert got["stream_options"] == {"include_usage": True}
    assert len(got["messages"][0]["content"]) == 500_000
    big = json.dumps(chat(stream=True, messages=[{"role": "user", "content": "x" * 2_000_000}]))
    for _ in range(3):
        assert send_chunked(gw.envoy.listen_port, big.encode(), "t-edge") == (
            b"HTTP/1.1 413 Payload Too Large")
    assert len(gw.reached()) == before + 1


def test_requests_that_need_no_usage_request_are_passed_unchanged(gw):
    raw = b'{"model": "gpt-4o",  "stream": false, "messages": [{"role": "user", "content": "hi"}]}'
    for body in (raw, raw.replace(b'"stream": false', b'"stream": "true"')):
        conn = http.client.HTTPConnection("127.0.0.1", gw.envoy.listen_port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"x-tenant-id": "t-edge", "content-type": "application/json"})
        assert conn.getresponse().read()
        conn.close()
        assert gw.upstreams["default"].requests[-1]["body"] == json.loads(body)


def test_a_downgraded_stream_gets_the_compact_model_and_still_asks_for_usage(gw):
    if gw.spend("low").get("gpt-4o", {}).get("input_tokens", 0) == 0:
        # 6,000 of 10,000 tokens used: below the low water, the next request is downgraded
        assert gw.send("POST", "/v1/chat/completions", chat(), tenant="low",
                       headers={"x-fake-usage": "5000,1000"})[0] == 200
        assert gw.spend("low")["gpt-4o"]["input_tokens"] == 5000  # settled: the next decides on it
    gw.upstreams["compact"].release_stream.set()
    status, _, body = gw.send("POST", "/v1/chat/completions", chat(stream=True), tenant="low",
                              headers={"x-fake-usage": "40,2"})
    assert status == 200 and b"[DONE]" in body
    got = gw.upstreams["compact"].requests[-1]["body"]
    assert got["model"] == "gpt-4o-mini"  # ext_proc's rewrite
    assert got["stream_options"] == {"include_usage": True}  # and the Lua filter's
    assert gw.spend("low")["gpt-4o-mini"]["output_tokens"] == 2  # its usage was read
