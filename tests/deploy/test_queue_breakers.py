"""The printed Envoy config lets a full admission queue through its circuit breaker to
the sidecar, and `kt check-config` warns where a queue could overflow Envoy's default one."""
from __future__ import annotations

import pytest
import yaml

from sidecar.cli import main
from sidecar.envoy_config import SIDECAR_DECIDING_MAX
from tests.support.procs import envoy_validate

POLICY = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
%s
"""


def _breakers(doc: dict) -> dict:
    return {c["name"]: c["circuit_breakers"]["thresholds"][0]
            for c in doc["static_resources"]["clusters"] if c["name"].startswith("kt_sidecar")}


@pytest.mark.envoy
@pytest.mark.parametrize("mode", ["authz", "http-authz"])
def test_the_sidecars_clusters_allow_the_whole_queue_on_top_of_the_decisions(
        tmp_path, capsys, mode):
    policy = tmp_path / "policy.yaml"
    for queue, places in (("queue: {max_wait_ms: 2000, max_size: 1000}", 1000), ("", 0)):
        policy.write_text(POLICY % queue)
        assert main(["envoy-config", "--config", str(policy), "--mode", mode]) == 0
        text = capsys.readouterr().out
        (tmp_path / "envoy.yaml").write_text(text)
        envoy_validate(tmp_path / "envoy.yaml")
        breakers = _breakers(yaml.safe_load(text))
        assert set(breakers) == ({"kt_sidecar", "kt_sidecar_http"} if mode == "http-authz"
                                 else {"kt_sidecar"})
        for b in breakers.values():
            assert b["max_requests"] == b["max_pending_requests"] == SIDECAR_DECIDING_MAX + places


def test_the_decision_deadline_is_under_the_printed_ext_authz_timeout():
    from sidecar.backends.link_watch import ANSWER_MARGIN_S, CALLER_WAIT_S, deadline_s
    from sidecar.envoy_config import EnvoyOptions

    assert CALLER_WAIT_S == EnvoyOptions.authz_timeout_s
    assert deadline_s(50) == CALLER_WAIT_S - ANSWER_MARGIN_S < EnvoyOptions.authz_timeout_s


def test_check_config_warns_where_a_queue_could_overflow_envoys_breaker(tmp_path, capsys):
    big, small = tmp_path / "big.yaml", tmp_path / "small.yaml"
    big.write_text(POLICY % "queue: {max_wait_ms: 2000, max_size: 1000}")
    small.write_text(POLICY % "queue: {max_wait_ms: 2000, max_size: 100}")
    assert main(["check-config", str(big), str(small)]) == 0  # a warning is not an error
    err = capsys.readouterr().err
    assert f"{big}: warning: queue.max_size 1000" in err
    assert "circuit breaker" in err and "2024" in err
    assert str(small) not in err


def test_envoy_config_notes_a_store_silence_longer_than_the_rls_timeout(tmp_path, capsys):
    policy = tmp_path / "policy.yaml"
    for timeout, noted in (("", True), ("timeout_ms: 15, ", False)):
        policy.write_text(POLICY % (
            f'backend: {{kind: redis, {timeout}url: "redis://127.0.0.1:6379/0"}}'))
        for mode in ("rls", "authz"):
            assert main(["envoy-config", "--config", str(policy), "--mode", mode]) == 0
            err = capsys.readouterr().err
            assert ("not under Envoy's RLS timeout" in err) is (noted and mode == "rls"), err
