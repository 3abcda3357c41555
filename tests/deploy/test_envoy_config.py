"""`kt envoy-config` prints bootstraps the real Envoy accepts, with the documented wiring."""
from __future__ import annotations

import collections
import json
import re
import shlex
import subprocess
import urllib.error
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from sidecar.cli import main as kt
from sidecar.envoy_config import (EnvoyOptions, TierRoute, Upstream, UpstreamError, bootstrap,
                                  parse_upstream, render)
from tests.support.jwt import rs256_keys
from tests.support.procs import EnvoyProcess, envoy_validate, find_binary, free_port, workdir
from tests.support.upstream import FakeUpstream


@pytest.fixture(scope="module")
def provider_files(tmp_path_factory):
    """A CA bundle and two API key files, as a Kubernetes Secret would mount them."""
    import trustme

    d = tmp_path_factory.mktemp("provider")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    (d / "openai.key").write_text("sk-openai-test")
    (d / "azure.key").write_text("azure-test")
    from tests.support.jwt import rs256_keys

    (d / "jwks.json").write_text(__import__("json").dumps(rs256_keys()[1]))
    return d


def upstream_shapes(d) -> dict[str, list[str]]:
    """Every shape of --upstream the command takes, as flags."""
    return {
        "ip": ["--upstream", "default=127.0.0.1:8000", "--upstream", "compact=127.0.0.1:8001"],
        "hostname": ["--upstream", "default=llm.internal:8000", "--sidecar", "kt-sidecar:8081",
                     "--sidecar-http", "kt-sidecar:8082"],
        "tls-443": ["--upstream", "default=api.openai.com:443"],
        "tls-key": ["--upstream", f"default=https://api.openai.com,key-file={d}/openai.key",
                    "--upstream", f"compact=https://api.openai.com,key-file={d}/openai.key"],
        "tls-own-ca": ["--upstream", f"default=https://localhost:8443,ca={d}/ca.pem,"
                       f"sni=llm.example.com,key-file={d}/openai.key,key-header=x-api-key"],
        "weighted-failover": [
            "--upstream", f"default=https://api.openai.com,weight=60,name=openai,"
                          f"key-file={d}/openai.key",
            "--upstream", f"default=https://acme.openai.azure.com,weight=25,name=azure,"
                          f"key-file={d}/azure.key,key-header=api-key",
            "--upstream", "default=10.0.0.7:8000,priority=1,name=local"],
        "jwt": ["--jwt-issuer", "https://auth.example.com/", "--jwt-jwks-file", f"{d}/jwks.json",
                "--jwt-audience", "llm-gateway"],
    }


MODES = ["authz", "rls", "http-authz"]
SHAPES = ["hostname", "tls-443", "tls-key", "tls-own-ca", "weighted-failover"]
# every mode with both failure modes, and every upstream shape in every mode (the upstream
# clusters do not depend on the failure mode)
VARIANTS = ([(m, f, "ip") for m in MODES for f in ("allow", "deny")]
            + [(m, "deny", shape) for m in MODES for shape in SHAPES]
            + [(m, "deny", "jwt") for m in MODES])


@pytest.mark.envoy
@pytest.mark.parametrize("mode,failure_mode,shape", VARIANTS)
def test_envoy_validates_every_variant_without_deprecated_fields(
        tmp_path, capsys, provider_files, mode, failure_mode, shape):
    assert kt(["envoy-config", "--mode", mode, "--failure-mode", failure_mode,
               *upstream_shapes(provider_files)[shape]]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    envoy_validate(path)
    if shape != "ip":
        return
    doc = yaml.safe_load(text)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = [f["name"] for f in hcm["http_filters"]]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    fast_path = {"kt_sidecar_http"} if mode == "http-authz" else set()
    assert clusters == {"kt_sidecar", "tier_default", "tier_compact"} | fast_path
    compact = [r for r in routes if r.get("route", {}).get("cluster") == "tier_compact"]
    assert compact[0]["match"]["headers"] == [
        {"name": "x-kt-tier", "string_match": {"exact": "compact"}},
        {"name": ":method", "string_match": {"exact": "POST"}}]
    # the metered API only, then Envoy's own 404 for everything else, every filter off
    # one route per endpoint, matched exactly and named after it (the usage event's
    # endpoint, sidecar/upstream_sli.py)
    metered = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
               "/v1/messages"]
    forwarded = [r for r in routes[:-1] if "route" in r]
    assert [r["match"]["path"] for r in forwarded] == metered * 2  # 2 tiers
    assert [r["name"] for r in forwarded] == [f"POST {p}" for p in metered] * 2
    assert routes[-2]["route"]["cluster"] == "tier_default"
    assert routes[-1]["direct_response"]["status"] == 404
    assert sorted(routes[-1]["typed_per_filter_config"]) == sorted(
        f for f in filters if f != "envoy.filters.http.router")
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"
    if mode in ("authz", "http-authz"):
        # usage by the access log (the default): the Lua filter that leaves the usage in
        # dynamic metadata (first: it buffers a streamed chat request's body, which after
        # ext_authz's pause would wait forever for a body over the buffer limit), then
        # ext_authz, then ext_proc (body rewrites only)
        assert filters == ["envoy.filters.http.lua", "envoy.filters.http.ext_authz",
                           "envoy.filters.http.ext_proc", "envoy.filters.http.router"]
        assert [log["name"] for log in hcm["access_log"]] == ["envoy.access_loggers.http_grpc"]
        authz = hcm["http_filters"][1]["typed_config"]
        assert authz["clear_route_cache"] is True
        assert authz["failure_mode_allow"] is (failure_mode == "allow")
        assert ("http_service" in authz) is (mode == "http-authz")
    else:
        assert filters == ["envoy.filters.http.ratelimit", "envoy.filters.http.router"]
        assert hcm["http_filters"][0]["typed_config"]["failure_mode_deny"] is (failure_mode == "deny")


def test_unknown_tier_in_upstream_flag_is_refused(capsys):
    assert kt(["envoy-config", "--upstream", "premium=127.0.0.1:1"]) == 2
    assert "unknown tier" in capsys.readouterr().err


def _hcm(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _render(**kw) -> dict:
    return yaml.safe_load(render(EnvoyOptions(**kw)))


def _envoy_accepts(tmp_path, text: str) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    res = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(path),
                          "--log-level", "error"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


THREE = [TierRoute("best", "gpt-4o", "127.0.0.1:9001"),
         TierRoute("mid", "gpt-4o-mini", "127.0.0.1:9002"),
         TierRoute("cheap", "gpt-3.5", "127.0.0.1:9003")]


@pytest.mark.envoy
def test_one_cluster_and_one_header_route_per_tier_and_the_catch_all_goes_to_the_first(tmp_path):
    _envoy_accepts(tmp_path, render(EnvoyOptions(tiers=THREE, usage="none")))
    doc = _render(tiers=THREE, usage="none")
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert set(clusters) == {"kt_sidecar", "tier_best", "tier_mid", "tier_cheap"}
    ep = clusters["tier_cheap"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9003}
    routes = _hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]
    post = {"name": ":method", "string_match": {"exact": "POST"}}
    # one route per metered endpoint (5) and tier
    assert [(r["match"].get("headers"), r["route"]["cluster"]) for r in routes[:-1:5]] == [
        ([{"name": "x-kt-tier", "string_match": {"exact": "mid"}}, post], "tier_mid"),
        ([{"name": "x-kt-tier", "string_match": {"exact": "cheap"}}, post], "tier_cheap"),
        ([post], "tier_best")]
    assert len(routes) == 3 * 5 + 1
    assert routes[-1]["direct_response"]["status"] == 404  # everything else


def test_the_sidecar_cluster_is_static_loopback_http2_with_a_short_connect_timeout():
    doc = _render(sidecar_address="127.0.0.1:18081")
    sidecar = {c["name"]: c for c in doc["static_resources"]["clusters"]}["kt_sidecar"]
    assert sidecar["type"] == "STATIC" and sidecar["connect_timeout"] == "0.25s"
    opts = sidecar["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    ep = sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18081}
    # the tiers speak HTTP/1.1 (an OpenAI-compatible upstream), with no TLS to an IP upstream
    for c in doc["static_resources"]["clusters"]:
        if c["name"].startswith("tier_"):
            opts = c["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            assert opts["explicit_http_config"] == {"http_protocol_options": {}}
            assert c["type"] == "STATIC" and "transport_socket" not in c


def test_envoy_closes_idle_fast_path_connections_before_the_sidecar_does():
    # the sidecar closes an HTTP authz connection idle for IDLE_TIMEOUT_S; if Envoy kept
    # it longer, a request sent on it as the sidecar closes it would fail
    from sidecar.transports.http_authz import IDLE_TIMEOUT_S

    doc = _render(mode="http-authz")
    cluster = {c["name"]: c for c in doc["static_resources"]["clusters"]}["kt_sidecar_http"]
    opts = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in opts["explicit_http_config"]  # HTTP/1.1, as before
    idle = opts["common_http_protocol_options"]["idle_timeout"]
    assert idle.endswith("s") and 0 < float(idle[:-1]) < IDLE_TIMEOUT_S


@pytest.mark.parametrize("failure_mode", ["allow", "deny"])
def test_authz_filter_wiring(failure_mode):
    doc = _render(failure_mode=failure_mode)
    assert doc["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    listener = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener == {"address": "127.0.0.1", "port_value": 10000}
    authz = next(f["typed_config"] for f in _hcm(doc)["http_filters"]
                 if f["name"] == "envoy.filters.http.ext_authz")
    assert authz["transport_api_version"] == "V3" and authz["clear_route_cache"] is True
    assert authz["grpc_service"] == {"envoy_grpc": {"cluster_name": "kt_sidecar"},
                                     "timeout": "0.200s"}
    assert authz["failure_mode_allow"] is (failure_mode == "allow")
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    body = authz["with_request_body"]
    assert body["max_request_bytes"] == 65536 and body["allow_partial_message"] is True
    mutations = _hcm(doc)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    assert mutations == [{"remove": h} for h in (  # and no estimate default outside RLS
        "x-kt-decision", "x-kt-tenant", "x-kt-tier", "x-kt-model", "x-kt-priority", "x-kt-shadow",
        "x-kt-reservation",
        # a client's own estimate, end user and tags (docs/budgets.md, "Attribution"),
        # request id (docs/security.md), and its method overrides
        "x-kt-estimated-tokens", "x-kt-end-user", "x-kt-tags", "x-request-id",
        "x-http-method-override", "x-http-method", "x-method-override")]


@pytest.mark.parametrize("mode", ["authz", "http-authz"])
def test_attribution_headers_are_stripped_unless_a_trusted_filter_sets_them(mode):
    """The estimate's trust model: a client's own end-user and tags headers are removed
    before any filter; with `attribution.trusted` they are kept, sent to the decision
    (HTTP ext_authz lists them) and logged for the settlement."""
    def wiring(**opts):
        hcm = _hcm(_render(mode=mode, **opts))
        removed = {m.get("remove") for m in
                   hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"]}
        logged = hcm["access_log"][0]["typed_config"]["additional_request_headers_to_log"]
        authz = hcm["http_filters"][[f["name"] for f in hcm["http_filters"]].index(
            "envoy.filters.http.ext_authz")]["typed_config"]
        sent = [p["exact"] for p in authz.get("allowed_headers", {}).get("patterns", [])]
        return removed, logged, sent

    removed, logged, sent = wiring()
    assert {"x-kt-end-user", "x-kt-tags"} <= removed
    assert not {"x-kt-end-user", "x-kt-tags"} & {*logged, *sent}
    names = ("x-team-user", "x-team-tags")
    removed, logged, sent = wiring(attribution_headers=names, attribution_trusted=True)
    assert not set(names) & removed and {"x-kt-end-user", "x-kt-tags"}.isdisjoint(removed)
    assert set(names) <= set(logged)
    if mode == "http-authz":  # gRPC ext_authz sends every header
        assert set(names) <= set(sent)


@pytest.mark.parametrize("failure_mode", ["allow", "deny"])
def test_rls_filter_wiring(failure_mode):
    doc = _render(mode="rls", failure_mode=failure_mode)
    hcm = _hcm(doc)
    rl = hcm["http_filters"][0]["typed_config"]
    assert (rl["domain"], rl["request_type"], rl["timeout"]) == ("kt", "both", "0.020s")
    assert rl["failure_mode_deny"] is (failure_mode == "deny")
    assert rl["status_on_error"] == {"code": "ServiceUnavailable"}
    assert rl["enable_x_ratelimit_headers"] == "OFF"
    # the descriptor: tenant, then the optional model; the estimate as hits_addend. They
    # sit on the filter: Envoy 1.40 never sends a route table's hits_addend
    assert rl["rate_limits"] == [{
        "actions": [
            {"request_headers": {"header_name": "x-tenant-id", "descriptor_key": "tenant"}},
            {"request_headers": {"header_name": "x-kt-requested-model", "descriptor_key": "model",
                                 "skip_if_absent": True}}],
        "hits_addend": {"format": "%REQ(x-kt-estimated-tokens)%"}}]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    assert "rate_limits" not in vhost
    assert all("rate_limits" not in r.get("route", {}) for r in vhost["routes"])
    # the requests that would get no descriptor (hence no RLS call) are answered first
    first, second = vhost["routes"][:2]
    assert first["match"]["headers"] == [{"name": "x-tenant-id", "present_match": False}]
    assert second["match"]["headers"][0]["name"] == "x-kt-estimated-tokens"
    assert second["match"]["headers"][0]["invert_match"] is True
    assert first["direct_response"]["status"] == second["direct_response"]["status"] == 400
    mutation = hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"][-1]
    assert mutation == {"append": {"header": {"key": "x-kt-estimated-tokens", "value": "0"},
                                   "append_action": "ADD_IF_ABSENT"}}


@pytest.mark.envoy
def test_header_names_are_options(tmp_path):
    opts = dict(mode="rls", tenant_header="x-org", rls_model_header="x-model",
                estimate_header="x-tokens")
    _envoy_accepts(tmp_path, render(EnvoyOptions(**opts)))
    doc = _render(**opts)
    rl = _hcm(doc)["http_filters"][0]["typed_config"]["rate_limits"][0]
    assert [a["request_headers"]["header_name"] for a in rl["actions"]] == ["x-org", "x-model"]
    assert rl["hits_addend"] == {"format": "%REQ(x-tokens)%"}


def test_no_tiers_is_refused():
    with pytest.raises(ValueError, match="at least one tier"):
        render(EnvoyOptions(tiers=[]))


# --- real upstreams: hostnames, TLS, API keys, weights and failover -----------------------

def _clusters(doc: dict) -> dict:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def test_a_provider_named_by_hostname_on_443_is_dns_and_tls_with_sni_and_name_check():
    # the issue's own command: before, a STATIC cluster without TLS that Envoy refused
    doc = _render(tiers=[TierRoute("default", "gpt-4o", "api.openai.com:443")])
    c = _clusters(doc)["tier_default"]
    assert c["type"] == "LOGICAL_DNS"
    ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {"address": "api.openai.com", "port_value": 443}
    assert ep["hostname"] == "api.openai.com"
    tls = c["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    v = tls["common_tls_context"]["validation_context"]
    assert v["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
    assert v["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.openai.com"}}]
    route = _hcm(doc)["route_config"]["virtual_hosts"][0]["routes"][-2]["route"]
    assert route["auto_host_rewrite"] is True and route["cluster"] == "tier_default"


def test_the_api_key_is_read_by_envoy_from_a_file_and_never_printed(tmp_path):
    key = tmp_path / "openai.key"
    key.write_text("sk-secret-value")
    u = parse_upstream(f"https://api.openai.com,key-file={key}")
    text = render(EnvoyOptions(tiers=[TierRoute("default", "gpt-4o", [u])]))
    assert "sk-secret-value" not in text
    doc = yaml.safe_load(text)
    assert doc["static_resources"]["secrets"] == [
        {"name": "tier_default_api_key", "generic_secret": {"secret": {"filename": str(key)}}}]
    opts = _clusters(doc)["tier_default"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    injector, codec = opts["http_filters"]
    assert codec["name"] == "envoy.filters.http.upstream_codec"
    cfg = injector["typed_config"]
    assert cfg["overwrite"] is True  # a client's own Authorization never reaches the provider
    generic = cfg["credential"]["typed_config"]
    assert (generic["header"], generic["header_value_prefix"]) == ("authorization", "Bearer ")
    assert generic["credential"] == {"name": "tier_default_api_key"}


def test_weighted_upstreams_with_failover_use_priority_groups_and_a_retry_budget():
    ups = [parse_upstream("https://api.openai.com,weight=60,name=openai"),
           parse_upstream("https://acme.openai.azure.com,weight=25,name=azure,key-header=api-key"),
           parse_upstream("10.0.0.7:8000,priority=1,name=local")]
    doc = _render(tiers=[TierRoute("default", "gpt-4o", ups)])
    route = _hcm(doc)["route_config"]["virtual_hosts"][0]["routes"][-2]["route"]
    spec = route["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    assert spec["priority_groups"] == [
        {"name": "priority_0", "clusters": [{"cluster_name": "tier_default_openai", "weight": 60},
                                            {"cluster_name": "tier_default_azure", "weight": 25}]},
        {"name": "priority_1", "clusters": [{"cluster_name": "tier_default_local", "weight": 1}]}]
    retry = route["retry_policy"]
    assert retry["refresh_cluster_on_retry"] is True and retry["retriable_status_codes"] == [429]
    assert set(retry["retry_on"].split(",")) >= {"5xx", "reset", "connect-failure",
                                                 "retriable-status-codes"}
    clusters = _clusters(doc)
    assert clusters["tier_default_local"]["type"] == "STATIC"
    for name in ("tier_default_openai", "tier_default_azure", "tier_default_local"):
        budget = clusters[name]["circuit_breakers"]["thresholds"][0]["retry_budget"]
        assert budget["budget_percent"]["value"] == 20.0


@pytest.mark.subprocess
@pytest.mark.parametrize("spec,fragment", [
    ("default", "expected TIER=HOST:PORT"),
    ("default=", "expected TIER=HOST:PORT"),
    ("premium=127.0.0.1:1", "unknown tier 'premium'"),
    ("default=127.0.0.1", "expected HOST:PORT or https://HOST"),
    ("default=127.0.0.1:http", "the port must be a number from 1 to 65535"),
    ("default=127.0.0.1:70000", "the port must be a number from 1 to 65535"),
    ("default=ftp://x.example", "the scheme must be http:// or https://"),
    ("default=https://api.openai.com/v1", "a path is not allowed"),
    ("default=under_score.example:80", "neither an IP address nor a host name"),
    ("default=https://api.openai.com,weight=0", "weight must be an integer 1..1000"),
    ("default=https://api.openai.com,wieght=2", "unknown option 'wieght=2'"),
    ("default=http://10.0.0.1:80,sni=x.example", "apply to https:// upstreams only"),
])
def test_a_malformed_upstream_is_one_line_and_exit_2(spec, fragment):
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "envoy-config", "--upstream", spec],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("kt envoy-config: --upstream") and fragment in res.stderr


@pytest.mark.subprocess
@pytest.mark.parametrize("flag,value,fragment", [
    ("--sidecar", "127.0.0.1:notaport", "--sidecar '127.0.0.1:notaport': the port must be"),
    ("--sidecar", "127.0.0.1", "--sidecar '127.0.0.1': expected HOST:PORT"),
    ("--sidecar-http", ":8082", "--sidecar-http ':8082': expected HOST:PORT"),
    ("--listen", "0.0.0.0:99999", "--listen '0.0.0.0:99999': the port must be"),
    ("--admin", "::1:9901", "write an IPv6 address in brackets"),
    ("--default-upstream", "nowhere", "--default-upstream 'nowhere': expected HOST:PORT"),
])
def test_a_malformed_address_is_one_line_and_exit_2(flag, value, fragment):
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "envoy-config", flag, value],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and fragment in res.stderr, res.stderr


def test_upstream_spec_forms():
    assert parse_upstream("api.openai.com:443") == Upstream("api.openai.com", 443, tls=True)
    assert parse_upstream("https://api.openai.com") == Upstream("api.openai.com", 443, tls=True)
    assert parse_upstream("http://llm.internal") == Upstream("llm.internal", 80)
    assert parse_upstream("[::1]:8000") == Upstream("::1", 8000)
    assert parse_upstream("https://h.example:8443,name=a,weight=3,priority=2,key-header=API-Key") \
        == Upstream("h.example", 8443, tls=True, name="a", weight=3, priority=2,
                    api_key_header="api-key")
    with pytest.raises(UpstreamError, match="share the name"):
        TierRoute("t", "m", [parse_upstream("a.example:80,name=x"),
                             parse_upstream("b.example:80,name=x")]).upstreams()


# --- through a real Envoy: TLS by hostname, key injection, failover, weights --------------

@pytest.fixture(scope="module")
def tls_ca():
    import trustme

    return trustme.CA()


def _server_ctx(ca, hostname: str = "localhost"):
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(hostname).configure_cert(ctx)
    return ctx


def _through_envoy(d, tiers, n: int, headers: dict | None = None) -> list[dict]:
    admin, listen = free_port(), free_port()
    text = render(EnvoyOptions(mode="none", listen_port=listen, admin_port=admin, tiers=tiers))
    out = []
    with EnvoyProcess(text, d, admin, listen) as envoy:
        for _ in range(n):
            req = urllib.request.Request(envoy.url(), data=b'{"model":"gpt-4o"}', method="POST",
                                         headers={"content-type": "application/json",
                                                  **(headers or {})})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
                out.append(__import__("json").load(r))
    return out


@pytest.mark.envoy
def test_envoy_reaches_a_tls_provider_by_hostname_with_its_key_from_a_file(tls_ca):
    with workdir() as d, FakeUpstream("provider", ssl_context=_server_ctx(tls_ca)) as up:
        tls_ca.cert_pem.write_to_path(str(d / "ca.pem"))
        (d / "key").write_text("sk-from-the-secret-file\n".rstrip("\n"))
        u = parse_upstream(f"https://localhost:{up.port},ca={d}/ca.pem,key-file={d}/key")
        answers = _through_envoy(d, [TierRoute("default", "gpt-4o", [u])], 3,
                                 {"authorization": "Bearer client-supplied"})
    assert [a["served_by"] for a in answers] == ["provider"] * 3
    got = up.requests[-1]["headers"]
    assert got["authorization"] == "Bearer sk-from-the-secret-file"
    assert got["host"] == f"localhost:{up.port}"


@pytest.mark.envoy
def test_envoy_refuses_a_provider_whose_certificate_names_another_host(tls_ca):
    # SNI and the certificate check are real: a certificate for another name is refused
    with workdir() as d, FakeUpstream("impostor", ssl_context=_server_ctx(tls_ca, "other.example")) as up:
        tls_ca.cert_pem.write_to_path(str(d / "ca.pem"))
        u = parse_upstream(f"https://localhost:{up.port},ca={d}/ca.pem")
        with pytest.raises(urllib.error.HTTPError) as err:
            _through_envoy(d, [TierRoute("default", "gpt-4o", [u])], 1)
    assert err.value.code == 503 and up.requests == []


@pytest.mark.envoy
def test_a_provider_answering_429_fails_over_to_the_next_priority(tls_ca):
    with workdir() as d, FakeUpstream("full", status=429, ssl_context=_server_ctx(tls_ca)) as full, \
            FakeUpstream("spare", ssl_context=_server_ctx(tls_ca)) as spare:
        tls_ca.cert_pem.write_to_path(str(d / "ca.pem"))
        ups = [parse_upstream(f"https://localhost:{full.port},name=full,ca={d}/ca.pem"),
               parse_upstream(f"https://localhost:{spare.port},name=spare,priority=1,"
                              f"ca={d}/ca.pem")]
        answers = _through_envoy(d, [TierRoute("default", "gpt-4o", ups)], 10)
    assert [a["served_by"] for a in answers] == ["spare"] * 10
    assert len(full.requests) == 10  # each tried first, then retried on the spare


@pytest.mark.envoy
def test_weights_split_the_traffic_between_providers():
    with workdir() as d, FakeUpstream("a") as a, FakeUpstream("b") as b:
        ups = [parse_upstream(f"127.0.0.1:{a.port},name=a,weight=3"),
               parse_upstream(f"127.0.0.1:{b.port},name=b,weight=1")]
        answers = _through_envoy(d, [TierRoute("default", "gpt-4o", ups)], 200)
    counts = collections.Counter(x["served_by"] for x in answers)
    # 3:1 of 200 is 150 ± 6.1 (one standard deviation): 110..190 is more than six of them
    assert 110 < counts["a"] < 190 and counts["a"] + counts["b"] == 200, counts

@pytest.mark.envoy
@pytest.mark.parametrize("mode", ["authz", "http-authz"])
@pytest.mark.parametrize("usage", ["ext_proc", "none"])
def test_the_other_usage_modes_validate(tmp_path, capsys, mode, usage):
    assert kt(["envoy-config", "--mode", mode, "--usage", usage]) == 0
    text = capsys.readouterr().out
    _envoy_accepts(tmp_path, text)
    hcm = _hcm(yaml.safe_load(text))
    filters = [f["name"] for f in hcm["http_filters"]]
    assert "access_log" not in hcm
    assert ("envoy.filters.http.ext_proc" in filters) is (usage == "ext_proc")
    # with ext_proc, the Lua filter still asks streams for their usage (requests only:
    # ext_proc reads the responses)
    assert ("envoy.filters.http.lua" in filters) is (usage == "ext_proc")
    if usage == "ext_proc":
        lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")
        source = lua["typed_config"]["default_source_code"]["inline_string"]
        assert source.rstrip().endswith("envoy_on_response = nil")
        # what the filter reads of a large body reaches ext_proc (docs/usage.md)
        ext_proc = next(f for f in hcm["http_filters"]
                        if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
        assert ext_proc["metadata_options"] == {
            "forwarding_namespaces": {"untyped": ["kt.usage"]}}


@pytest.mark.parametrize("with_body, decided", [(True, 65536), (False, 0)])
def test_the_usage_filter_reads_what_the_decision_does_not(with_body, decided):
    # a body over the part ext_authz passes to the decision is read by the filter for the
    # bound (sidecar/settlement/bound.py); without a body to the decision, every body is
    doc = bootstrap(EnvoyOptions(with_request_body=with_body))
    lua = next(f for f in _hcm(doc)["http_filters"] if f["name"] == "envoy.filters.http.lua")
    source = lua["typed_config"]["default_source_code"]["inline_string"]
    assert f"\nlocal DECIDED_BYTES = {decided}\n" in source


def test_usage_by_access_log_wiring():
    """ext_proc is skipped (no stream) unless the decision downgraded the request, and then
    only sees the request (headers for the target model, the body to rewrite); usage goes
    by the access log, one entry per admitted request, batched, to the sidecar."""
    hcm = _hcm(_render(usage_flush_s=0.25, usage_buffer_bytes=32768))
    by_name = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    wrapped = by_name["envoy.filters.http.ext_proc"]
    assert wrapped["@type"].endswith("common.matching.v3.ExtensionWithMatcher")
    [rule] = wrapped["xds_matcher"]["matcher_list"]["matchers"]
    negated = rule["predicate"]["not_matcher"]["single_predicate"]
    assert negated["input"]["typed_config"]["header_name"] == "x-kt-decision"
    assert negated["value_match"] == {"exact": "downgrade"}
    assert rule["on_match"]["action"]["typed_config"]["@type"].endswith("SkipFilter")
    ext_proc = wrapped["extension_config"]["typed_config"]
    mode = ext_proc["processing_mode"]
    assert (mode["request_header_mode"], mode["request_body_mode"]) == ("SEND", "BUFFERED")
    assert (mode["response_header_mode"], mode["response_body_mode"]) == ("SKIP", "NONE")
    assert ext_proc["grpc_service"]["initial_metadata"] == [
        {"key": "x-kt-ext-proc", "value": "rewrite"}]
    assert "envoy_on_response" in by_name["envoy.filters.http.lua"]["default_source_code"][
        "inline_string"]
    [log] = hcm["access_log"]
    assert log["filter"] == {"header_filter": {"header": {"name": "x-kt-decision",
                                                          "present_match": True}}}
    common = log["typed_config"]["common_config"]
    assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": "kt_sidecar"}}
    assert (common["buffer_flush_interval"], common["buffer_size_bytes"]) == ("0.250s", 32768)
    assert log["typed_config"]["additional_request_headers_to_log"] == [
        # the settlement key is the sidecar's own id; the routed model labels the SLIs
        "x-kt-tenant", "x-kt-reservation", "x-kt-model"]


JWT_POLICY = ('tenant: {metadata: "envoy.filters.http.jwt_authn:jwt_payload.org"}\n'
              "tiers: [{name: default, model: gpt-4o}]\n")


@pytest.mark.subprocess
@pytest.mark.parametrize("extra,fragment", [
    # the old docs/deploy set-up: every request answered 400 missing_tenant
    (["--mode", "http-authz", "--jwt-issuer", "i", "--jwt-jwks-file", "/k"],
     "only gRPC ext_authz (--mode authz) sends; --mode http-authz would answer every request 400"),
    (["--mode", "rls", "--jwt-issuer", "i", "--jwt-jwks-file", "/k"], "--mode rls would answer"),
    ([], "no jwt_authn filter would validate one"),
    (["--jwt-jwks-file", "/k"], "both its issuer and the JWKS file"),
])
def test_a_tenant_source_the_envoy_mode_cannot_carry_is_refused(tmp_path, extra, fragment):
    policy = tmp_path / "policy.yaml"
    policy.write_text(JWT_POLICY)
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "envoy-config", "--config",
                          str(policy), *extra], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.count("\n") == 1
    assert fragment in res.stderr, res.stderr


@pytest.mark.subprocess
def test_a_jwt_needs_its_issuer_and_its_keys():
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "envoy-config", "--jwt-issuer",
                          "i"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "both its issuer and the JWKS file" in res.stderr


def test_the_jwt_filter_validates_before_the_decision_and_keeps_the_token(tmp_path):
    doc = _render(jwt_issuer="https://auth.example.com/", jwt_jwks_file="/etc/jwks.json",
                  jwt_audiences=("llm",), tenant_metadata_namespace="envoy.filters.http.jwt_authn")
    filters = _hcm(doc)["http_filters"]
    assert [f["name"] for f in filters][:3] == ["envoy.filters.http.jwt_authn",
                                                "envoy.filters.http.lua",
                                                "envoy.filters.http.ext_authz"]
    jwt = filters[0]["typed_config"]
    assert jwt["providers"]["gateway"] == {
        "issuer": "https://auth.example.com/", "local_jwks": {"filename": "/etc/jwks.json"},
        "payload_in_metadata": "jwt_payload", "forward": False, "audiences": ["llm"]}
    assert jwt["rules"] == [{"match": {"prefix": "/"}, "requires": {"provider_name": "gateway"}}]
    assert filters[2]["typed_config"]["metadata_context_namespaces"] == [
        "envoy.filters.http.jwt_authn"]


def test_a_sidecar_named_by_hostname_is_resolved_by_dns():
    doc = _render(sidecar_address="kt-sidecar.llm-gateway.svc:8081")
    sidecar = _clusters(doc)["kt_sidecar"]
    assert sidecar["type"] == "STRICT_DNS"
    ep = sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {"address": "kt-sidecar.llm-gateway.svc",
                                               "port_value": 8081}


@pytest.mark.envoy
def test_pass_path_adds_an_exact_route_and_refuses_a_bad_one(tmp_path, capsys):
    assert kt(["envoy-config", "--pass-path", "GET:/v1/models"]) == 0
    text = capsys.readouterr().out
    _envoy_accepts(tmp_path, text)
    routes = _hcm(yaml.safe_load(text))["route_config"]["virtual_hosts"][0]["routes"]
    get = [r for r in routes if {"name": ":method", "string_match": {"exact": "GET"}}
           in r["match"].get("headers", [])]
    assert [(r["name"], r["match"]["path"]) for r in get] == [
        ("GET /v1/models", "/v1/models")] * 2  # 2 tiers
    assert "GET /v1/models" in routes[-1]["direct_response"]["body"]["inline_string"]
    assert kt(["envoy-config", "--pass-path", "GET:/v1/../files"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kt envoy-config: --pass-path 'GET:/v1/../files': ") and err.count("\n") == 1


# --- every Envoy config the docs print validates as printed --------------------------------

ROOT = Path(__file__).resolve().parent.parent.parent


def _joined(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line)
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


def docs_envoy_configs() -> list[tuple[str, list[str], str]]:
    """(where, `kt` arguments, the policy they name or "") of every `kt envoy-config` the
    README and docs/*.md print: their shell blocks, the README's weighted-upstream flags and
    docs/providers.md's policy with `kt envoy-config --config policy.yaml`."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"```sh\n(.*?)\n```", text, re.S):
            for cmd in _joined(block):
                m = re.match(r"(?:\.venv/bin/)?kt (envoy-config .*?)(?: > envoy\.yaml)?$", cmd)
                if m:
                    found.append((f"{doc.name}: {cmd[:60]}", shlex.split(m.group(1)), ""))
    readme = (ROOT / "README.md").read_text()
    (weighted,) = re.findall(r"`(--upstream 'default=https://api\.openai\.com,weight=[^`]+)`",
                             readme)
    found.append(("README.md: weighted providers", ["envoy-config", *shlex.split(weighted)], ""))
    providers = (ROOT / "docs" / "providers.md").read_text()
    assert "`kt envoy-config --config policy.yaml`" in providers
    policy = re.findall(r"```yaml\n(.*?)\n```", providers, re.S)[0]
    found.append(("providers.md: the policy with providers",
                  ["envoy-config", "--config", "policy.yaml"], policy))
    return found


def _place_files(node, d: Path, ca, leaf, where: str = "") -> None:
    """Create every file the config names (a relative path, or one under `d`), as Envoy
    will read it: a certificate and its key (``leaf``, of ``ca``), the CA, a JWKS, or a
    secret's text."""
    if isinstance(node, list):
        for v in node:
            _place_files(v, d, ca, leaf, where)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "filename" and isinstance(value, str):
            path = Path(value)
            if path.is_absolute() and not path.is_relative_to(d):
                assert path.is_file(), (f"{value} ({where}): an absolute path this machine "
                                        "lacks; the docs name files relative to Envoy's "
                                        "working directory")
                continue
            path = d / path
            path.parent.mkdir(parents=True, exist_ok=True)
            if where == "trusted_ca":
                ca.cert_pem.write_to_path(str(path))
            elif where == "certificate_chain":
                leaf.cert_chain_pems[0].write_to_path(str(path))
            elif where == "private_key":
                leaf.private_key_pem.write_to_path(str(path))
            elif where == "local_jwks":
                path.write_text(json.dumps(rs256_keys()[1]))
            else:
                path.write_text("sk-placeholder")
        else:
            _place_files(value, d, ca, leaf, key)


@pytest.mark.envoy
@pytest.mark.parametrize("where,args,policy", [
    pytest.param(*example, id=example[0]) for example in docs_envoy_configs()])
def test_every_envoy_config_the_docs_print_validates_as_printed(
        tmp_path, monkeypatch, capsys, tls_ca, where, args, policy):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PWD", str(tmp_path))
    args = [a.replace("$PWD", str(tmp_path)) for a in args]
    if policy:
        (tmp_path / "policy.yaml").write_text(policy)
    assert kt(args) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    _place_files(yaml.safe_load(text), tmp_path, tls_ca, tls_ca.issue_cert("envoy.kt.test"))
    (tmp_path / "envoy.yaml").write_text(text)
    # Envoy in the directory the commands ran in: the relative paths are read from there
    res = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", "envoy.yaml",
                          "--log-level", "warning"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, where + "\n" + res.stdout + res.stderr
    assert "eprecated" not in res.stdout + res.stderr


def test_a_relative_key_file_is_left_for_envoy_to_resolve_from_its_working_directory(capsys):
    assert kt(["envoy-config", "--upstream",
               "default=https://api.openai.com,key-file=secrets/openai.key"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    (secret,) = doc["static_resources"]["secrets"]
    assert secret["generic_secret"]["secret"]["filename"] == "secrets/openai.key"
