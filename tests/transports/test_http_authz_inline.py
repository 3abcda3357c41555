"""The HTTP fast path decides a request inline when nothing is ahead of it on its
connection (sidecar/transports/http_authz.py, ``_decide_now``), and hands a decision that
has to wait to the connection's worker. What must hold either way, on a real Valkey:
answers in order behind a decision waiting for Redis, and a decision whose connection is
lost while it waits is cancelled where it waits, so a charge Redis applies anyway is held
as the request's reservation (as for gRPC, tests/backends/test_redis_backend.py)."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from sidecar.backends.redis import RedisBackend
from sidecar.policy.load import parse_policy
from sidecar.service import REQUEST_ID_KEY
from sidecar.transports import http_authz
from sidecar.transports.http_authz import AuthzProtocol, start_http_authz
from tests.support.inproc import RunningSidecar
from tests.support.valkey import command

POLICY = """
tenant: {header: x-tenant-id, unknown: deny}
tiers: [{name: default, model: gpt-4o}]
defaults:
  limits: {rpm: 3, tpm: 10000000}
  budget: {tokens: 100000000, period: day}
tenants:
  a: {}
  gone: {limits: {rpm: 100000, tpm: 10000000}}
estimate: {trusted: true}  # a trusted filter sets x-kt-estimated-tokens in these tests
backend: {kind: redis, url: "%s", timeout_ms: 5000, failure_mode: envoy}
"""


def request(tenant: str, request_id: str = "") -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"host: kt",
             b"x-tenant-id: " + tenant.encode(), b"x-kt-estimated-tokens: 5"]
    if request_id:
        lines.append(b"x-request-id: " + request_id.encode())
    return b"\r\n".join(lines + [b"content-length: 0"]) + b"\r\n\r\n"


def statuses(port: int, raw: bytes, expect: int) -> list[int]:
    out: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        buf = b""
        while len(out) < expect:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            while b"\r\n\r\n" in buf:
                head, rest = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if len(rest) < length:
                    break
                out.append(int(head.split(b" ", 2)[1]))
                buf = rest[length:]
    return out


@pytest.fixture(params=[True, False], ids=["inline", "worker-only"])
def sidecar(valkey, request, monkeypatch):
    # worker-only: as on Python 3.12+, where nothing is decided inline (DECIDE_INLINE)
    monkeypatch.setattr(http_authz, "DECIDE_INLINE", request.param)
    command(valkey.port, "FLUSHALL")  # each run from no state (rpm 3 is counted in Valkey)
    text = POLICY % valkey.url
    backend = RedisBackend(parse_policy(text.encode(), "<test>").backend)
    with RunningSidecar(text, backend=backend) as sc:
        server, port = sc.run(start_http_authz(sc.sidecar.service, "127.0.0.1", 0))
        sc.http_authz_port = port
        yield sc
        server.close()


def test_pipelined_requests_behind_a_decision_waiting_for_redis_answer_in_order(sidecar):
    # the first waits for Redis (the worker finishes it); the others queue behind it
    got = statuses(sidecar.http_authz_port, request("a") * 5, expect=5)
    assert got == [200, 200, 200, 429, 429]  # rpm 3, in the order sent


def _wait_for(cond, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_a_connection_lost_while_its_decision_waits_holds_the_charge_as_a_reservation(
        sidecar, valkey):
    svc = sidecar.sidecar.service
    conn = svc.backend.conn
    writes = conn.writes
    valkey.pause()
    try:
        s = socket.create_connection(("127.0.0.1", sidecar.http_authz_port), timeout=5)
        s.sendall(request("gone", "gone-socket"))
        assert _wait_for(lambda: conn.writes > writes)  # the decision went out to Redis
        s.close()  # Envoy gave up: its worker, waiting on the decision, is cancelled
        time.sleep(0.3)
    finally:
        valkey.resume()
    assert _wait_for(lambda: svc.backend.late_replies >= 1)
    held = svc.reservations.get(REQUEST_ID_KEY + "gone-socket")
    assert held is not None and held.charged_tokens == 5


class _Collect:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_a_connection_lost_before_its_worker_took_the_decision_still_cancels_it(
        sidecar, valkey):
    # data and the loss in one callback: the started decision is still in the queue when
    # the connection goes, and is cancelled there (not dropped half-way)
    svc = sidecar.sidecar.service
    before = svc.backend.late_replies

    async def arrive_and_go() -> list[bytes]:
        proto, transport = AuthzProtocol(svc), _Collect()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.data_received(request("gone", "gone-queued"))
        assert proto.pending == 1  # waiting for Redis
        proto.connection_lost(None)
        await asyncio.sleep(0)
        return transport.written

    valkey.pause()
    try:
        written = sidecar.run(arrive_and_go())
        time.sleep(0.3)
    finally:
        valkey.resume()
    assert written == []
    held_key = REQUEST_ID_KEY + "gone-queued"
    if not http_authz.DECIDE_INLINE:
        # (Python 3.12+) the request waited in the queue undecided: the worker, cancelled
        # with the connection, never started it, so nothing was sent and nothing is held
        time.sleep(0.3)
        assert svc.backend.late_replies == before and svc.reservations.get(held_key) is None
        return
    assert _wait_for(lambda: svc.backend.late_replies > before)
    held = svc.reservations.get(held_key)
    assert held is not None and held.charged_tokens == 5
