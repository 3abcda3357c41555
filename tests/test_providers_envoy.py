"""Providers through Envoy: `kt envoy-config` from a policy with providers (validated by a
real `envoy --mode validate`), and end to end through a real Envoy, the real `kt serve`
and fake providers that answer 429 when their own quota is exceeded."""
from __future__ import annotations

import yaml

from sidecar import contract
from sidecar.cli import main
from tests.test_envoy_config import envoy_validate

PROVIDERS_POLICY = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
providers:
  - {id: openai-4o, models: [gpt-4o], host: api.openai.com,
     rate_limits: {requests_per_minute: 500}, reserve: {high: 0.2}}
  - {id: azure-east, models: [gpt-4o], host: kt-east.openai.azure.com, port: 443,
     sni: kt-east.openai.azure.com}
  - {id: local-mini, models: [gpt-4o-mini], host: 127.0.0.1, port: 8001}
queue: {max_wait_ms: 3000}
"""


def _config(tmp_path, capsys, mode: str) -> dict:
    policy = tmp_path / "policy.yaml"
    policy.write_text(PROVIDERS_POLICY)
    assert main(["envoy-config", "--config", str(policy), "--mode", mode]) == 0
    text = capsys.readouterr().out
    out = tmp_path / f"envoy-{mode}.yaml"
    out.write_text(text)
    envoy_validate(out)
    return yaml.safe_load(text)


def _hcm(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def test_envoy_config_routes_on_the_decisions_provider_and_waits_for_the_queue(tmp_path, capsys):
    for mode in ("authz", "http-authz"):
        doc = _config(tmp_path, capsys, mode)
        clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
        assert {"provider_openai-4o", "provider_azure-east", "provider_local-mini"} <= set(clusters)
        openai = clusters["provider_openai-4o"]
        assert openai["type"] == "LOGICAL_DNS"
        assert openai["transport_socket"]["typed_config"]["sni"] == "api.openai.com"
        assert clusters["provider_local-mini"]["type"] == "STATIC"
        assert "transport_socket" not in clusters["provider_local-mini"]
        hcm = _hcm(doc)
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        by_provider = {r["match"]["headers"][0]["string_match"]["exact"]: r["route"]["cluster"]
                       for r in routes if r["match"].get("headers")
                       and r["match"]["headers"][0]["name"] == contract.H_PROVIDER}
        assert by_provider == {"openai-4o": "provider_openai-4o",
                               "azure-east": "provider_azure-east",
                               "local-mini": "provider_local-mini"}
        # a client cannot pick a provider: its own x-kt-provider is removed before any filter
        removed = [m["remove"] for m in hcm["early_header_mutation_extensions"][0][
            "typed_config"]["mutations"] if "remove" in m]
        assert contract.H_PROVIDER in removed and contract.H_REASON in removed
        authz = next(f["typed_config"] for f in hcm["http_filters"]
                     if f["name"] == "envoy.filters.http.ext_authz")
        timeout = (authz["grpc_service"]["timeout"] if mode == "authz"
                   else authz["http_service"]["server_uri"]["timeout"])
        assert timeout == "3.250s"  # the queue's 3 s wait and the answer's way back
        if mode == "http-authz":
            allowed = authz["http_service"]["authorization_response"]
            names = {p.get("exact") for p in allowed["allowed_upstream_headers"]["patterns"]}
            assert {contract.H_PROVIDER, contract.H_REASON} <= names
