"""Wiring: policy + backend + the two flows (flows.py) + transports on one gRPC port, the
HTTP side port and the admin port (routes: http_routes.py; who may use each:
credentials.py), hot reload (reload.py), start and stop. No decision logic lives here."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import grpc
import msgspec
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar import http_routes, stop_signals
from sidecar.backends.base import Backend
from sidecar.backends.memory import MemoryBackend
from sidecar.backends.overlay_store import FileOverlayStore, OverlayStore, RedisOverlayStore
from sidecar.backends.redis import RedisBackend
from sidecar.credentials import Credentials, GrpcTokenCheck
from sidecar.flows import Flows
from sidecar.ledger.recorder import Ledger, build_ledger
from sidecar.listen import host_port, listen, listen_error, probe_bind
from sidecar.metrics import Metrics
from sidecar.policy import schema
from sidecar.overlay_sync import OverlayKeeper
from sidecar.policy.load import CompiledPolicy, load_policy, read_policy_file
from sidecar.reload import PolicyReloader
from sidecar.settlement.open_reservations import keep_open_reservations
from sidecar.server_config import SAMPLE_SOURCE, ServerConfig, sample_policy, sample_policy_raw
from sidecar.tenants_api import TenantsApi
from sidecar.tracing import RequestSpans
from sidecar.transports.als import UsageLogReceiver, handler as usage_log_handler
from sidecar.transports.authz import authorization_handler
from sidecar.transports.ext_proc import ExternalProcessorServicer
from sidecar.transports.http_authz import start_http_authz
from sidecar.transports.http_side import HttpRequest, HttpResponse, LimitedHttpServer, text
from sidecar.transports.rls import RateLimitServicer
from sidecar.transports.usage_api import report_json, usage_service_handler

log = logging.getLogger("kt.server")


def make_backend(policy: CompiledPolicy, cfg: ServerConfig) -> Backend:
    b = policy.backend
    if isinstance(b, schema.RedisBackend):
        if cfg.share_reservations and not b.shared_reservations:
            b = msgspec.structs.replace(b, shared_reservations=True)
        return RedisBackend(b)
    state_file = cfg.state_file if cfg.state_file is not None else b.state_file
    return MemoryBackend(state_file=state_file, flush_interval_s=b.flush_interval_s,
                         max_tenants=b.max_tenants)


def overlay_store_for(backend: Backend, cfg: ServerConfig,
                      policy: CompiledPolicy) -> OverlayStore:
    """Where the management API's overlay lives: in Redis beside a Redis backend's state
    (every sidecar of the fleet reads it), else next to the embedded state file."""
    if isinstance(backend, RedisBackend):
        return RedisOverlayStore(backend.cfg)
    if isinstance(backend, MemoryBackend):
        return FileOverlayStore.beside(backend.state_file)
    b = policy.backend
    state_file = cfg.state_file if cfg.state_file is not None else getattr(b, "state_file", "")
    return FileOverlayStore.beside(state_file or "")


class Sidecar:
    def __init__(self, cfg: ServerConfig, policy: Optional[CompiledPolicy] = None,
                 backend: Optional[Backend] = None, ledger: Optional[Ledger] = None) -> None:
        self.cfg = cfg
        # the bytes the management API's overlay is layered over: the file's (read again
        # on reload), the sample's, or none for a policy handed over compiled (tests)
        raw: Optional[bytes] = None
        if cfg.policy_path:
            raw = read_policy_file(cfg.policy_path)
        elif policy is None:
            raw = sample_policy_raw()
        self.policy = policy or (load_policy(cfg.policy_path) if cfg.policy_path else sample_policy())
        self.metrics = Metrics()
        self.credentials = Credentials(cfg, self.policy)  # before anything is bound
        self.backend = backend or make_backend(self.policy, cfg)
        # the policy's ledger: section (a change of it needs a restart, like the backend)
        self.ledger = ledger if ledger is not None else build_ledger(self.policy.ledger)
        # a span per request closed, beside its ledger event (kt serve --otlp-endpoint)
        self.spans = (RequestSpans(cfg.otlp_endpoint, instance=self.ledger.instance,
                                   sample_ratio=cfg.otlp_sample_ratio)
                      if cfg.otlp_endpoint else None)
        if self.spans is not None:
            self.ledger.spans = self.spans.request
        self.service = Flows(self.policy, self.backend, self.metrics, self.ledger)
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
        self.overlay = OverlayKeeper(
            overlay_store_for(self.backend, cfg, self.policy),
            cfg.policy_path or SAMPLE_SOURCE, raw, lambda: self.policy, self._apply_policy,
            self.metrics)
        # the clock the backend decides by (its budget periods): the embedded one's own,
        # else the wall clock (Redis decides by its TIME, which it keeps close to)
        clock = (self.backend.clock if isinstance(self.backend, MemoryBackend)
                 else lambda: time.time_ns() // 1000)
        self.tenants = TenantsApi(self.overlay, lambda: self.policy, self.backend, self.ledger,
                                  clock)
        self._reloader = (PolicyReloader(cfg.policy_path, cfg.reload_interval_s, self.metrics,
                                         lambda: self.policy, self._apply_policy,
                                         self.overlay.load_file)
                          if cfg.policy_path else None)
        self._reload_task: Optional[asyncio.Task] = None
        self._health: Optional[health_aio.HealthServicer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # --- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        try:
            # the management API's changes, over the file, before anything is decided
            layered = await self.overlay.start()
        except BaseException:
            await self.backend.close()
            raise
        if layered is not None:
            self._apply_policy(layered)
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
        interceptors = ([GrpcTokenCheck(creds.grpc, creds.admin, self.metrics)]
                        if creds.grpc is not None else [])
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.so_reuseport", 1 if self.cfg.reuse_port else 0)])
        server.add_generic_rpc_handlers((authorization_handler(self.service.decider),))
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitServicer(self.service.decider), server)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            ExternalProcessorServicer(self.service.settlement), server)
        server.add_generic_rpc_handlers((usage_service_handler(self.service.settlement, creds.admin,
                                                               self.metrics),))
        server.add_generic_rpc_handlers((usage_log_handler(UsageLogReceiver(self.service.settlement)),))
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
        self.http_port = await listen(self.http_server, "--http", self.cfg.http_addr)
        if self.cfg.admin_addr:
            self.admin_server = LimitedHttpServer(self._admin_request, self.cfg.side_limits)
            self.admin_port = await listen(self.admin_server, "--admin", self.cfg.admin_addr)
        if self.cfg.http_authz_addr:
            host, port = host_port(self.cfg.http_authz_addr)
            try:
                self.http_authz_server, self.http_authz_port = await start_http_authz(
                    self.service.decider, host, port, reuse_port=self.cfg.reuse_port, token=creds.grpc)
            except OSError as exc:
                raise listen_error("--http-authz", self.cfg.http_authz_addr, exc) from None
        self.metrics.policy_info.labels(self.policy.source, self.policy.digest).set(1)
        if self._reloader is not None:
            self._reload_task = asyncio.get_running_loop().create_task(self._reloader.run())
        self.overlay.run()
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
        if self._reload_task is not None:
            self._reload_task.cancel()
        await self.overlay.stop()
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
        # (sidecar/settlement/open_reservations.py)
        await keep_open_reservations(self.service.settlement, self.cfg.grace_s)
        # settlements whose reply was lost: a moment to read their outcome from the store
        await self.service.settlement.settler.close(self.cfg.grace_s)
        # the last second's spend of users and tags (sidecar/settlement/attributed.py)
        await self.service.settlement.attributed.flush()
        await self.backend.close()
        # after the drain: the last settlements' events are in the buffer; written (or
        # spilled) by the writer thread, off the event loop
        await asyncio.to_thread(self.ledger.close)
        if self.spans is not None:  # the last spans, bounded by the exporter's timeout
            await asyncio.to_thread(self.spans.close)

    async def _tick_ledger(self) -> None:
        """Close each minute's refusal counts even when no refusal follows, reservations
        past their age even when no decision follows, and token-rate flags of tenants that
        went quiet."""
        while True:
            await asyncio.sleep(5)
            self.ledger.tick()
            self.service.reservations.expire()
            self.service.sweep_anomalies()

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
        """--http: what Prometheus and probes read (http_routes.py)."""
        endpoint = http_routes.side_route(req)
        if not isinstance(endpoint, str):
            return endpoint
        if endpoint == http_routes.METRICS:
            body = await self._slowly(self._metrics_text)
            if body is None:
                return text(503, "scrapes are already being rendered\n")
            return HttpResponse(200, body, CONTENT_TYPE_LATEST)
        st = self.backend.status()
        # a failing ledger sink is a detail (its events spill to local disk, nothing
        # is lost, decisions go on); events being lost are not (docs/ledger.md)
        ledger_ready, ledger = self.ledger.status()
        if st.ready and ledger_ready:
            return text(200, f"ready: {st.detail}; {ledger}\n")
        return text(503, f"not ready: {st.detail}; {ledger}\n")

    def _metrics_text(self) -> bytes:
        self.metrics.backend_ready.labels(self.backend.name).set(
            1 if self.backend.status().ready else 0)
        return generate_latest(self.metrics.registry)

    async def _admin_request(self, req: HttpRequest) -> HttpResponse:
        """--admin: the books. Every request carries the admin token."""
        endpoint = http_routes.admin_route(
            req, self.credentials.admin, self.metrics.auth_failures.labels("admin").inc)
        if not isinstance(endpoint, str):
            return endpoint
        if endpoint == http_routes.USAGE:
            status, payload = await report_json(self.service.settlement, req.body)
            return HttpResponse(status, payload, "application/json")
        if endpoint == http_routes.OPENAPI:
            return HttpResponse(200, http_routes.openapi_document(), "application/json")
        if endpoint == http_routes.TENANTS:
            return await self.tenants.handle(req, http_routes.admin_identity(
                self.credentials.admin, req))
        if endpoint == http_routes.STATUS:
            return await http_routes.status_report(
                self.backend, self.ledger.status, self.policy.source, self.policy.digest,
                self.metrics, self._slowly, lambda: time.time_ns() // 1000)
        return await http_routes.spend_report(self.backend, req.query, self._slowly,
                                              self._budget_unit)

    def _budget_unit(self, tenant: str) -> str:
        """The unit of ``tenant``'s budget under the policy in force ("" without one)."""
        rule = self.policy.rule_for(tenant)
        return rule.budget_unit if rule is not None and rule.limits.budget >= 0 else ""

    # --- policy hot reload (reload.py) ---------------------------------------
    def reload_if_changed(self) -> bool:
        """One reload check in the caller's thread (tests; the server runs the loop)."""
        return self._reloader.reload_if_changed() if self._reloader is not None else False

    def _apply_policy(self, new: CompiledPolicy) -> None:
        self.metrics.policy_info.clear()
        self.metrics.policy_info.labels(new.source, new.digest).set(1)
        self.policy = new
        self.service.replace_policy(new)
        self.overlay.served(new)


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
