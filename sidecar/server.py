"""Wiring: policy + backend + service + transports on one gRPC port, the HTTP side
port (/metrics, /healthz, /readyz), the admin port (usage reports, spend) and who may
use each (docs/security.md). No decision logic lives here."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import grpc
import msgspec
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar import contract, stop_signals
from sidecar.auth import (TokenError, TokenFile, bearer_from_metadata, host_of,
                          is_loopback_host)
from sidecar.backends.base import Backend, BackendError
from sidecar.backends.memory import MemoryBackend
from sidecar.ledger.recorder import Ledger, build_ledger
from sidecar.metrics import Metrics
from sidecar.open_reservations import keep_open_reservations
from sidecar.policy import schema
from sidecar.policy.load import CompiledPolicy, PolicyError, load_policy, parse_policy
from sidecar.service import DecisionService
from sidecar.transports.als import UsageLogReceiver
from sidecar.transports.authz import authorization_handler
from sidecar.transports.ext_proc import ExternalProcessorServicer
from sidecar.transports.http_authz import start_http_authz
from sidecar.transports.rls import RateLimitServicer
from sidecar.transports.http_side import (HttpRequest, HttpResponse, LimitedHttpServer,
                                          ServerLimits, text)
from sidecar.transports.usage_api import REPORT_METHOD, report_json, usage_service_handler
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

log = logging.getLogger("kt.server")


class StartupError(Exception):
    """The sidecar cannot start as configured (a port in use, an address not on this host);
    the message names the flag and the address. Whatever had started is stopped again."""


def listen_error(flag: str, addr: str, exc: BaseException) -> StartupError:
    """A bind failure as one line, naming the flag, the address and the reason."""
    reason = str(exc)
    if isinstance(exc, OSError) and exc.errno:
        reason = os.strerror(exc.errno)
    elif not isinstance(exc, OSError):  # gRPC only says "Failed to bind": ask the kernel
        try:
            probe_bind(addr)
        except OSError as probe_exc:
            reason = os.strerror(probe_exc.errno) if probe_exc.errno else str(probe_exc)
    return StartupError(f"cannot listen on {addr} ({flag}): {reason}")


def probe_bind(addr: str) -> None:
    """Bind HOST:PORT once and let go (raises the kernel's OSError): checked before gRPC
    binds, whose own failure is a multi-line C-core log and a bare RuntimeError."""
    import socket

    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
        probe.bind((host, int(port)))


def sample_policy() -> CompiledPolicy:
    raw = resources.files("sidecar").joinpath("samples/policy.yaml").read_bytes()
    return parse_policy(raw, "<sample policy>")


class ExposureError(ValueError):
    """A listener would be reachable beyond loopback without a credential; says which."""


@dataclass
class ServerConfig:
    grpc_addr: str = "127.0.0.1:8081"
    http_addr: str = "127.0.0.1:9090"  # /metrics, /healthz, /readyz only
    admin_addr: str = "127.0.0.1:9091"  # POST /v1/usage, GET /v1/spend: with the admin token
    admin_token_file: Optional[str] = None  # else the policy's admin.token_file
    # a non-loopback --grpc (or --http-authz) needs one of these (docs/security.md)
    grpc_token_file: Optional[str] = None
    grpc_tls_cert: Optional[str] = None
    grpc_tls_key: Optional[str] = None
    grpc_client_ca: Optional[str] = None
    policy_path: Optional[str] = None  # None: the sample policy shipped in the package
    state_file: Optional[str] = None  # overrides the memory backend's state_file
    ready_file: Optional[str] = None  # JSON {"grpc_port", "http_port", ...} written once serving
    http_authz_addr: Optional[str] = None  # the fast path: Envoy's HTTP ext_authz
    # share the gRPC and HTTP-authz ports with sibling worker processes (kt serve --workers)
    reuse_port: bool = False
    # a worker of `kt serve --workers`: reservations shared through Redis whatever the
    # policy says, so that usage reaching a sibling (Envoy's connection moves to one when
    # a worker dies) replaces the estimate instead of adding to it
    share_reservations: bool = False
    reload_interval_s: float = 2.0
    grace_s: float = 2.0
    # connection limits and timeouts of the --http and --admin listeners
    side_limits: ServerLimits = ServerLimits()


def make_backend(policy: CompiledPolicy, cfg: ServerConfig) -> Backend:
    b = policy.backend
    if isinstance(b, schema.RedisBackend):
        from sidecar.backends.redis import RedisBackend  # only needed with a redis policy

        if cfg.share_reservations and not b.shared_reservations:
            b = msgspec.structs.replace(b, shared_reservations=True)
        return RedisBackend(b)
    state_file = cfg.state_file if cfg.state_file is not None else b.state_file
    return MemoryBackend(state_file=state_file, flush_interval_s=b.flush_interval_s,
                         max_tenants=b.max_tenants)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ExposureError(f"{what} {path}: {exc.strerror or exc}") from None


class Credentials:
    """The tokens and TLS material of one server, loaded and checked before anything
    binds: a listener reachable beyond loopback without a credential is refused."""

    def __init__(self, cfg: ServerConfig, policy: CompiledPolicy) -> None:
        admin_file = cfg.admin_token_file or policy.admin_token_file
        try:
            self.admin = TokenFile(admin_file, "admin token") if admin_file else None
            self.grpc = (TokenFile(cfg.grpc_token_file, "gRPC token")
                         if cfg.grpc_token_file else None)
        except TokenError as exc:
            raise ExposureError(str(exc)) from None
        if (cfg.grpc_tls_cert is None) != (cfg.grpc_tls_key is None):
            raise ExposureError("--grpc-tls-cert and --grpc-tls-key go together")
        if cfg.grpc_client_ca and cfg.grpc_tls_cert is None:
            raise ExposureError("--grpc-client-ca needs --grpc-tls-cert and --grpc-tls-key")
        self.grpc_tls: Optional[grpc.ServerCredentials] = None
        self.mtls = bool(cfg.grpc_client_ca)
        if cfg.grpc_tls_cert and cfg.grpc_tls_key:
            self.grpc_tls = grpc.ssl_server_credentials(
                [(_read(cfg.grpc_tls_key, "--grpc-tls-key"),
                  _read(cfg.grpc_tls_cert, "--grpc-tls-cert"))],
                root_certificates=(_read(cfg.grpc_client_ca, "--grpc-client-ca")
                                   if cfg.grpc_client_ca else None),
                require_client_auth=self.mtls)
        # whoever reaches the gRPC port (or the fast path) can be decided and charged as
        # any tenant and report usage, and the admin port rewrites the books: beyond
        # loopback only with a credential
        need = {"--grpc": "--grpc-token-file FILE or mTLS (--grpc-tls-cert, --grpc-tls-key, "
                          "--grpc-client-ca)",
                "--http-authz": "--grpc-token-file FILE (Envoy sends it in `authorization`)",
                "--admin": "--admin-token-file FILE (or policy admin.token_file)"}
        for flag, addr, ok in (("--grpc", cfg.grpc_addr, self.grpc is not None or self.mtls),
                               ("--http-authz", cfg.http_authz_addr, self.grpc is not None),
                               ("--admin", cfg.admin_addr, self.admin is not None)):
            if addr and not ok and not is_loopback_host(host_of(addr)):
                raise ExposureError(f"{flag} {addr} is reachable beyond loopback without a "
                                    f"credential; give {need[flag]}, or bind it to 127.0.0.1 "
                                    "(docs/security.md)")


class _GrpcTokenCheck(grpc.aio.ServerInterceptor):
    """Every call but health checks carries the gRPC token (`authorization: Bearer ...`,
    which Envoy's grpc_service initial_metadata sends); a usage report may carry the admin
    token instead. Installed only when a gRPC token is configured."""

    def __init__(self, grpc_token: TokenFile, admin_token: Optional[TokenFile],
                 metrics: Metrics) -> None:
        self.grpc_token = grpc_token
        self.admin_token = admin_token
        self.refused = metrics.auth_failures.labels("grpc")

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this sidecar needs `authorization: Bearer <token>` metadata")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        method = details.method
        if method.startswith("/grpc.health.v1.Health/"):  # kubelet probes send no metadata
            return await continuation(details)
        auth = bearer_from_metadata(details.invocation_metadata)
        if self.grpc_token.matches(auth) or (
                method == REPORT_METHOD and self.admin_token is not None
                and self.admin_token.matches(auth)):
            return await continuation(details)
        self.refused.inc()
        return self._deny


class Sidecar:
    def __init__(self, cfg: ServerConfig, policy: Optional[CompiledPolicy] = None,
                 backend: Optional[Backend] = None, ledger: Optional[Ledger] = None) -> None:
        self.cfg = cfg
        self.policy = policy or (load_policy(cfg.policy_path) if cfg.policy_path else sample_policy())
        self.metrics = Metrics()
        self.credentials = Credentials(cfg, self.policy)  # before anything is bound
        self.backend = backend or make_backend(self.policy, cfg)
        # the policy's ledger: section (a change of it needs a restart, like the backend)
        self.ledger = ledger if ledger is not None else build_ledger(self.policy.ledger)
        self.service = DecisionService(self.policy, self.backend, self.metrics, self.ledger)
        self.metrics.watch_backend(self.backend)
        self.metrics.watch_ledger(self.ledger)
        self._ledger_ticker: Optional[asyncio.Task] = None
        self.grpc_server: Optional[grpc.aio.Server] = None
        self.http_server: Optional[LimitedHttpServer] = None
        self.admin_server: Optional[LimitedHttpServer] = None
        self.grpc_port = 0
        self.http_port = 0
        self.admin_port = 0
        # slow, rare work (rendering /metrics, spend) off the event loop, one at a time
        self._slow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-slow")
        self._slow_waiting = 0
        self.http_authz_port = 0
        self.http_authz_server: Optional[asyncio.AbstractServer] = None
        self._reloader: Optional[asyncio.Task] = None
        self._policy_stamp = self._stamp()
        self._health: Optional[health_aio.HealthServicer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # --- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        self.ledger.start()
        self._ledger_ticker = asyncio.get_running_loop().create_task(self._tick_ledger())
        try:
            await self._start_listeners()
        except BaseException:
            # stop what had started (the gRPC server's threads outliving the event loop
            # made a second traceback) before the error reaches `kt serve`
            await self.stop()
            raise

    async def _start_listeners(self) -> None:
        # without --workers a second process on the same port is an error, not a silent share
        creds = self.credentials
        interceptors = ([_GrpcTokenCheck(creds.grpc, creds.admin, self.metrics)]
                        if creds.grpc is not None else [])
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 1 if self.cfg.reuse_port else 0)])
        server.add_generic_rpc_handlers((authorization_handler(self.service),))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(self.service), server)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorServicer(self.service), server)
        server.add_generic_rpc_handlers((usage_service_handler(self.service, creds.admin,
                                                               self.metrics),))
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(UsageLogReceiver(self.service), server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            if not self.cfg.reuse_port:  # a worker joins a port its siblings hold
                probe_bind(self.cfg.grpc_addr)
            if creds.grpc_tls is not None:
                self.grpc_port = server.add_secure_port(self.cfg.grpc_addr, creds.grpc_tls)
            else:
                self.grpc_port = server.add_insecure_port(self.cfg.grpc_addr)
        except (OSError, RuntimeError) as exc:
            raise listen_error("--grpc", self.cfg.grpc_addr, exc) from None
        await server.start()
        self.grpc_server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._loop = asyncio.get_running_loop()
        self.http_server = LimitedHttpServer(self._side_request, self.cfg.side_limits)
        self.http_port = await _listen(self.http_server, "--http", self.cfg.http_addr)
        if self.cfg.admin_addr:
            self.admin_server = LimitedHttpServer(self._admin_request, self.cfg.side_limits)
            self.admin_port = await _listen(self.admin_server, "--admin", self.cfg.admin_addr)
        if self.cfg.http_authz_addr:
            host, port = _host_port(self.cfg.http_authz_addr)
            try:
                self.http_authz_server, self.http_authz_port = await start_http_authz(
                    self.service, host, port, reuse_port=self.cfg.reuse_port, token=creds.grpc)
            except OSError as exc:
                raise listen_error("--http-authz", self.cfg.http_authz_addr, exc) from None
        self.metrics.policy_info.labels(self.policy.source, self.policy.digest).set(1)
        if self.cfg.policy_path:
            self._reloader = asyncio.get_running_loop().create_task(self._reload_loop())
        if self.cfg.ready_file:
            tmp = self.cfg.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"grpc_port": self.grpc_port, "http_port": self.http_port,
                           "admin_port": self.admin_port,
                           "http_authz_port": self.http_authz_port}, f)
            os.replace(tmp, self.cfg.ready_file)
        log.info("serving gRPC on %s (port %d%s), HTTP on port %d, admin on port %d (%s), "
                 "policy %s (%s), backend %s", self.cfg.grpc_addr, self.grpc_port,
                 ", token" if creds.grpc else ", mTLS" if creds.mtls else "", self.http_port,
                 self.admin_port, "token" if creds.admin else "loopback callers only",
                 self.policy.source, self.policy.digest, self.backend.name)

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
        if self._ledger_ticker is not None:
            self._ledger_ticker.cancel()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.http_authz_server is not None:
            self.http_authz_server.close()
        if self.grpc_server is not None:
            await self.grpc_server.stop(self.cfg.grace_s)
        for side in (self.http_server, self.admin_server):
            if side is not None:
                side.close()
        self._slow.shutdown(wait=False)
        # after the drain: the reservations still open are recorded as kept at their
        # estimate, idempotent against a later report of the same request
        # (sidecar/open_reservations.py)
        await keep_open_reservations(self.service, self.cfg.grace_s)
        # settlements whose reply was lost: a moment to read their outcome from the store
        await self.service.settler.close(self.cfg.grace_s)
        await self.backend.close()
        # after the drain: the last settlements' events are in the buffer; written (or
        # spilled) by the writer thread, off the event loop
        await asyncio.to_thread(self.ledger.close)

    async def _tick_ledger(self) -> None:
        """Close each minute's refusal counts even when no refusal follows, and reservations
        past their age even when no decision follows."""
        while True:
            await asyncio.sleep(5)
            self.ledger.tick()
            self.service.expire_reservations()

    # --- HTTP side port and admin port -------------------------------------
    async def _slowly(self, fn):
        """Run fn in the one slow-work thread; at most a few callers wait for it."""
        if self._slow_waiting >= 4:
            return None
        self._slow_waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._slow, fn)
        finally:
            self._slow_waiting -= 1

    async def _side_request(self, req: HttpRequest) -> HttpResponse:
        """--http: what Prometheus and probes read; nothing here changes or reveals the books."""
        if req.method not in ("GET", "HEAD"):
            return text(405, "GET only\n")
        if req.path == "/metrics":
            body = await self._slowly(self._metrics_text)
            if body is None:
                return text(503, "scrapes are already being rendered\n")
            return HttpResponse(200, body, CONTENT_TYPE_LATEST)
        if req.path == "/healthz":
            return text(200, "ok\n")
        if req.path == "/readyz":
            st = self.backend.status()
            # a failing ledger sink is a detail (its events spill to local disk, nothing
            # is lost, decisions go on); events being lost are not (docs/ledger.md)
            ledger_ready, ledger = self.ledger.status()
            if st.ready and ledger_ready:
                return text(200, f"ready: {st.detail}; {ledger}\n")
            return text(503, f"not ready: {st.detail}; {ledger}\n")
        if req.path in ("/v1/usage", "/v1/spend"):
            return text(404, ADMIN_MOVED)
        return text(404, "not found\n")

    def _metrics_text(self) -> bytes:
        self._refresh_gauges()
        return generate_latest(self.metrics.registry)

    def _admin_allows(self, req: HttpRequest) -> bool:
        return admin_allows(self.credentials.admin, req)

    async def _admin_request(self, req: HttpRequest) -> HttpResponse:
        """--admin: the books. Every request carries the admin token."""
        if not self._admin_allows(req):
            self.metrics.auth_failures.labels("admin").inc()
            return UNAUTHORIZED
        if req.path == "/v1/usage":
            if req.method != "POST":
                return text(405, "POST a JSON usage report\n")
            status, payload = await report_json(self.service, req.body)
            return HttpResponse(status, payload, "application/json")
        if req.path == "/v1/spend":
            if req.method not in ("GET", "HEAD"):
                return text(405, "GET only\n")
            return await self._spend_report(req.query)
        return text(404, "not found\n")

    def spend_summary(self) -> dict:
        """Actual tokens and USD per tenant and model since start (from the metrics)."""
        return spend_from_metrics(self.metrics.registry.collect())

    async def _spend_report(self, query: str) -> HttpResponse:
        """GET /v1/spend[?since=YYYY-MM-DD&until=YYYY-MM-DD&period=day|month|total]: the
        durable spend the backend keeps (every tenant, every replica's requests;
        sidecar/ledger/spend.py). Summed in the slow-work thread, off the event loop."""
        from urllib.parse import parse_qs

        from sidecar.ledger.spend import parse_query, report

        def error(status: int, kind: str, code: str, message: str) -> HttpResponse:
            return HttpResponse(status, json.dumps({"error": {
                "type": kind, "code": code, "message": message}}).encode(), "application/json")

        try:
            since, until, period = parse_query(parse_qs(query))
        except ValueError as exc:
            return error(400, "invalid_request_error", "invalid_query", str(exc))
        try:
            cells = await asyncio.wait_for(self.backend.spend_cells(since, until), 10)
        except (BackendError, asyncio.TimeoutError) as exc:
            return error(503, "service_unavailable", "limiter_unavailable",
                         f"spend not readable, retry: {exc}")
        doc = await self._slowly(lambda: json.dumps(
            report(cells, since, until, period, self.backend.name, self._budget_unit),
            sort_keys=True).encode())
        if doc is None:
            return text(503, "busy, retry\n")
        return HttpResponse(200, doc, "application/json")

    def _budget_unit(self, tenant: str) -> str:
        """The unit of ``tenant``'s budget under the policy in force ("" without one)."""
        rule = self.policy.rule_for(tenant)
        return rule.budget_unit if rule is not None and rule.limits.budget >= 0 else ""

    def _refresh_gauges(self) -> None:
        self.metrics.backend_ready.labels(self.backend.name).set(
            1 if self.backend.status().ready else 0)

    # --- policy hot reload -------------------------------------------------
    def _stamp(self) -> Optional[tuple]:
        # stat the resolved path: a Kubernetes ConfigMap update swaps a symlink,
        # which changes the target's inode even when mtime looks older
        if not self.cfg.policy_path:
            return None
        try:
            st = Path(self.cfg.policy_path).resolve().stat()
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    async def _reload_loop(self) -> None:
        """Checks the file every reload_interval_s. Reading, parsing and compiling run in a
        thread (a 100,000-tenant policy takes seconds): decisions go on meanwhile, on the
        policy being served, and the new one is swapped in by one assignment on the loop.
        Nothing stops this loop but cancellation: every failure is counted and logged."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                new = await loop.run_in_executor(None, self._load_if_changed)
                if new is not None:
                    self._apply_policy(new)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reloader must outlive any bug or bad file
                self.metrics.policy_reloads.labels("error").inc()
                log.exception("policy reload failed unexpectedly, still serving %s",
                              self.policy.digest)

    def reload_if_changed(self) -> bool:
        """One reload check in the caller's thread (tests; the loop uses _reload_loop)."""
        new = self._load_if_changed()
        return new is not None and self._apply_policy(new)

    def _load_if_changed(self) -> Optional[CompiledPolicy]:
        """The changed file's policy, or None (unchanged, or refused: counted and logged).
        Safe to run in a thread: it reads the served policy, never writes it."""
        stamp = self._stamp()
        if stamp is None or stamp == self._policy_stamp:
            return None
        self._policy_stamp = stamp
        assert self.cfg.policy_path
        serving = self.policy
        try:
            new = load_policy(self.cfg.policy_path)
        except PolicyError as exc:
            # a bad policy never replaces a good one
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload failed, still serving %s: %d error(s):\n%s",
                      serving.digest, len(exc.errors), exc)
            return None
        except Exception:  # noqa: BLE001 - counted and logged, never fatal to the reloader
            self.metrics.policy_reloads.labels("error").inc()
            log.exception("policy reload failed, still serving %s", serving.digest)
            return None
        if new.digest == serving.digest:
            return None
        if type(new.backend) is not type(serving.backend) or new.backend != serving.backend:
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload: the backend section changed; that needs a restart. "
                      "Still serving %s", serving.digest)
            return None
        if new.ledger != serving.ledger:
            self.metrics.policy_reloads.labels("error").inc()
            log.error("policy reload: the ledger section changed; that needs a restart. "
                      "Still serving %s", serving.digest)
            return None
        return new

    def _apply_policy(self, new: CompiledPolicy) -> bool:
        """Swap in a loaded policy: plain assignments, no I/O, on the event loop."""
        self.metrics.policy_info.clear()
        self.metrics.policy_info.labels(new.source, new.digest).set(1)
        self.policy = new
        self.service.replace_policy(new)
        self.metrics.policy_reloads.labels("ok").inc()
        log.info("policy reloaded: %s (%d tenants)", new.digest, len(new.tenants))
        return True


def spend_from_metrics(families) -> dict:
    """Actual tokens and USD per tenant and model, from metric families (a registry's, or
    the merged families of `kt serve --workers`)."""
    out: dict = {}
    for metric in families:
        if metric.name not in ("kt_tokens", "kt_cost_dollars"):
            continue
        for sample in metric.samples:
            if not sample.name.endswith("_total"):
                continue
            rec = out.setdefault(sample.labels["tenant"], {}).setdefault(
                sample.labels["model"], {"input_tokens": 0, "output_tokens": 0, "usd": 0.0})
            if metric.name == "kt_cost_dollars":
                rec["usd"] = sample.value
            else:
                rec[sample.labels["type"] + "_tokens"] = int(sample.value)
    return {"tenants": out}


ADMIN_MOVED = ("served on the admin port (--admin, default 127.0.0.1:9091), with its "
               "bearer token\n")
UNAUTHORIZED = HttpResponse(401, contract.error_body(
    "This endpoint needs `Authorization: Bearer <admin token>`.", "authentication_error",
    "unauthorized"), "application/json", [("www-authenticate", "Bearer")])


def admin_allows(token: Optional[TokenFile], req: HttpRequest) -> bool:
    """The admin API's one rule: the token when one is configured; else (the port is
    bound to loopback, Credentials refuses anything else) a loopback caller."""
    if token is not None:
        return token.matches(req.headers.get("authorization"))
    return is_loopback_host(req.peer)


def _host_port(addr: str) -> tuple[str, int]:
    """("" = every interface, which the exposure check treats as beyond loopback)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def _listen(server: LimitedHttpServer, flag: str, addr: str) -> int:
    try:
        return await server.start(*_host_port(addr))
    except OSError as exc:
        raise listen_error(flag, addr, exc) from None


class ThreadedHttpServer:
    """A LimitedHttpServer for a process without an event loop of its own (the
    `--workers` supervisor): its loop runs in a daemon thread, and a blocking WSGI app
    answers in a small pool of threads. The same limits as the sidecar's own ports: a
    connection is not a thread, and a slow client is closed when its time is up."""

    def __init__(self, flag: str, addr: str, app, limits: ServerLimits = ServerLimits(),
                 threads: int = 4) -> None:
        self.app = app
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kt-http")
        self._loop = asyncio.new_event_loop()
        self._server = LimitedHttpServer(self._handle, limits)
        try:
            port = self._loop.run_until_complete(_listen(self._server, flag, addr))
        except BaseException:
            self._loop.close()
            self._pool.shutdown(wait=False)
            raise
        self.server_address = (_host_port(addr)[0], port)
        self._thread = threading.Thread(target=self._loop.run_forever, name="kt-http-loop",
                                        daemon=True)
        self._thread.start()

    async def _handle(self, req: HttpRequest) -> HttpResponse:
        return await self._loop.run_in_executor(self._pool, self._call_wsgi, req)

    def _call_wsgi(self, req: HttpRequest) -> HttpResponse:
        environ = {"REQUEST_METHOD": req.method, "PATH_INFO": req.path,
                   "QUERY_STRING": req.query, "CONTENT_LENGTH": str(len(req.body)),
                   "CONTENT_TYPE": req.headers.get("content-type", ""),
                   "REMOTE_ADDR": req.peer, "wsgi.input": io.BytesIO(req.body)}
        for k, v in req.headers.items():
            environ["HTTP_" + k.upper().replace("-", "_")] = v
        out: dict = {}

        def start_response(status: str, headers: list) -> None:
            out["status"], out["headers"] = status, headers

        body = b"".join(self.app(environ, start_response))
        status = int(out["status"].split(" ", 1)[0])
        ctype = "text/plain; charset=utf-8"
        extra = []
        for k, v in out["headers"]:
            if k.lower() == "content-type":
                ctype = v
            elif k.lower() != "content-length":
                extra.append((k, v))
        return HttpResponse(status, body, ctype, extra)

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


def serve_wsgi(flag: str, addr: str, app) -> ThreadedHttpServer:
    """A side port of the supervisor: a blocking WSGI app behind the limited server."""
    return ThreadedHttpServer(flag, addr, app)


async def serve(cfg: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT. A signal during start-up (held by `kt` until now:
    sidecar/stop_signals.py) lets the start finish, bounded as it is, then stops what
    started: one log line, never a traceback."""
    stop = asyncio.Event()
    received: list[str] = []

    def request_stop(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in stop_signals.STOP_SIGNALS:
        loop.add_signal_handler(sig, request_stop, sig)
    stop_signals.release()
    sidecar = Sidecar(cfg)
    await sidecar.start()
    await stop.wait()
    log.info("%s: shutting down: draining gRPC, flushing state", received[0])
    await sidecar.stop()
