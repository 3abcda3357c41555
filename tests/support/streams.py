"""A client that leaves a streamed reply after its first chunk, through a real Envoy."""
from __future__ import annotations

import json
import socket

from tests.support.procs import SidecarProcess, wait_until
from tests.support.upstream import FakeUpstream


def leave_mid_stream(listen_port: int, tenant: str, body: dict, upstream: FakeUpstream,
                     sidecar: SidecarProcess) -> None:
    """Send a streamed request to Envoy on ``listen_port``, read until the upstream's first
    chunk, close the connection, and wait until the sidecar has closed the request's
    reservation as abandoned (charged at its bound, sidecar/settlement/bound.py).

    The upstream holds the rest of the stream, with its usage chunk, until then: released
    before Envoy saw the client go, the usage could pass and settle the stream instead
    (a busy machine did that)."""
    abandoned_before = sidecar.metric("kt_reservations_closed_total", outcome="bound_abandoned")
    data = json.dumps(body).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\n"
               b"x-tenant-id: %s\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % (tenant.encode(), len(data))) + data
    upstream.release_stream.clear()
    try:
        with socket.create_connection(("127.0.0.1", listen_port), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while b'"first"' not in received:  # the upstream holds the rest back
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
        wait_until(lambda: sidecar.metric("kt_reservations_closed_total",
                                          outcome="bound_abandoned") > abandoned_before,
                   10, "the stream closed as abandoned", sidecar.log)
    finally:
        upstream.release_stream.set()
