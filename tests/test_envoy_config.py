"""`kt envoy-config` prints bootstraps the real Envoy accepts, with the documented wiring."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from sidecar.cli import main as kt
from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from tests.support.procs import find_binary


@pytest.mark.parametrize("mode", ["authz", "rls", "http-authz"])
@pytest.mark.parametrize("failure_mode", ["allow", "deny"])
def test_envoy_validates_every_variant(tmp_path, capsys, mode, failure_mode):
    assert kt(["envoy-config", "--mode", mode, "--failure-mode", failure_mode,
               "--upstream", "default=127.0.0.1:8000", "--upstream", "compact=127.0.0.1:8001"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    res = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(path),
                          "--log-level", "error"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load(text)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = [f["name"] for f in hcm["http_filters"]]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    fast_path = {"kt_sidecar_http"} if mode == "http-authz" else set()
    assert clusters == {"kt_sidecar", "tier_default", "tier_compact"} | fast_path
    compact = [r for r in routes if r.get("route", {}).get("cluster") == "tier_compact"]
    assert compact[0]["match"]["headers"] == [{"name": "x-kt-tier", "string_match": {"exact": "compact"}}]
    assert routes[-1]["route"]["cluster"] == "tier_default"
    if mode in ("authz", "http-authz"):
        assert filters == ["envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc",
                           "envoy.filters.http.router"]
        authz = hcm["http_filters"][0]["typed_config"]
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


def test_one_cluster_and_one_header_route_per_tier_and_the_catch_all_goes_to_the_first(tmp_path):
    _envoy_accepts(tmp_path, render(EnvoyOptions(tiers=THREE, ext_proc=False)))
    doc = _render(tiers=THREE, ext_proc=False)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert set(clusters) == {"kt_sidecar", "tier_best", "tier_mid", "tier_cheap"}
    ep = clusters["tier_cheap"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9003}
    routes = _hcm(doc)["route_config"]["virtual_hosts"][0]["routes"]
    assert [(r["match"].get("headers"), r["route"]["cluster"]) for r in routes] == [
        ([{"name": "x-kt-tier", "string_match": {"exact": "mid"}}], "tier_mid"),
        ([{"name": "x-kt-tier", "string_match": {"exact": "cheap"}}], "tier_cheap"),
        (None, "tier_best")]


def test_the_sidecar_cluster_is_static_loopback_http2_with_a_short_connect_timeout():
    doc = _render(sidecar_address="127.0.0.1:18081")
    sidecar = {c["name"]: c for c in doc["static_resources"]["clusters"]}["kt_sidecar"]
    assert sidecar["type"] == "STATIC" and sidecar["connect_timeout"] == "0.25s"
    opts = sidecar["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    ep = sidecar["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18081}
    # the tiers speak HTTP/1.1 (no protocol options): an OpenAI-compatible upstream
    assert all("typed_extension_protocol_options" not in c
               for c in doc["static_resources"]["clusters"] if c["name"].startswith("tier_"))


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
    authz = _hcm(doc)["http_filters"][0]["typed_config"]
    assert authz["transport_api_version"] == "V3" and authz["clear_route_cache"] is True
    assert authz["grpc_service"] == {"envoy_grpc": {"cluster_name": "kt_sidecar"},
                                     "timeout": "0.200s"}
    assert authz["failure_mode_allow"] is (failure_mode == "allow")
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    body = authz["with_request_body"]
    assert body["max_request_bytes"] == 65536 and body["allow_partial_message"] is True
    mutations = _hcm(doc)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    assert mutations == [{"remove": h} for h in (  # and no estimate default outside RLS
        "x-kt-decision", "x-kt-tenant", "x-kt-tier", "x-kt-model", "x-kt-priority", "x-kt-shadow")]


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
