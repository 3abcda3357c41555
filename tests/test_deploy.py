"""The deployment examples stay in step with the CLI and the side port."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml

from sidecar.cli import build_parser
from sidecar.policy.load import parse_policy
from tests.support.procs import workdir
from tests.support.valkey import Valkey

DEPLOY = Path(__file__).parent.parent / "docs" / "deploy"


def test_kubernetes_example_args_probes_and_policy_are_real():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    policy = docs[0]["data"]["policy.yaml"]
    parsed = parse_policy(policy.encode(), "kubernetes.yaml ConfigMap")
    assert parsed.tenant_metadata is not None and "acme" in parsed.tenants
    pod = docs[1]["spec"]["template"]["spec"]
    kt = next(c for c in pod["containers"] if c["name"] == "kt-sidecar")
    args = build_parser().parse_args(["serve", *kt["args"]])
    assert args.workers == 2 and args.http_authz == "127.0.0.1:8082"
    http_port = int(args.http.rsplit(":", 1)[1])
    assert kt["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
    assert kt["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http_port}
    assert kt["ports"][0]["containerPort"] == http_port


def test_istio_example_parses_and_points_at_the_grpc_port():
    docs = list(yaml.safe_load_all((DEPLOY / "istio.yaml").read_text()))
    provider = docs[0]["extensionProviders"][0]
    assert provider["envoyExtAuthzGrpc"]["port"] == 8081
    assert docs[1]["spec"]["provider"]["name"] == provider["name"]


# --- operator mistakes: one clear line, a non-zero exit, never a traceback ----------------

@contextlib.contextmanager
def occupied_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


def kt_serve(*args: str, policy: Optional[Path] = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sidecar.cli", "serve", "--grpc", "127.0.0.1:0",
           "--http", "127.0.0.1:0", *args]
    if policy is not None:
        cmd += ["--config", str(policy)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess, code: int, expected: str) -> None:
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr == f"kt serve: {expected}\n"


@pytest.mark.parametrize("flag", ["--grpc", "--http", "--http-authz"])
def test_a_port_in_use_is_named_in_one_line(flag):
    with occupied_port() as addr:
        res = kt_serve(flag, addr)
    one_line(res, 4, f"cannot listen on {addr} ({flag}): Address already in use")


def test_an_address_not_on_this_host_is_named_in_one_line():
    res = kt_serve("--grpc", "192.0.2.1:8081")  # TEST-NET-1: never a local address
    one_line(res, 4, "cannot listen on 192.0.2.1:8081 (--grpc): Cannot assign requested address")


@pytest.mark.parametrize("flag,value,expected", [
    ("--grpc", "127.0.0.1:notaport", "--grpc '127.0.0.1:notaport': the port must be a number "
                                      "from 0 to 65535"),
    ("--http", "9090", "--http '9090': expected HOST:PORT"),
    ("--http-authz", "localhost:99999", "--http-authz 'localhost:99999': the port must be a "
                                         "number from 0 to 65535"),
])
def test_a_malformed_address_is_named_in_one_line(flag, value, expected):
    one_line(kt_serve(flag, value), 2, expected)


def test_with_workers_a_port_in_use_is_still_one_line(tmp_path):
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n"
                          f'backend: {{kind: redis, url: "{v.url}"}}\n')
        with occupied_port() as addr:
            grpc_res = kt_serve("--workers", "2", "--grpc", addr, policy=policy)
            http_res = kt_serve("--workers", "2", "--http", addr, policy=policy)
    one_line(grpc_res, 4, f"cannot listen on {addr} (--grpc): Address already in use")
    one_line(http_res, 4, f"cannot listen on {addr} (--http): Address already in use")
