"""Wiring: policy + backend + service + transports on one gRPC port, and the HTTP
side port (/metrics, /healthz, /readyz). No decision logic lives here."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

import grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import make_wsgi_app

from sidecar.backends.base import Backend
from sidecar.backends.memory import MemoryBackend
from sidecar.ledger.recorder import Ledger, LedgerCollector, build_ledger
from sidecar.metrics import Metrics
from sidecar.policy import schema
from sidecar.policy.load import CompiledPolicy, PolicyError, load_policy, parse_policy
from sidecar.service import DecisionService
from sidecar.transports.als import UsageLogReceiver
from sidecar.transports.authz import authorization_handler
from sidecar.transports.ext_proc import ExternalProcessorServicer
from sidecar.transports.http_authz import start_http_authz
from sidecar.transports.rls import RateLimitServicer
from sidecar.transports.usage_api import report_json, usage_service_handler
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


@dataclass
class ServerConfig:
    grpc_addr: str = "127.0.0.1:8081"
    http_addr: str = "127.0.0.1:9090"
    policy_path: Optional[str] = None  # None: the sample policy shipped in the package
    state_file: Optional[str] = None  # overrides the memory backend's state_file
    ready_file: Optional[str] = None  # JSON {"grpc_port", "http_port", ...} written once serving
    http_authz_addr: Optional[str] = None  # the fast path: Envoy's HTTP ext_authz
    # share the gRPC and HTTP-authz ports with sibling worker processes (kt serve --workers)
    reuse_port: bool = False
    reload_interval_s: float = 2.0
    grace_s: float = 2.0


def make_backend(policy: CompiledPolicy, cfg: ServerConfig) -> Backend:
    b = policy.backend
    if isinstance(b, schema.RedisBackend):
        from sidecar.backends.redis import RedisBackend  # only needed with a redis policy

        return RedisBackend(b)
    state_file = cfg.state_file if cfg.state_file is not None else b.state_file
    return MemoryBackend(state_file=state_file, flush_interval_s=b.flush_interval_s)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (signature is the stdlib's)
        pass


class Sidecar:
    def __init__(self, cfg: ServerConfig, policy: Optional[CompiledPolicy] = None,
                 backend: Optional[Backend] = None, ledger: Optional[Ledger] = None) -> None:
        self.cfg = cfg
        self.policy = policy or (load_policy(cfg.policy_path) if cfg.policy_path else sample_policy())
        self.metrics = Metrics()
        self.backend = backend or make_backend(self.policy, cfg)
        # the policy's ledger: section (a change of it needs a restart, like the backend)
        self.ledger = ledger if ledger is not None else build_ledger(self.policy.ledger)
        self.service = DecisionService(self.policy, self.backend, self.metrics, self.ledger)
        self.metrics.watch_backend(self.backend)
        self.metrics.registry.register(LedgerCollector(self.ledger))
        self._ledger_ticker: Optional[asyncio.Task] = None
        self.grpc_server: Optional[grpc.aio.Server] = None
        self.http_server: Optional[WSGIServer] = None
        self.grpc_port = 0
        self.http_port = 0
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
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if self.cfg.reuse_port else 0)])
        server.add_generic_rpc_handlers((authorization_handler(self.service),))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(self.service), server)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorServicer(self.service), server)
        server.add_generic_rpc_handlers((usage_service_handler(self.service),))
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(UsageLogReceiver(self.service), server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            if not self.cfg.reuse_port:  # a worker joins a port its siblings hold
                probe_bind(self.cfg.grpc_addr)
            self.grpc_port = server.add_insecure_port(self.cfg.grpc_addr)
        except (OSError, RuntimeError) as exc:
            raise listen_error("--grpc", self.cfg.grpc_addr, exc) from None
        await server.start()
        self.grpc_server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._loop = asyncio.get_running_loop()
        self._start_http()
        if self.cfg.http_authz_addr:
            host, _, port = self.cfg.http_authz_addr.rpartition(":")
            try:
                self.http_authz_server, self.http_authz_port = await start_http_authz(
                    self.service, host.strip("[]"), int(port), reuse_port=self.cfg.reuse_port)
            except OSError as exc:
                raise listen_error("--http-authz", self.cfg.http_authz_addr, exc) from None
        self.metrics.policy_info.labels(self.policy.source, self.policy.digest).set(1)
        if self.cfg.policy_path:
            self._reloader = asyncio.get_running_loop().create_task(self._reload_loop())
        if self.cfg.ready_file:
            tmp = self.cfg.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"grpc_port": self.grpc_port, "http_port": self.http_port,
                           "http_authz_port": self.http_authz_port}, f)
            os.replace(tmp, self.cfg.ready_file)
        log.info("serving gRPC on %s (port %d), HTTP on port %d, policy %s (%s), backend %s",
                 self.cfg.grpc_addr, self.grpc_port, self.http_port, self.policy.source,
                 self.policy.digest, self.backend.name)

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
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
        await self.backend.close()
        # after the drain: the last settlements' events are in the buffer; written (or
        # spilled) by the writer thread, off the event loop
        await asyncio.to_thread(self.ledger.close)

    async def _tick_ledger(self) -> None:
        """Close each minute's refusal counts even when no refusal follows."""
        while True:
            await asyncio.sleep(5)
            self.ledger.tick()

    # --- HTTP side port ----------------------------------------------------
    def _start_http(self) -> None:
        host, _, port = self.cfg.http_addr.rpartition(":")
        metrics_app = make_wsgi_app(self.metrics.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                self._refresh_gauges()
                return metrics_app(environ, start_response)
            if path == "/v1/usage":
                return self._usage_report(environ, start_response)
            if path == "/v1/spend":
                return _json(start_response, "200 OK", self.spend_summary())
            if path == "/healthz":
                return _text(start_response, "200 OK", "ok\n")
            if path == "/readyz":
                st = self.backend.status()
                # a failing ledger sink is a detail, not unreadiness: its events spill to
                # local disk and nothing is lost, so decisions must go on
                ledger = self.ledger.status()[1]
                if st.ready:
                    return _text(start_response, "200 OK", f"ready: {st.detail}; {ledger}\n")
                return _text(start_response, "503 Service Unavailable",
                             f"not ready: {st.detail}; {ledger}\n")
            return _text(start_response, "404 Not Found", "not found\n")

        server = serve_wsgi("--http", self.cfg.http_addr, app)
        self.http_server = server
        self.http_port = server.server_address[1]

    def _usage_report(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "POST":
            return _text(start_response, "405 Method Not Allowed", "POST a JSON usage report\n")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= 65536:
            return _text(start_response, "400 Bad Request", "content-length 0..65536 required\n")
        body = environ["wsgi.input"].read(length)
        # the WSGI thread hands the report to the event loop that owns the backend
        future = asyncio.run_coroutine_threadsafe(report_json(self.service, body), self._loop)
        try:
            status, payload = future.result(timeout=5)
        except Exception as exc:  # noqa: BLE001 - a report must get an answer, never a hang
            future.cancel()
            status, payload = 503, json.dumps({"error": {
                "type": "service_unavailable", "code": "limiter_unavailable",
                "message": f"usage not recorded, retry: {exc!r}"}}).encode()
        reason = {200: "OK", 400: "Bad Request", 503: "Service Unavailable"}.get(status, "")
        start_response(f"{status} {reason}", [("Content-Type", "application/json")])
        return [payload]

    def spend_summary(self) -> dict:
        """Actual tokens and USD per tenant and model since start (from the metrics)."""
        return spend_from_metrics(self.metrics.registry.collect())

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


def serve_wsgi(flag: str, addr: str, app) -> WSGIServer:
    """The side port: the standard library's threaded WSGI server, in a daemon thread."""
    host, _, port = addr.rpartition(":")
    try:
        server = make_server(host.strip("[]") or "127.0.0.1", int(port), app,
                             server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise listen_error(flag, addr, exc) from None
    threading.Thread(target=server.serve_forever, name="kt-http", daemon=True).start()
    return server


def _json(start_response, status: str, doc) -> list:
    start_response(status, [("Content-Type", "application/json")])
    return [json.dumps(doc, sort_keys=True).encode()]


def _text(start_response, status: str, text: str):
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [text.encode()]


async def serve(cfg: ServerConfig) -> None:
    import signal

    sidecar = Sidecar(cfg)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining gRPC, flushing state")
    await sidecar.stop()
