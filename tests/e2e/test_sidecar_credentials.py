"""Envoy presents the sidecar's credential: a sidecar listening beyond loopback (0.0.0.0 on
an ephemeral port, reached by Envoy at 127.0.0.1) requires the token or mTLS, and the
bootstrap `kt envoy-config` prints with --sidecar-token-file or --sidecar-tls-* makes a
real Envoy present it on every call: ext_authz over gRPC and HTTP, RLS, ext_proc and the
usage access log. Without it (or with the wrong one) each call is refused and Envoy's
failure mode answers (503)."""
from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port, log_tail, wait_until,
                                 workdir)
from tests.support.upstream import FakeUpstream
from tests.support.procs import envoy_validate

pytestmark = pytest.mark.envoy

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 1000000}
  budget: {usd: 5, period: month}
"""
TOKEN = "envoy-presents-this-token-0123456789"
SIDECAR_NAME = "kt-sidecar.kt.test"  # the name in the sidecar's certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """The sidecar's certificate (for its name only, not for 127.0.0.1: Envoy must send the
    name as SNI and check it), Envoy's client certificate of the same CA, and a client
    certificate of another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    files = {}
    for name, leaf in (("server", ca.issue_cert(SIDECAR_NAME)),
                       ("client", ca.issue_cert("envoy.kt.test")),
                       ("stranger", other.issue_cert("envoy.kt.test"))):
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
        leaf.private_key_pem.write_to_path(str(d / f"{name}.key"))
        files[name], files[f"{name}_key"] = str(d / f"{name}.pem"), str(d / f"{name}.key")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    files["ca"] = str(d / "ca.pem")
    (d / "token").write_text(TOKEN + "\n")  # kt serve and Envoy read the same file
    (d / "wrong-token").write_text("not-the-token-but-long-enough\n")
    files["token"], files["wrong_token"] = str(d / "token"), str(d / "wrong-token")
    return files


class Gateway:
    def __init__(self, sidecar: SidecarProcess, upstream: FakeUpstream, d: Path) -> None:
        self.sidecar, self.upstream, self.dir = sidecar, upstream, d

    @contextlib.contextmanager
    def envoy(self, mode: str, usage: str = "als", **credential: str) -> Iterator[EnvoyProcess]:
        admin, listen = free_port(), free_port()
        opts = EnvoyOptions(
            listen_port=listen, admin_port=admin, mode=mode, usage=usage,  # type: ignore[arg-type]
            sidecar_address=f"127.0.0.1:{self.sidecar.grpc_port}",
            sidecar_http_address=f"127.0.0.1:{self.sidecar.http_authz_port or 1}",
            rls_timeout_s=1.0, authz_timeout_s=1.0,  # a loaded CI machine, not the subject
            tiers=[TierRoute("default", "gpt-4o", self.upstream.address),
                   TierRoute("compact", "gpt-4o-mini", self.upstream.address)],
            **credential)
        with EnvoyProcess(render(opts), self.dir, admin, listen) as envoy:
            try:
                yield envoy
            except AssertionError as exc:
                exc.args = (f"{exc.args[0] if exc.args else ''}{log_tail(envoy.log, 20)}"
                            f"{log_tail(self.sidecar.log, 20)}",)
                raise

    def post(self, envoy: EnvoyProcess, tenant: str, usage: str = "7,3") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps({
                "model": "gpt-4o", "max_tokens": 20,
                "messages": [{"role": "user", "content": "hi"}]}),
                headers={"x-tenant-id": tenant, "content-type": "application/json",
                         "x-fake-usage": usage})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def counter(self, name: str, labels: str = "") -> float:
        m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", self.sidecar.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    def spend(self, tenant: str) -> dict:
        """The tenant's durable spend (the admin port is loopback-only here), once its
        request is settled (the access log delivers usage after the response)."""
        def read() -> dict:
            return self.sidecar.spend().get(tenant, {})

        wait_until(lambda: read().get("gpt-4o", {}).get("input_tokens"), 10,
                   f"the usage of {tenant}'s request settled")
        return read()


@contextlib.contextmanager
def gateway(*sidecar_args: str) -> Iterator[Gateway]:
    with workdir() as d, FakeUpstream("default") as up:
        (d / "policy.yaml").write_text(POLICY)
        # beyond loopback: kt serve refuses this without the credential sidecar_args give
        with SidecarProcess(d / "policy.yaml", d, ("--grpc", "0.0.0.0:0", *sidecar_args)) as sc:
            yield Gateway(sc, up, d)


# (mode, usage): every way Envoy calls the sidecar. ext_authz gRPC with usage by the
# access log (and the body-rewrite ext_proc) or by ext_proc per request; HTTP ext_authz
# (the fast path) with usage by the access log; RLS
ROUTES = [("authz", "als"), ("authz", "ext_proc"), ("http-authz", "als"), ("rls", "none")]


def test_envoy_sends_the_token_from_its_file_on_every_call(pki):
    with gateway("--http-authz", "0.0.0.0:0", "--grpc-token-file", pki["token"]) as gw:
        for n, (mode, usage) in enumerate(ROUTES):
            tenant = f"token-{n}"
            with gw.envoy(mode, usage, sidecar_token_file=pki["token"]) as envoy:
                assert gw.post(envoy, tenant) == 200, (mode, usage)
                if mode != "rls":  # RLS carries no usage back: nothing to settle
                    rec = gw.spend(tenant)["gpt-4o"]  # settled with the upstream's usage
                    assert (rec["requests"], rec["input_tokens"], rec["output_tokens"]) == \
                        (1, 7, 3), (mode, usage)
        assert gw.counter("kt_auth_failures_total", '{listener="grpc"}') == 0
        assert gw.counter("kt_auth_failures_total", '{listener="http_authz"}') == 0
        decided = sum(gw.counter("kt_requests_total", f'{{decision="allow",transport="{t}"}}')
                      for t in ("authz", "http", "rls"))
        assert decided == len(ROUTES)
        # without the token, or with another one: refused. Over gRPC the call fails and
        # Envoy's failure mode answers (503); the fast path's refusal is a 401 that HTTP
        # ext_authz passes on to the client as a denial (closed whatever the failure mode)
        for mode, listener, status in (("authz", "grpc", 503), ("http-authz", "http_authz", 401),
                                       ("rls", "grpc", 503)):
            for credential in ({}, {"sidecar_token_file": pki["wrong_token"]}):
                before = gw.counter("kt_auth_failures_total", f'{{listener="{listener}"}}')
                with gw.envoy(mode, "none", **credential) as envoy:
                    assert gw.post(envoy, "stranger") == status, (mode, credential)
                assert gw.counter("kt_auth_failures_total",
                                  f'{{listener="{listener}"}}') > before, (mode, credential)
        assert gw.upstream.requests and all(
            r["headers"].get("x-tenant-id") != "stranger" for r in gw.upstream.requests)
        # the token went to the sidecar only, never on to the provider
        assert all(TOKEN not in json.dumps(r["headers"]) for r in gw.upstream.requests)


def test_envoy_presents_its_certificate_for_mtls(pki):
    tls = {"sidecar_tls_cert": pki["client"], "sidecar_tls_key": pki["client_key"],
           "sidecar_ca": pki["ca"], "sidecar_sni": SIDECAR_NAME}
    # the fast path has no TLS: on loopback (where kt serve takes it without a token), with
    # the usage access log and the body rewrite over mTLS
    with gateway("--http-authz", "127.0.0.1:0", "--grpc-tls-cert", pki["server"],
                 "--grpc-tls-key", pki["server_key"], "--grpc-client-ca", pki["ca"]) as gw:
        for n, (mode, usage) in enumerate(ROUTES):
            tenant = f"mtls-{n}"
            with gw.envoy(mode, usage, **tls) as envoy:
                assert gw.post(envoy, tenant) == 200, (mode, usage)
                if mode != "rls":
                    rec = gw.spend(tenant)["gpt-4o"]
                    assert (rec["requests"], rec["input_tokens"], rec["output_tokens"]) == \
                        (1, 7, 3), (mode, usage)
        # no TLS; TLS without a client certificate; a certificate of another CA; a sidecar
        # whose certificate does not carry the name Envoy expects: no decision, 503
        for wrong in ({}, {"sidecar_ca": pki["ca"], "sidecar_sni": SIDECAR_NAME},
                      dict(tls, sidecar_tls_cert=pki["stranger"],
                           sidecar_tls_key=pki["stranger_key"]),
                      dict(tls, sidecar_sni="another-name.kt.test")):
            for mode in ("authz", "rls"):
                with gw.envoy(mode, "none", **wrong) as envoy:
                    assert gw.post(envoy, "stranger") == 503, (mode, wrong)
        assert all(r["headers"].get("x-tenant-id") != "stranger" for r in gw.upstream.requests)


def test_a_token_inside_tls(pki):
    # TLS without client certificates is no credential by itself; with the token, the token
    # travels encrypted and Envoy checks it is talking to the sidecar
    with gateway("--grpc-tls-cert", pki["server"], "--grpc-tls-key", pki["server_key"],
                 "--grpc-token-file", pki["token"]) as gw:
        with gw.envoy("authz", "als", sidecar_token_file=pki["token"], sidecar_ca=pki["ca"],
                      sidecar_sni=SIDECAR_NAME) as envoy:
            assert gw.post(envoy, "tls-token") == 200
            assert gw.spend("tls-token")["gpt-4o"]["input_tokens"] == 7
        for wrong in ({"sidecar_ca": pki["ca"], "sidecar_sni": SIDECAR_NAME},
                      {"sidecar_token_file": pki["token"]}):
            with gw.envoy("authz", "none", **wrong) as envoy:
                assert gw.post(envoy, "stranger") == 503, wrong
        assert gw.counter("kt_auth_failures_total", '{listener="grpc"}') >= 1


# --- what `kt envoy-config` prints for each credential, validated by Envoy ----------------

def envoy_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "envoy-config", *args],
                          capture_output=True, text=True, timeout=60)


CREDENTIALS = {
    "token": lambda p: ["--sidecar-token-file", p["token"]],
    "mtls": lambda p: ["--sidecar-tls-cert", p["client"], "--sidecar-tls-key", p["client_key"],
                       "--sidecar-ca", p["ca"], "--sidecar-sni", SIDECAR_NAME],
    "both": lambda p: ["--sidecar-token-file", p["token"], "--sidecar-ca", p["ca"]],
}


@pytest.mark.parametrize("mode,usage", [("authz", "als"), ("authz", "ext_proc"),
                                        ("authz", "none"), ("http-authz", "als"),
                                        ("http-authz", "ext_proc"), ("rls", "als")])
@pytest.mark.parametrize("credential", sorted(CREDENTIALS))
def test_every_mode_with_each_credential_is_a_config_envoy_accepts(
        pki, tmp_path, mode, usage, credential):
    args = ["--mode", mode, "--usage", usage, "--sidecar", "10.1.2.3:8081",
            "--sidecar-http", "10.1.2.3:8082", *CREDENTIALS[credential](pki)]
    res = envoy_config(*args)
    if mode == "http-authz" and credential == "mtls":  # the fast path takes the token only
        assert res.returncode == 2 and res.stdout == ""
        assert res.stderr == ("kt envoy-config: --mode http-authz: the fast path at "
                              "10.1.2.3:8082 takes the sidecar's token, not TLS: give "
                              "--sidecar-token-file\n")
        return
    assert res.returncode == 0 and res.stderr == "", res.stderr
    (tmp_path / "envoy.yaml").write_text(res.stdout)
    envoy_validate(tmp_path / "envoy.yaml")
    doc = __import__("yaml").safe_load(res.stdout)
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    sidecar = [clusters["kt_sidecar"]] + (
        [clusters["kt_sidecar_http"]] if mode == "http-authz" else [])
    for c in sidecar:
        filters = c["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].get("http_filters", [])
        assert bool(filters) == (credential != "mtls")
        tls = c.get("transport_socket")
        assert (tls is not None) == (credential != "token" and c["name"] == "kt_sidecar")
    # the token itself is never in the config: Envoy reads its file
    assert TOKEN not in res.stdout


def test_credential_flags_that_cannot_work_are_one_line(pki):
    for args, expected in (
            (["--sidecar-tls-cert", pki["client"], "--sidecar-ca", pki["ca"]],
             "--sidecar-tls-cert and --sidecar-tls-key go together"),
            (["--sidecar-tls-cert", pki["client"], "--sidecar-tls-key", pki["client_key"]],
             "--sidecar-tls-cert needs --sidecar-ca, the CA that signed the sidecar's "
             "certificate (Envoy checks who it talks to)"),
            (["--sidecar-sni", SIDECAR_NAME],
             "--sidecar-sni applies to TLS to the sidecar: give --sidecar-ca too")):
        res = envoy_config(*args)
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert res.stderr == f"kt envoy-config: {expected}\n"
    # a sidecar beyond loopback without a credential: printed, with a note that kt serve
    # will want one there
    res = envoy_config("--sidecar", "kt-sidecar:8081")
    assert res.returncode == 0 and res.stdout
    assert res.stderr.startswith("kt envoy-config: note: the sidecar at kt-sidecar:8081 is "
                                 "beyond loopback, where kt serve needs a credential")
