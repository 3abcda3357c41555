"""`kt envoy-config` prints bootstraps the real Envoy accepts, with the documented wiring."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from sidecar.cli import main as kt
from tests.support.procs import find_binary


@pytest.mark.parametrize("mode", ["authz", "rls"])
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
    assert clusters == {"kt_sidecar", "tier_default", "tier_compact"}
    compact = [r for r in routes if r.get("route", {}).get("cluster") == "tier_compact"]
    assert compact[0]["match"]["headers"] == [{"name": "x-kt-tier", "string_match": {"exact": "compact"}}]
    assert routes[-1]["route"]["cluster"] == "tier_default"
    if mode == "authz":
        assert filters == ["envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc",
                           "envoy.filters.http.router"]
        authz = hcm["http_filters"][0]["typed_config"]
        assert authz["clear_route_cache"] is True
        assert authz["failure_mode_allow"] is (failure_mode == "allow")
    else:
        assert filters == ["envoy.filters.http.ratelimit", "envoy.filters.http.router"]
        assert hcm["http_filters"][0]["typed_config"]["failure_mode_deny"] is (failure_mode == "deny")


def test_unknown_tier_in_upstream_flag_is_refused(capsys):
    assert kt(["envoy-config", "--upstream", "premium=127.0.0.1:1"]) == 2
    assert "unknown tier" in capsys.readouterr().err
