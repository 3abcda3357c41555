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
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n"
                          "pricing: {gpt-4o: {input: 0.0025, output: 0.01}}\n"
                          "tenants: {acme: {budget: {usd: 50, period: month}}}\n")
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


def test_kt_status_shows_readiness_policy_and_todays_top_spender(sidecar, capsys):
    import json

    from tests.support.procs import post_json

    admin = f"127.0.0.1:{sidecar.admin_port}"
    status, ack = post_json(f"http://{admin}/v1/usage", {
        "request_id": "r-status-1", "tenant": "acme", "model": "gpt-4o",
        "input_tokens": 1000, "output_tokens": 100})
    assert status == 200 and ack["applied"], ack
    assert kt(["status", "--admin", admin, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ready"] is True and doc["backend"] == "memory"
    assert len(doc["policy"]["digest"]) >= 8
    assert doc["failure_mode_decisions_last_minute"] == 0 and doc["queue_depth"] == 0
    top = doc["top_tenants_today"][0]
    # 1,000 input at $0.0025/1K and 100 output at $0.01/1K
    assert top["tenant"] == "acme" and top["requests"] == 1
    assert abs(top["usd"] - 0.0035) < 1e-12, top
    assert kt(["status", "--admin", admin]) == 0
    screen = capsys.readouterr().out
    assert screen.startswith("READY") and "acme" in screen and "$      0.0035" in screen
    # the side port is not the admin port: said, as for kt spend
    assert kt(["status", "--admin", f"127.0.0.1:{sidecar.http_port}"]) == 1
    assert "is not the sidecar's admin port" in capsys.readouterr().err


@pytest.mark.parametrize("answer", [b"[]", b'{"ready": true}', b'"text"',
                                    b'{"ready": true, "top_tenants_today": [null]}'])
def test_kt_status_says_so_in_one_line_when_the_answer_is_not_a_status(answer, capsys):
    """A port that answers JSON but not a status document (another service, a hostile
    peer): one line naming it, exit 1, never a traceback."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (stdlib name)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert kt(["status", "--admin", f"127.0.0.1:{server.server_address[1]}"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "is not a status document" in err and err.count("\n") == 1, err
