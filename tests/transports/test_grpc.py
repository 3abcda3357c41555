"""ext_authz Check, RLS ShouldRateLimit and Health through a real gRPC channel
to an in-process sidecar (embedded backend, injected clock)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_PRICING

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 3, tpm: 10000}
  budget: {tokens: 5000, period: day, low_water: 0.5}
tenants:
  acme:
    priority: high
    limits: {rpm: 600, tpm: 200000}
    budget: {usd: 1, period: month, low_water: 0.2}
  shadowed:
    limits: {rpm: 1, tpm: 100000}
    shadow_mode: true
  small:
    limits: {rpm: 100, tpm: 100}
# a trusted filter sets x-kt-estimated-tokens in these tests (docs/security.md)
estimate: {default_output_tokens: 256, default_request_tokens: 100, trusted: true}
"""


@pytest.fixture(scope="module")
def sidecar():
    with RunningSidecar(POLICY) as sc:
        yield sc


@pytest.fixture(scope="module")
def authz(sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as ch:
        yield external_auth_pb2_grpc.AuthorizationStub(ch)


@pytest.fixture(scope="module")
def rls(sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as ch:
        yield rls_pb2_grpc.RateLimitServiceStub(ch)


def check(stub, tenant=None, body=None, headers=None):
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    if tenant is not None:
        http.headers["x-tenant-id"] = tenant
    for k, v in (headers or {}).items():
        http.headers[k] = v
    if body is not None:
        http.body = body if isinstance(body, str) else json.dumps(body)
    return stub.Check(req, timeout=5)


def headers_of(options):
    return {o.header.key: o.header.value for o in options}


def chat(model="gpt-4o", max_tokens=None, text="hello"):
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def test_allow_sets_upstream_and_openai_headers(authz):
    resp = check(authz, "acme", chat(max_tokens=100))
    assert resp.status.code == 0
    up = headers_of(resp.ok_response.headers)
    assert up["x-kt-decision"] == "allow"
    assert (up["x-kt-tenant"], up["x-kt-tier"], up["x-kt-model"]) == ("acme", "default", "gpt-4o")
    assert up["x-kt-priority"] == "high"
    down = headers_of(resp.ok_response.response_headers_to_add)
    assert down["x-ratelimit-limit-requests"] == "600"
    assert down["x-ratelimit-remaining-requests"] == "599"
    assert down["x-ratelimit-limit-tokens"] == "200000"
    # the estimate: the body's bytes / 4 + max_tokens 100
    body_tokens = -(-len(json.dumps(chat(max_tokens=100))) // 4)
    assert int(down["x-ratelimit-remaining-tokens"]) == 200000 - body_tokens - 100
    md = resp.dynamic_metadata.fields["kt"].struct_value.fields
    assert md["decision"].string_value == "allow" and md["tier"].string_value == "default"


def test_downgrade_below_low_water_then_budget_exhausted(sidecar, authz):
    # defaults: 5000-token budget, low water 0.5 -> below 2500 left, requests go compact
    tenant = "dg-tenant"
    first = check(authz, tenant, headers={"x-kt-estimated-tokens": "2600"})
    assert headers_of(first.ok_response.headers)["x-kt-decision"] == "allow"
    second = check(authz, tenant, headers={"x-kt-estimated-tokens": "2000"})
    up = headers_of(second.ok_response.headers)
    assert (up["x-kt-decision"], up["x-kt-tier"], up["x-kt-model"]) == (
        "downgrade", "compact", "gpt-4o-mini")
    sidecar.clock.advance(120)  # refill the request bucket; the budget stays spent
    third = check(authz, tenant, headers={"x-kt-estimated-tokens": "1000"})
    assert third.denied_response.status.code == 429
    h = headers_of(third.denied_response.headers)
    body = json.loads(third.denied_response.body)
    assert body["error"]["type"] == "insufficient_quota"
    # retry-after runs to the end of the UTC day
    now_s = sidecar.clock() // 1_000_000
    assert int(h["retry-after"]) == 86400 - now_s % 86400
    assert h["x-kt-budget-remaining"] == "400"


def test_rpm_exhausted_gives_429_with_retry_after_from_the_bucket(sidecar, authz):
    tenant = "rpm-tenant"  # defaults: rpm 3
    for _ in range(3):
        assert check(authz, tenant, headers={"x-kt-estimated-tokens": "10"}).status.code == 0
    resp = check(authz, tenant, headers={"x-kt-estimated-tokens": "10"})
    denied = resp.denied_response
    assert resp.status.code == 7 and denied.status.code == 429
    h = headers_of(denied.headers)
    assert h["retry-after"] == "20"  # 3 rpm: one request every 20 s
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert h["content-type"] == "application/json"
    err = json.loads(denied.body)["error"]
    assert err["type"] == "rate_limit_exceeded" and "3 requests per minute" in err["message"]
    sidecar.clock.advance(20)
    assert check(authz, tenant, headers={"x-kt-estimated-tokens": "10"}).status.code == 0


def test_request_that_can_never_fit_gets_413_without_retry_after(authz):
    resp = check(authz, "small", chat(max_tokens=500))  # tpm 100, firm estimate > 100
    assert resp.denied_response.status.code == 413
    h = headers_of(resp.denied_response.headers)
    assert "retry-after" not in h
    err = json.loads(resp.denied_response.body)["error"]
    assert err["code"] == "request_too_large" and "100 tokens" in err["message"]
    # without max_tokens the defaulted output (256) is trimmed to fit: admitted
    assert check(authz, "small", chat()).status.code == 0


@pytest.mark.parametrize("tenant,body,headers,status,code", [
    (None, None, None, 400, "missing_tenant"),
    ("acme", "{not json", None, 400, "invalid_request"),
    ("acme", {"model": "gpt-4o", "max_tokens": "many"}, None, 400, "invalid_request"),
    ("acme", None, {"x-kt-estimated-tokens": "-3"}, 400, "invalid_request"),
    ("acme", None, {"x-kt-estimated-tokens": "lots"}, 400, "invalid_request"),
    ("x" * 200, None, None, 400, "invalid_request"),
])
def test_malformed_requests_get_a_documented_400(authz, tenant, body, headers, status, code):
    resp = check(authz, tenant, body, headers)
    assert resp.denied_response.status.code == status
    assert json.loads(resp.denied_response.body)["error"]["code"] == code


def test_shadow_mode_allows_but_says_what_it_would_have_done(authz):
    assert check(authz, "shadowed", headers={"x-kt-estimated-tokens": "1"}).status.code == 0
    resp = check(authz, "shadowed", headers={"x-kt-estimated-tokens": "1"})
    assert resp.status.code == 0
    up = headers_of(resp.ok_response.headers)
    assert up["x-kt-decision"] == "allow" and up["x-kt-shadow"] == "rate_limited"


def test_partial_body_is_sized_from_content_length(authz):
    resp = check(authz, "acme", body='{"model": "gpt-4o", "messages": [{"role": "us',
                 headers={"x-envoy-auth-partial-body": "true", "content-length": "40000"})
    assert resp.status.code == 0
    remaining = int(headers_of(resp.ok_response.response_headers_to_add)[
        "x-ratelimit-remaining-tokens"])
    assert remaining <= 200000 - 10000  # 40000 bytes / 4 chars per token


def rls_request(tenant, hits=0, model=None, domain="kt", descriptor_hits=None):
    req = rls_pb2.RateLimitRequest(domain=domain, hits_addend=hits)
    d = req.descriptors.add()
    if descriptor_hits is not None:
        d.hits_addend.value = descriptor_hits
    if tenant is not None:
        d.entries.add(key="tenant", value=tenant)
    if model is not None:
        d.entries.add(key="model", value=model)
    return req


def test_rls_ok_carries_decision_headers_and_over_limit_carries_429_parts(rls):
    ok = rls.ShouldRateLimit(rls_request("rls-tenant", hits=50, model="gpt-4o"), timeout=5)
    assert ok.overall_code == rls_pb2.RateLimitResponse.OK
    assert len(ok.statuses) == 1
    up = {h.key: h.value for h in ok.request_headers_to_add}
    assert up["x-kt-decision"] == "allow" and up["x-kt-model"] == "gpt-4o"
    down = {h.key: h.value for h in ok.response_headers_to_add}
    assert down["x-ratelimit-remaining-tokens"] == str(10000 - 50)  # hits_addend = tokens
    for _ in range(2):
        rls.ShouldRateLimit(rls_request("rls-tenant", hits=1), timeout=5)
    over = rls.ShouldRateLimit(rls_request("rls-tenant", hits=1), timeout=5)
    assert over.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    down = {h.key: h.value for h in over.response_headers_to_add}
    assert down["retry-after"] == "20"
    assert json.loads(over.raw_body)["error"]["type"] == "rate_limit_exceeded"
    assert not over.request_headers_to_add


def test_rls_estimate_from_the_descriptor_hits_addend_wins(rls):
    # Envoy 1.40 sends the estimate per descriptor; the request-level field is the old form
    ok = rls.ShouldRateLimit(rls_request("rls-desc-hits", hits=7, descriptor_hits=1234),
                             timeout=5)
    down = {h.key: h.value for h in ok.response_headers_to_add}
    assert down["x-ratelimit-remaining-tokens"] == str(10000 - 1234)
    # a descriptor hits_addend of 0 is "no estimate": the policy's default applies
    ok = rls.ShouldRateLimit(rls_request("rls-desc-zero", hits=0, descriptor_hits=0), timeout=5)
    down = {h.key: h.value for h in ok.response_headers_to_add}
    assert int(down["x-ratelimit-remaining-tokens"]) < 10000


def test_rls_without_tenant_descriptor_is_refused(rls):
    over = rls.ShouldRateLimit(rls_request(None, hits=1), timeout=5)
    assert over.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert json.loads(over.raw_body)["error"]["code"] == "missing_tenant"


def test_health_serving(sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_http_side_port_metrics_and_probes(sidecar, authz):
    check(authz, "acme", headers={"x-kt-estimated-tokens": "5"})
    with urllib.request.urlopen(sidecar.http_base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'kt_requests_total{decision="allow",transport="authz"}' in text
    assert 'kt_tokens_remaining{tenant="acme"}' in text
    assert "kt_decision_latency_seconds_bucket" in text
    with urllib.request.urlopen(sidecar.http_base + "/readyz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(sidecar.http_base + "/healthz", timeout=5) as r:
        assert r.read() == b"ok\n"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(sidecar.http_base + "/nope", timeout=5)
    assert info.value.code == 404


def test_unknown_tenant_denied_when_configured():
    policy = POLICY.replace("unknown: defaults", "unknown: deny")
    with RunningSidecar(policy) as sc, grpc.insecure_channel(sc.grpc_target) as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        resp = check(stub, "stranger")
        assert resp.denied_response.status.code == 403
        assert json.loads(resp.denied_response.body)["error"]["code"] == "unknown_tenant"
        assert check(stub, "acme").status.code == 0


def test_tenant_from_dynamic_metadata_wins_over_a_forged_header():
    policy = POLICY.replace("tenant: {header: x-tenant-id, unknown: defaults}",
                            'tenant: {metadata: "envoy.filters.http.jwt_authn:jwt_payload.org"}')
    with RunningSidecar(policy) as sc, grpc.insecure_channel(sc.grpc_target) as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        req = external_auth_pb2.CheckRequest()
        req.attributes.request.http.headers["x-tenant-id"] = "forged"
        req.attributes.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
            {"jwt_payload": {"org": "acme", "sub": "user-1"}})
        resp = stub.Check(req, timeout=5)
        assert headers_of(resp.ok_response.headers)["x-kt-tenant"] == "acme"
        bare = external_auth_pb2.CheckRequest()
        bare.attributes.request.http.headers["x-tenant-id"] = "forged"
        denied = stub.Check(bare, timeout=5).denied_response
        assert denied.status.code == 400
        err = json.loads(denied.body)["error"]
        assert err["code"] == "missing_tenant" and "jwt_payload.org" in err["message"]
