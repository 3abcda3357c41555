"""The sidecar's own low-rate HTTP endpoints, on the event loop, with limits.

Two listeners use it (sidecar/server.py routes them): `--http` (`/metrics`, `/healthz`,
`/readyz`: safe to expose to Prometheus and probes) and `--admin` (the authenticated
write/read APIs). Whoever can open a connection to them is hostile until proven
otherwise, so nothing a client does may cost the decisions anything:

- a connection is a small protocol object on the event loop, never a thread; at most
  ``max_connections`` are open per listener, and one more is answered 503 and closed at
  once (a flood of connections costs a file descriptor for a moment, not memory);
- each connection must deliver a whole request (head and body) within
  ``request_timeout_s`` of connecting or of its previous answer: a client trickling a
  byte at a time (slowloris) is closed when the time is up, whatever it sends meanwhile;
- heads are at most ``max_head`` bytes, bodies at most ``max_body`` (Content-Length
  only; no chunked uploads), and one request is handled at a time per connection
  (reading pauses meanwhile, so pipelined junk cannot pile up);
- the listen backlog is ``backlog`` (the kernel caps it at net.core.somaxconn).

Why hand-written and not a framework: a handful of endpoints at scrape/probe rates do
not justify a web framework dependency, and the one client-facing HTTP server of the
project (transports/http_authz.py) is hand-written on the same asyncio primitives for
speed; this one shares its approach, not its code (its limits differ). Handlers run on
the event loop; one that does slow work (rendering /metrics) hands it to a thread.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

log = logging.getLogger("kt.http")

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            413: "Payload Too Large",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 128
    request_timeout_s: float = 10.0
    max_head: int = 16 * 1024
    max_body: int = 64 * 1024
    backlog: int = 1024


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    peer: str  # the client's address ("" when unknown)


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def text(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, message.encode())


def _render(resp: HttpResponse, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}",
             f"content-type: {resp.content_type}"]
    if not any(k == "content-length" for k, _ in resp.headers):
        lines.append(f"content-length: {len(resp.body)}")
    lines += [f"{k}: {v}" for k, v in resp.headers]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + resp.body


class _Connection(asyncio.Protocol):
    def __init__(self, server: "LimitedHttpServer") -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.busy = False  # a request is being handled (reading is paused)
        self.timer: Optional[asyncio.TimerHandle] = None
        self.peer = ""
        self.counted = False
        self.continued = False  # "100 Continue" sent for the request being read

    # --- lifecycle -----------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        srv = self.server
        if srv.open >= srv.limits.max_connections:
            srv.refused += 1
            transport.write(_render(text(503, "too many connections\n"), close=True))
            transport.close()
            return
        srv.open += 1
        srv.connections.add(self)
        self.counted = True
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._arm()

    def connection_lost(self, exc) -> None:
        if self.counted:
            self.server.open -= 1
            self.server.connections.discard(self)
            self.counted = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _arm(self) -> None:
        """The next request must be complete within the timeout: progress is a whole
        request, never a byte (a byte a second would otherwise hold it open forever)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(
            self.server.limits.request_timeout_s, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        if self.busy or self.transport is None or self.transport.is_closing():
            return  # a handler is running: its answer re-arms the timer
        self.server.timed_out += 1
        if self.buf:
            self.transport.write(_render(text(408, "request not complete in time\n"), True))
        self.transport.close()

    # --- input -----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.buf += data
        if not self.busy:
            self._next()

    def _fail(self, status: int, message: str) -> None:
        assert self.transport is not None
        self.transport.write(_render(text(status, message + "\n"), close=True))
        self.transport.close()

    def _next(self) -> None:
        """Parse one request off the buffer and hand it to the router."""
        limits = self.server.limits
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > limits.max_head:
                self._fail(431, "request head too large")
            return
        if end > limits.max_head:
            self._fail(431, "request head too large")
            return
        try:
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise ValueError(line)
                headers[name.lower()] = value.strip()
        except ValueError:
            self._fail(400, "malformed request")
            return
        if "transfer-encoding" in headers:
            self._fail(400, "chunked bodies are not accepted; send content-length")
            return
        length_text = headers.get("content-length", "0")
        if not (length_text.isascii() and length_text.isdigit()):
            self._fail(400, "malformed content-length")
            return
        length = int(length_text)
        if length > limits.max_body:
            self._fail(413, f"body larger than {limits.max_body} bytes")
            return
        start = end + 4
        if len(self.buf) < start + length:
            # the rest of the body is still to come (within the same deadline); curl asks
            # first for a body over 1 KiB, and would wait a second for this
            if headers.get("expect", "").lower() == "100-continue" and not self.continued:
                self.continued = True
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        body = bytes(self.buf[start:start + length])
        del self.buf[:start + length]
        self.continued = False
        path, _, query = target.partition("?")
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        req = HttpRequest(method, path, query, headers, body, self.peer)
        self.busy = True
        assert self.transport is not None
        self.transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._answer(req, keep_alive))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _answer(self, req: HttpRequest, keep_alive: bool) -> None:
        try:
            resp = await self.server.handler(req)
        except Exception:  # noqa: BLE001 - a bug answers 503 and is logged once per burst
            self.server.errors += 1
            if self.server.errors == 1 or self.server.errors % 1000 == 0:
                log.exception("http %s %s: handler failed (%d so far)", req.method, req.path,
                              self.server.errors)
            resp = text(503, "internal error\n")
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if req.method == "HEAD":  # the same headers, no body
            resp = HttpResponse(resp.status, b"", resp.content_type,
                                resp.headers + [("content-length", str(len(resp.body)))])
        transport.write(_render(resp, close=not keep_alive))
        self.busy = False
        if not keep_alive:
            transport.close()
            return
        self._arm()
        transport.resume_reading()
        if self.buf:
            self._next()


class LimitedHttpServer:
    """An HTTP/1.1 server on the running event loop; ``handler`` answers every request."""

    def __init__(self, handler: Handler, limits: ServerLimits = ServerLimits()) -> None:
        self.handler = handler
        self.limits = limits
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0
        self.open = 0  # connections being served
        self.refused = 0  # connections closed at once: over max_connections
        self.timed_out = 0  # connections closed for not completing a request in time
        self.errors = 0
        self.tasks: set[asyncio.Task] = set()
        self.connections: set[_Connection] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port,
                                              backlog=self.limits.backlog)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        """Stop listening and close every connection (a handler still running finds its
        connection gone and drops its answer)."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
