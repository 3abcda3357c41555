"""What a new user meets first from the `kt` CLI: its version, a wrong port named as such,
and tiers sent to the default upstream said out loud."""
from __future__ import annotations

from importlib.metadata import version

import pytest

from sidecar.cli import main as kt
from tests.support.procs import SidecarProcess, free_port, workdir
from tests.support.servers import starts


def test_kt_version(capsys):
    with pytest.raises(SystemExit) as done:
        kt(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kt-sidecar {version('kt-sidecar')}"


@pytest.fixture(scope="module")
@starts("subprocess")
def sidecar():
    with workdir() as d:
        policy = d / "policy.yaml"
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n")
        with SidecarProcess(policy, d) as s:
            yield s


def test_kt_spend_names_the_admin_port_when_given_another(sidecar, capsys):
    assert kt(["spend", "--admin", f"127.0.0.1:{sidecar.admin_port}"]) == 0  # the right one
    capsys.readouterr()
    # the HTTP side port (metrics): 404, said to be the wrong port
    assert kt(["spend", "--admin", f"127.0.0.1:{sidecar.http_port}"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "is not the sidecar's admin port" in err, err
    # the gRPC port answers HTTP/2, not an HTTP/1.1 reply: no traceback, the port named
    assert kt(["spend", "--admin", f"127.0.0.1:{sidecar.grpc_port}"]) == 1
    err = capsys.readouterr().err
    assert "the gRPC port?" in err and "Traceback" not in err, err
    # nothing listening
    assert kt(["spend", "--admin", f"127.0.0.1:{free_port()}"]) == 1
    assert "nothing listens there" in capsys.readouterr().err


def test_the_printed_config_says_which_tiers_go_to_the_default_upstream(capsys, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("tiers: [{name: default, model: gpt-4o}, {name: compact, model: m}]\n")
    assert kt(["envoy-config", "--config", str(policy),
               "--upstream", "default=127.0.0.1:7000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Tier(s) compact: no --upstream given, routed to "
                          "--default-upstream 127.0.0.1:8000\n"), out[:200]
    assert kt(["envoy-config", "--config", str(policy), "--upstream", "default=127.0.0.1:7000",
               "--upstream", "compact=127.0.0.1:7001"]) == 0
    assert "default-upstream" not in capsys.readouterr().out
