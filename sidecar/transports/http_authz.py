"""Envoy ext_authz over HTTP (`http_service`) on a raw asyncio protocol: the fast path.

Envoy's HTTP ext_authz client sends the original request's method, path, the headers
its `allowed_headers` let through and (with `with_request_body`) the body, over
keep-alive HTTP/1.1. The answer is the same `contract.Answer` as the gRPC path:
- 200 + the upstream headers (`x-kt-*`, copied to the upstream request through
  `allowed_upstream_headers`) + the client headers (`x-ratelimit-*`, `x-kt-budget-*`,
  through `allowed_client_headers_on_success`);
- otherwise the deny status, its headers and OpenAI-style body, which Envoy returns to
  the client (`allowed_client_headers`).
`kt envoy-config --mode http-authz` wires exactly these matchers.

The request is parsed by llhttp (Node.js's parser, through `httptools`, as uvicorn
uses it): strict HTTP/1.1 (a header line with a space before its colon, a content-length
beside a transfer-encoding, a bad content-length are errors), in C, with one Python call
per header. It measured 3.3 against 6.5 µs per request for the bytes.find/split parser it
replaced (docs/bench.md, issue 26). The limits are the sidecar's own: a head over
MAX_HEAD is 431, a body over MAX_BODY 413, a chunked body 400 (Envoy's ext_authz always
sends content-length), a header that is not UTF-8 400; anything llhttp refuses is 400 and
the connection is closed: a malformed request never crashes or stalls the server.

A connection that completes no request for a whole IDLE_TIMEOUT_S interval is closed
(between one and two intervals after its last request): the timer measures progress (a
whole request parsed, or an answer written), not bytes, so a client trickling a byte a
second cannot hold a connection open. When the listener is reachable beyond
loopback, every request carries the shared token (`authorization: Bearer ...`, which
Envoy's http_service `headers_to_add` sends); docs/security.md.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Optional

import httptools

from sidecar import contract
from sidecar.auth import TokenFile
from sidecar.model import Request
from sidecar.burstlog import BurstLog
from sidecar.decision.service import Decider

log = logging.getLogger("kt.http_authz")
MAX_HEAD = 32 * 1024  # request line + headers
MAX_BODY = 1024 * 1024
# a connection that completes no request in a whole interval this long is closed
# (progress, not bytes): between one and two intervals after its last request
IDLE_TIMEOUT_S = 30.0
# A request with nothing ahead of it is decided inline in data_received, outside any Task
# (_decide_now). From Python 3.12 asyncio.wait_for (the Redis backend's calls use it) and
# asyncio.timeout refuse to run outside a Task ("Timeout should be used inside a task"):
# the first step of such a decision would fail, and be answered 503. There every request
# goes through the connection's worker Task.
DECIDE_INLINE = sys.version_info < (3, 12)
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
            411: b"Length Required", 413: b"Payload Too Large",
            429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))


def render(ans: contract.Answer) -> bytes:
    """The HTTP/1.1 response for an answer (keep-alive)."""
    if ans.unavailable:
        body = ans.body or b"limiter unavailable"
        return (_status_line(503) + b"content-type: text/plain\r\ncontent-length: %d\r\n\r\n"
                % len(body) + body)
    # the header block as one str, encoded once (a dozen small encodes cost more)
    head = "".join([f"{k}: {v}\r\n" for k, v in ans.upstream_headers]
                   + [f"{k}: {v}\r\n" for k, v in ans.response_headers]).encode()
    body = ans.body if not ans.allowed else b""
    return b"%s%scontent-length: %d\r\n\r\n%s" % (_status_line(ans.status), head, len(body), body)


def _error(status: int, message: str, type_: str = "invalid_request_error",
           code: str = "invalid_request") -> bytes:
    body = contract.error_body(message, type_, code)
    return (_status_line(status) + b"content-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body)


class _Started:
    """A decision started in ``data_received`` that had to wait (for Redis, a lease being
    renewed, the queue): the rest of it, to be awaited by the connection's worker in order.
    Awaiting it drives the coroutine on from the future it is waiting on, as a Task would
    have: the worker's Task waits on that future, then resumes the coroutine; an exception
    thrown into the worker (its cancellation when the connection is lost) is passed in."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro, waiting) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self):
        waiting, coro = self.waiting, self.coro
        while True:
            try:
                yield waiting
            except BaseException as exc:  # noqa: BLE001 - passed to the decision, as a Task would
                try:
                    waiting = coro.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                waiting = coro.send(None)
            except StopIteration as done:
                return done.value

    def close(self) -> None:
        """The connection was lost before its worker took this: the decision is cancelled
        where it waits (its handlers run, as for a cancelled worker): as Task.cancel does,
        the future it waits on is cancelled first (the backend knows by it that a reply
        coming later has no caller), then CancelledError is thrown in."""
        if self.waiting is not None:
            self.waiting.cancel()
        try:
            self.coro.throw(asyncio.CancelledError())
        except BaseException:  # noqa: BLE001 - it ends either way; nothing to answer
            pass
        finally:
            self.coro.close()


class _Refused(Exception):
    """A request the fast path answers with ``status`` and closes the connection after."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code


class _Parser:
    """llhttp's callbacks for one connection: each complete request becomes a Request in
    ``done`` (several when Envoy pipelines them); one to refuse raises _Refused."""

    __slots__ = ("llhttp", "done", "headers", "body", "head_size", "in_head", "service",
                 "token", "refused")

    def __init__(self, service: Decider, token: Optional[TokenFile], refused) -> None:
        self.llhttp = httptools.HttpRequestParser(self)
        self.done: list[Request] = []
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.head_size = 0  # bytes of the current request's head parsed or held so far
        self.in_head = True  # between requests too: what comes next is a head
        self.service = service
        self.token = token
        self.refused = refused  # the auth failures' counter

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises _Refused (the requests completed before it are in
        ``done``). llhttp holds an unfinished header itself: what it holds is counted
        here, so a head that never ends is refused at MAX_HEAD, not buffered."""
        was_in_head = self.in_head
        try:
            self.llhttp.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refused):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserUpgrade:
            raise _Refused(400, "protocol upgrades are not accepted") from None
        except httptools.HttpParserError as exc:
            raise _Refused(400, f"malformed request: {exc}") from None
        if was_in_head and self.in_head:  # the whole of ``data`` is still head
            self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                raise _Refused(431, "request head too large")

    # --- llhttp's callbacks (httptools calls those defined, by name) -------------
    # (no on_url: the decision never reads the path, so nothing holds it; a head is
    # bounded by what is held, its headers, and by the bytes fed while it lasts)
    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.head_size = self.head_size + len(name) + len(value) + 4
        if size > MAX_HEAD:
            raise _Refused(431, "request head too large")
        try:
            # llhttp admits only token characters in a name, and strips the value's
            # surrounding whitespace
            self.headers[name.decode("ascii").lower()] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(400, "header is not valid UTF-8") from None

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.llhttp.should_upgrade():  # Upgrade or CONNECT: not ext_authz's
            raise _Refused(400, "protocol upgrades are not accepted")
        headers = self.headers
        token = self.token
        if token is not None and not token.matches(headers.get("authorization")):
            self.refused.inc()
            raise _Refused(401, "this listener needs the sidecar's token in `authorization`",
                           "authentication_error", "unauthorized")
        if "transfer-encoding" in headers:
            raise _Refused(400, "chunked request bodies are not accepted; Envoy sends "
                                "content-length")
        # llhttp has checked it: ASCII digits, one value
        if int(headers.get("content-length", "0")) > MAX_BODY:
            raise _Refused(413, "request body too large")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        headers = self.headers
        body = self.body
        # HTTP ext_authz carries no dynamic metadata: a policy that names the tenant by
        # metadata must not fall back to a header a client could set
        tenant = "" if self.service.policy.tenant_metadata is not None else None
        self.done.append(Request(
            headers=headers, body=body[0] if len(body) == 1 else b"".join(body),
            tenant=tenant, body_truncated=headers.get("x-envoy-auth-partial-body") == "true",
            request_id=headers.get("x-request-id", "")))
        self.headers = {}
        self.body = []
        self.in_head = True  # what follows is the next request's head
        self.head_size = 0


class _Shared:
    """What every connection of one listener shares: the token, counters, burst logs."""

    def __init__(self, service: Decider, token: Optional[TokenFile]) -> None:
        self.token = token
        self.refused = service.metrics.auth_failures.labels("http_authz")
        self.parse_log = BurstLog(log)
        self.error_log = BurstLog(log)


class AuthzProtocol(asyncio.Protocol):
    """One connection from Envoy. Requests are answered in order (pipelining-safe)."""

    def __init__(self, service: Decider, shared: Optional[_Shared] = None) -> None:
        self.service = service
        self.shared = shared or _Shared(service, None)
        self.transport: Optional[asyncio.Transport] = None
        self.parser = _Parser(service, self.shared.token, self.shared.refused)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker: Optional[asyncio.Task] = None
        self.idle: Optional[asyncio.TimerHandle] = None
        self.closing = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        # a request parsed or answered since the idle timer last fired: a flag, not a
        # clock read per request (the timer fires once an interval, not per request)
        self.progressed = False
        self.pending = 0  # requests parsed and not yet answered

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.loop = loop = asyncio.get_running_loop()
        self.worker = loop.create_task(self._answer_in_order())
        self.idle = loop.call_later(IDLE_TIMEOUT_S, self._on_idle)

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.worker is not None:
            self.worker.cancel()
        while not self.queue.empty():  # decisions started and not yet taken by the worker
            item = self.queue.get_nowait()
            if isinstance(item, _Started):
                item.close()
        if self.idle is not None:
            self.idle.cancel()

    def _on_idle(self) -> None:
        """Once an interval: close a connection that made no progress in it."""
        if self.progressed or self.pending:  # a decision in flight is progress on its way
            self.progressed = False
            self.idle = self.loop.call_later(IDLE_TIMEOUT_S, self._on_idle)  # type: ignore[union-attr]
            return
        self.idle = None
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        parser = self.parser
        refused: Optional[_Refused] = None
        try:
            parser.feed(data)
        except _Refused as exc:
            refused = exc
        except Exception:  # noqa: BLE001 - a parse bug must answer 400, not drop the link
            self.shared.parse_log.warning("http authz: unparseable request", exc_info=True)
            refused = _Refused(400, "malformed request")
        if parser.done:  # those complete before a refused one are answered first, in order
            done, parser.done = parser.done, []
            self.progressed = True
            for req in done:
                if self.pending or not DECIDE_INLINE:  # in order: behind the ones in flight
                    self.pending += 1
                    self.queue.put_nowait(req)
                else:
                    self._decide_now(req)
        if refused is not None:
            self._fail(refused.status, refused.message, refused.type, refused.code)

    def _decide_now(self, req: Request) -> None:
        """Nothing ahead of it on this connection: decide at once, without a trip through
        the queue and the worker (a decision within a lease or the embedded backend never
        waits). One that has to wait goes to the worker, which finishes it in order."""
        coro = self.service.decide(req, "http")
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            try:
                out = render(contract.answer(done.value))
            except Exception:  # noqa: BLE001 - never a crash: answer, keep serving
                self.shared.error_log.warning("http authz: decision failed", exc_info=True)
                out = _error(503, "internal error in the limiter")
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(out)
            return
        except Exception:  # noqa: BLE001 - never a crash: answer, keep serving
            self.shared.error_log.warning("http authz: decision failed", exc_info=True)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(_error(503, "internal error in the limiter"))
            return
        self.pending += 1
        self.queue.put_nowait(_Started(coro, waiting))

    def _fail(self, status: int, message: str, type_: str = "invalid_request_error",
              code: str = "invalid_request") -> None:
        self.closing = True
        self.queue.put_nowait(_error(status, message, type_, code))

    async def _answer_in_order(self) -> None:
        while True:
            item = await self.queue.get()
            if isinstance(item, bytes):  # a parse error: answer, then close
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(item)
                    self.transport.close()
                return
            try:
                if isinstance(item, _Started):
                    decision = await item
                else:
                    decision = await self.service.decide(item, "http")  # type: ignore[arg-type]
                out = render(contract.answer(decision))
            except Exception:  # noqa: BLE001 - never a crash: answer, keep serving
                self.shared.error_log.warning("http authz: decision failed", exc_info=True)
                out = _error(503, "internal error in the limiter")
            self.pending -= 1
            if self.transport is None or self.transport.is_closing():
                return
            self.progressed = True
            self.transport.write(out)


async def start_http_authz(service: Decider, host: str, port: int,
                           reuse_port: bool = False, token: Optional[TokenFile] = None
                           ) -> tuple[asyncio.AbstractServer, int]:
    """Serve the fast path; returns the server and the bound port (port 0 = ephemeral)."""
    loop = asyncio.get_running_loop()
    shared = _Shared(service, token)
    server = await loop.create_server(lambda: AuthzProtocol(service, shared), host, port,
                                      reuse_port=reuse_port or None, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    return server, bound
