"""rediss:// with a private CA and mutual TLS, against a real Valkey behind a TLS front
(tests/support/tls_proxy.py): the hot-path connection and redis-py (SCRIPT LOAD) both
verify the server; a server the sidecar cannot verify is a failure mode, never a crash."""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import redis
import trustme

from sidecar.backends.redis import RedisBackend
from sidecar.model import Kind, Request
from sidecar.policy import schema
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService
from tests.support.procs import workdir
from tests.support.tls_proxy import TlsProxy
from tests.support.valkey import Valkey

pytestmark = pytest.mark.valkey

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
defaults:
  limits: {rpm: 100, tpm: 100000}
  budget: {tokens: 100000, period: day}
estimate: {trusted: true}  # a trusted filter sets x-kt-estimated-tokens in these tests
backend: {kind: redis, url: "rediss://127.0.0.1:%(port)d/0", timeout_ms: 500,
          failure_mode: closed%(tls)s}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""
    d: Path = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("kt-sidecar.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    return ca, server, d


def server_context(ca, server, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(ctx)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    return ctx


def decide_twice(port: int, tls: str) -> tuple[list[Kind], str, bool]:
    policy = parse_policy((POLICY % {"port": port, "tls": tls}).encode(), "<tls test>")
    assert isinstance(policy.backend, schema.RedisBackend)
    svc = DecisionService(policy, RedisBackend(policy.backend))

    async def main():
        await svc.backend.start()
        try:
            kinds = [(await svc.decide(Request(headers={
                "x-tenant-id": "tls", "x-kt-estimated-tokens": "7"}))).kind for _ in range(2)]
            status = svc.backend.status()
            return kinds, status.detail, status.ready
        finally:
            await svc.backend.close()

    return asyncio.run(main())


def spent(valkey: Valkey) -> int:
    r = redis.Redis.from_url(valkey.url)
    try:
        return int(r.hget("kt:{tls}:budget", "s") or 0)
    finally:
        r.close()


def test_rediss_with_a_private_ca(pki):
    ca, server, d = pki
    with workdir() as w, Valkey(w) as v, TlsProxy(v.port, server_context(ca, server, False)) as p:
        kinds, _, ready = decide_twice(p.port, f', tls: {{ca_file: "{d / "ca.pem"}"}}')
        assert kinds == [Kind.ALLOW, Kind.ALLOW] and ready
        assert spent(v) == 14  # both charges went through TLS to the real Valkey


def test_rediss_without_the_ca_fails_by_the_failure_mode(pki):
    ca, server, _ = pki
    with workdir() as w, Valkey(w) as v, TlsProxy(v.port, server_context(ca, server, False)) as p:
        # the system store does not know the private CA: verification must fail
        kinds, detail, ready = decide_twice(p.port, "")
        assert kinds == [Kind.FAIL_CLOSED, Kind.FAIL_CLOSED] and not ready
        assert "CERTIFICATE_VERIFY_FAILED" in detail, detail
        assert spent(v) == 0


def test_mutual_tls(pki):
    ca, server, d = pki
    with workdir() as w, Valkey(w) as v, TlsProxy(v.port, server_context(ca, server, True)) as p:
        with_cert = (f', tls: {{ca_file: "{d / "ca.pem"}", cert_file: "{d / "client.pem"}", '
                     f'key_file: "{d / "client.key"}"}}')
        kinds, _, ready = decide_twice(p.port, with_cert)
        assert kinds == [Kind.ALLOW, Kind.ALLOW] and ready
        kinds, _, ready = decide_twice(p.port, f', tls: {{ca_file: "{d / "ca.pem"}"}}')
        assert kinds == [Kind.FAIL_CLOSED, Kind.FAIL_CLOSED] and not ready
        assert spent(v) == 14
