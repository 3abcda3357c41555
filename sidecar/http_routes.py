"""The routes of the side port (--http: /metrics, /healthz, /readyz) and the admin port
(--admin: POST /v1/usage, GET /v1/spend, GET /v1/status), shared by a sidecar and the `--workers`
supervisor, which answer the endpoints each in its own way (a sidecar from its own
registry and backend; the supervisor from its workers). Also the supervisor's listener:
the same limited HTTP server on a loop of its own, answering in a small thread pool."""
from __future__ import annotations

import asyncio
import json
import threading
from importlib import resources
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Optional, Union
from urllib.parse import parse_qs

from sidecar import contract, status
from sidecar.auth import TokenFile
from sidecar.backends.base import Backend, BackendError
from sidecar.credentials import admin_allows, browser_problem
from sidecar.ledger.spend import day_of, parse_query, report
from sidecar.listen import host_port, listen
from sidecar.transports.http_side import (HttpRequest, HttpResponse, LimitedHttpServer,
                                          ServerLimits, text)

ADMIN_MOVED = ("served on the admin port (--admin, default 127.0.0.1:9091), with its "
               "bearer token\n")
UNAUTHORIZED = HttpResponse(401, contract.error_body(
    "This endpoint needs `Authorization: Bearer <admin token>`.", "authentication_error",
    "unauthorized"), "application/json", [("www-authenticate", "Bearer")])
METRICS, READY = "/metrics", "/readyz"
USAGE, SPEND, STATUS = "/v1/usage", "/v1/spend", "/v1/status"
TENANTS = "/v1/tenants"  # and below it: the management API (sidecar/tenants_api.py)
OPENAPI = "/v1/openapi.json"  # the admin port's routes, documented (sidecar/openapi.json)


def side_route(req: HttpRequest) -> Union[HttpResponse, str]:
    """--http: the answer, or the endpoint (METRICS, READY) the caller answers. Nothing
    here changes or reveals the books."""
    if req.method not in ("GET", "HEAD"):
        return text(405, "GET only\n")
    if req.path in (METRICS, READY):
        return req.path
    if req.path == "/healthz":
        return text(200, "ok\n")
    if req.path in (USAGE, SPEND, STATUS, OPENAPI) or req.path.startswith(TENANTS):
        return text(404, ADMIN_MOVED)
    return text(404, "not found\n")


def admin_route(req: HttpRequest, token: Optional[TokenFile],
                refused: Callable[[], None] = lambda: None) -> Union[HttpResponse, str]:
    """--admin: the books. The answer, or the endpoint (USAGE, SPEND) the caller answers;
    every request carries the admin token (``refused``: told of one that does not)."""
    if not admin_allows(token, req):
        refused()
        return UNAUTHORIZED
    problem = browser_problem(req) if token is None else None
    if problem is not None:  # a web page on the operator's machine, not an operator
        refused()
        return json_error(403, "permission_error", "browser_request", (
            f"The admin port without a token serves loopback clients, not web pages: "
            f"{problem}. Configure an admin token to call it from elsewhere."))
    if not req.path.isascii():
        # read as Latin-1 by the server, raw UTF-8 ("acmé" from curl) named another holder
        # ("acmÃ©"): a freeze that refused nothing; and the --workers supervisor could not
        # forward it at all
        return json_error(400, "invalid_request_error", "invalid_path", (
            "The path holds bytes that are not ASCII: percent-encode a holder's name as "
            "UTF-8 (e.g. acm%C3%A9), as `kt tenants` does."))
    if req.path == USAGE:
        if req.method != "POST":
            return text(405, "POST a JSON usage report\n")
        return req.path
    if req.path in (SPEND, STATUS, OPENAPI):
        if req.method not in ("GET", "HEAD"):
            return text(405, "GET only\n")
        return req.path
    if req.path == TENANTS or req.path.startswith(TENANTS + "/"):
        return TENANTS  # the method and the rest of the path: the management API's
    return text(404, "not found\n")


def admin_identity(token: Optional[TokenFile], req: HttpRequest) -> str:
    """Who made an admin call, as the audit trail says it: the admin token is one
    credential ("admin-token"); without one, the loopback caller's address."""
    return "admin-token" if token is not None else f"loopback {req.peer}"


def openapi_document() -> bytes:
    """The admin port's OpenAPI 3.1 document, the one committed file (sidecar/openapi.json)."""
    return resources.files("sidecar").joinpath("openapi.json").read_bytes()


def json_error(status: int, kind: str, code: str, message: str) -> HttpResponse:
    return HttpResponse(status, json.dumps({"error": {
        "type": kind, "code": code, "message": message}}).encode(), "application/json")


async def spend_report(backend: Backend, query: str,
                       slowly: Callable[[Callable[[], bytes]], Awaitable[Optional[bytes]]],
                       budget_unit: Callable[[str], str]) -> HttpResponse:
    """GET /v1/spend[?since=YYYY-MM-DD&until=YYYY-MM-DD&period=day|month|total&by=KEY
    &tenant=NAME]: the durable spend the backend keeps (every tenant, every replica's
    requests; sidecar/ledger/spend.py). Summed by ``slowly`` (off the event loop); ``budget_unit``:
    a tenant's budget unit under the policy in force ("" without a budget)."""
    try:
        q = parse_query(parse_qs(query))
    except ValueError as exc:
        return json_error(400, "invalid_request_error", "invalid_query", str(exc))
    try:
        cells = await asyncio.wait_for(backend.spend_cells(q.since_day, q.until_day), 10)
    except (BackendError, asyncio.TimeoutError) as exc:
        return json_error(503, "service_unavailable", "limiter_unavailable",
                          f"spend not readable, retry: {exc}")
    doc = await slowly(lambda: json.dumps(
        report(cells, q.since_day, q.until_day, q.period, backend.name, budget_unit, q.by,
               tenant=q.tenant),
        sort_keys=True).encode())
    if doc is None:
        return text(503, "busy, retry\n")
    return HttpResponse(200, doc, "application/json")


async def status_report(backend: Backend, ledger_status: Callable[[], tuple[bool, str]],
                        policy_source: str, policy_digest: str, metrics,
                        slowly: Callable[[Callable[[], bytes]], Awaitable[Optional[bytes]]],
                        now_us: Callable[[], int]) -> HttpResponse:
    """GET /v1/status: `kt status`'s document (sidecar/status.py). Today's spend from the
    backend (a store that does not answer is said in the document, which is still served:
    status is what an operator reads during an outage)."""
    st = backend.status()
    ledger_ready, ledger = ledger_status()
    today = day_of(now_us())
    cells, spend_error = None, ""
    try:
        cells = await asyncio.wait_for(backend.spend_cells(today, today), 5)
    except (BackendError, asyncio.TimeoutError) as exc:
        spend_error = str(exc) or type(exc).__name__
    doc = await slowly(lambda: json.dumps(status.document(
        ready=st.ready and ledger_ready, detail=st.detail, ledger=ledger, backend=backend.name,
        policy_source=policy_source, policy_digest=policy_digest, registry=metrics.registry,
        today=today, cells=cells, spend_error=spend_error,
        failure_mode_last_minute=metrics.failure_mode_recent.total()), sort_keys=True).encode())
    if doc is None:
        return text(503, "busy, retry\n")
    return HttpResponse(200, doc, "application/json")


class ThreadedHttpServer:
    """A LimitedHttpServer for a process without an event loop of its own (the
    `--workers` supervisor): its loop runs in a daemon thread, and a blocking handler
    answers in a small pool of threads. The same limits as the sidecar's own ports: a
    connection is not a thread, and a slow client is closed when its time is up."""

    def __init__(self, flag: str, addr: str, handler: Callable[[HttpRequest], HttpResponse],
                 limits: ServerLimits = ServerLimits(), threads: int = 4) -> None:
        self.handler = handler
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kt-http")
        self._loop = asyncio.new_event_loop()
        self._server = LimitedHttpServer(self._handle, limits)
        try:
            port = self._loop.run_until_complete(listen(self._server, flag, addr))
        except BaseException:
            self._loop.close()
            self._pool.shutdown(wait=False)
            raise
        self.server_address = (host_port(addr)[0], port)
        self._thread = threading.Thread(target=self._loop.run_forever, name="kt-http-loop",
                                        daemon=True)
        self._thread.start()

    async def _handle(self, req: HttpRequest) -> HttpResponse:
        return await self._loop.run_in_executor(self._pool, self.handler, req)

    def shutdown(self) -> None:
        def close() -> None:
            self._server.close()
            self._loop.stop()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(close)
            self._thread.join(5)
        self._pool.shutdown(wait=False)

    def server_close(self) -> None:
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()
