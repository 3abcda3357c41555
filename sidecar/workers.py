"""`kt serve --workers N`: N sidecar processes that look like one sidecar from outside.

One Python process decides on one core; workers let a sidecar use more. The kernel
spreads Envoy's connections over the processes (SO_REUSEPORT on the gRPC and HTTP-authz
ports). Workers share state only through Redis, so the embedded backend, whose state
lives in one process, refuses N > 1.

The supervisor serves the side port (`--http`) itself, so Prometheus, the kubelet and an
operator see one sidecar:
- `/metrics` is the sum of the workers' metrics, read from each worker's own side port
  (loopback, ephemeral) at scrape time: counters and histograms add up; a gauge adds up
  too (a queue depth, in-flight requests) unless `GAUGE_MERGE` (worker_metrics.py) says otherwise (a backend
  that one worker finds not ready makes the pod's `kt_backend_ready` 0). A worker that
  exits leaves its counters and histograms, as last scraped, in the sum (RetiredCounts):
  a restart never makes a pod's counter go backwards.
  prometheus-client's multiprocess mode was the alternative; it needs every gauge to
  declare its mode and cannot carry custom collectors (the backend's round-trip counters),
  so the supervisor merges the workers' own expositions instead.
- the workers share reservations through Redis (`shared_reservations`, whatever the
  policy says): Envoy's connection, and with it the usage of requests in flight, moves to
  a sibling when a worker dies, and the sibling must replace their estimates, not add to
  them.
- `/readyz` answers 200 only when every worker is running and answers its own `/readyz`
  with 200 (within a second); otherwise 503 naming the first worker that is not.
- `/healthz` answers 200 while the supervisor runs (it restarts a worker that dies).
- the admin port (`--admin`) is the supervisor's too, with the same token rule as a
  single sidecar's (docs/security.md): `/v1/spend` is answered by any worker (the spend lives in the shared backend);
  `POST /v1/usage` goes to one worker's own admin port (loopback, ephemeral, same token;
  round robin; with the Redis backend's `shared_reservations` any worker settles any
  reservation, docs/usage.md).
Both are served with the sidecar's connection limits and timeouts, on the sidecar's own
routes (http_routes.py: ThreadedHttpServer, side_route, admin_route).

It also starts the workers (each in a session of its own), restarts one that dies (at
most 5 times a minute, then it gives up and stops them all, so the pod restarts) and stops
them with SIGTERM when it receives SIGTERM or SIGINT.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from sidecar import stop_signals
from sidecar.auth import TokenFile
from sidecar.policy import schema
from sidecar.policy.load import load_policy
from sidecar import http_routes
from sidecar.credentials import Credentials
from sidecar.http_routes import ThreadedHttpServer
from sidecar.listen import listen_error, probe_bind
from sidecar.server_config import ServerConfig, sample_policy
from sidecar.transports.http_side import HttpRequest, HttpResponse, text
from sidecar.worker_metrics import Merged, RetiredCounts, merge_metrics

log = logging.getLogger("kt.workers")
MAX_RESTARTS_PER_MINUTE = 5
WORKER_TIMEOUT_S = 1.0  # a worker that cannot answer a probe or a scrape in this is not ready
# the exit codes with which `kt serve` has already printed its own one-line reason
_EXPLAINED = {2, 3, 4}
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


class WorkerError(Exception):
    """The workers cannot run as asked; the message says why."""


class WorkerExited(WorkerError):
    """A worker stopped before serving; it printed its own reason when `explained`.
    ``code`` is what `kt serve` exits with: the worker's, or 1 when a signal ended it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code if code > 0 else 1
        self.explained = code in _EXPLAINED


class _StopRequested(Exception):
    """SIGTERM or SIGINT reached the supervisor while the workers were starting."""


def _port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


@dataclass
class Worker:
    index: int
    command: list[str]
    ready_file: Path
    proc: Optional[subprocess.Popen] = None
    http_port: int = 0  # its own side port, on loopback; 0 until it serves
    admin_port: int = 0  # its own admin port, on loopback

    def start(self) -> None:
        self.http_port = self.admin_port = 0
        self.ready_file.unlink(missing_ok=True)
        # a session of its own: a terminal's Ctrl-C reaches the supervisor only, which stops
        # the workers with SIGTERM (a SIGINT in a worker's own interpreter start, before
        # any line of kt runs, would print Python's traceback)
        self.proc = subprocess.Popen(self.command, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def poll_ready(self) -> bool:
        """Whether it serves (and then its side port is known)."""
        if not self.http_port and self.ready_file.exists():
            ready = json.loads(self.ready_file.read_text())
            self.http_port, self.admin_port = ready["http_port"], ready.get("admin_port", 0)
        return bool(self.http_port)

    def get(self, path: str) -> tuple[int, bytes]:
        return _request(f"http://127.0.0.1:{self.http_port}{path}")


def _request(url: str, data: Optional[bytes] = None,
             headers: Optional[dict] = None, method: Optional[str] = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method=method or ("POST" if data is not None else "GET"))
    try:
        with _LOOPBACK.open(req, timeout=WORKER_TIMEOUT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Supervisor:
    def __init__(self, workers: list[Worker], admin_token: Optional[TokenFile] = None) -> None:
        self.workers = workers  # filled in as they start
        self.admin_token = admin_token
        self._turn = itertools.count()
        # each worker's last exposition, by its index: (its process id, the text)
        self._last: dict[int, tuple[int, str]] = {}
        self.retired = RetiredCounts()
        self._scraping = threading.Lock()  # scrapes are answered by several threads

    # --- the pod's one side port ----------------------------------------------
    def side(self, req: HttpRequest) -> HttpResponse:
        try:
            return self._side(req)
        except Exception as exc:  # noqa: BLE001 - an answer, never a 500 and a traceback
            log.error("side port: %s %s failed: %r", req.method, req.path, exc)
            return text(503, "not available, retry\n")

    def _side(self, req: HttpRequest) -> HttpResponse:
        endpoint = http_routes.side_route(req)
        if not isinstance(endpoint, str):
            return endpoint
        if endpoint == http_routes.READY:
            problem = self.not_ready()
            if problem:
                return text(503, f"not ready: {problem}\n")
            return text(200, f"ready: {len(self.workers)} workers\n")
        try:
            families = self.scrape()
        except WorkerError as exc:  # a partial sum would look like a drop in counters
            return text(503, f"{exc}\n")
        registry = CollectorRegistry()
        registry.register(Merged(families))
        return HttpResponse(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    # --- the pod's one admin port ---------------------------------------------
    def admin(self, req: HttpRequest) -> HttpResponse:
        endpoint = http_routes.admin_route(req, self.admin_token)
        if not isinstance(endpoint, str):
            return endpoint
        if endpoint in (http_routes.SPEND, http_routes.STATUS, http_routes.OPENAPI,
                        http_routes.TENANTS):
            # the spend lives in the backend the workers share: any worker answers for all
            # (status: that worker's queue and failure-mode count, the fleet's spend); so
            # does the management API's overlay, which every worker polls from Redis
            return self._forward_to_a_worker(req, req.path)
        return self._forward_usage(req)

    def _forward_to_a_worker(self, req: HttpRequest, path: str) -> HttpResponse:
        """``path`` (spend, status, the management API) from one running worker's admin
        port, with the request's method and body: the spend and the overlay of holders live
        in the backend the workers share, so any worker answers for all (the caller's token
        goes along; the worker checks it)."""
        query = req.query
        headers = {}
        if req.headers.get("authorization"):
            headers["authorization"] = req.headers["authorization"]
        if req.body:
            headers["content-type"] = "application/json"
        last = ""
        for _ in range(len(self.workers)):
            w = self.workers[next(self._turn) % len(self.workers)]
            if not (w.running() and w.poll_ready()):
                continue
            try:
                status, body = _request(f"http://127.0.0.1:{w.admin_port}{path}"
                                        + (f"?{query}" if query else ""),
                                        req.body if req.method in ("PUT", "POST") else None,
                                        headers, req.method if req.method != "HEAD" else "GET")
            except OSError as exc:
                last = f"worker {w.index}: {exc}"
                continue
            return HttpResponse(status, body, "application/json")
        return text(503, f"no worker answers {path} {last}\n")

    def not_ready(self) -> str:
        for w in self.workers:
            if not w.running():
                return f"worker {w.index} is not running"
            if not w.poll_ready():
                return f"worker {w.index} is starting"
            try:
                status, body = w.get("/readyz")
            except OSError as exc:
                return f"worker {w.index} does not answer ({exc})"
            if status != 200:
                return f"worker {w.index}: {body.decode(errors='replace').strip()}"
        return ""

    def scrape(self) -> list[Metric]:
        texts: list[tuple[Worker, int, str]] = []
        for w in self.workers:
            if not (w.running() and w.poll_ready()):
                raise WorkerError(f"worker {w.index} is not serving; metrics are incomplete")
            assert w.proc is not None
            pid = w.proc.pid
            try:
                status, body = w.get("/metrics")
            except OSError as exc:
                raise WorkerError(f"worker {w.index} does not answer ({exc})") from None
            if status != 200:
                raise WorkerError(f"worker {w.index} answered {status} to /metrics")
            texts.append((w, pid, body.decode()))
        with self._scraping:
            for w, pid, text in texts:
                last = self._last.get(w.index)
                if last is not None and last[0] != pid:
                    # a new process in this worker's place: what the old one counted stays
                    self.retired.add(last[1])
                self._last[w.index] = (pid, text)
            return merge_metrics([text for _, _, text in texts], self.retired)

    def _forward_usage(self, req: HttpRequest) -> HttpResponse:
        if len(req.body) > 65536:
            return text(400, "content-length 0..65536 required\n")
        w = self.workers[next(self._turn) % len(self.workers)]
        headers = {"content-type": "application/json"}
        if req.headers.get("authorization"):  # the worker checks the same token
            headers["authorization"] = req.headers["authorization"]
        try:
            status, answer = _request(f"http://127.0.0.1:{w.admin_port}/v1/usage", req.body,
                                      headers)
        except OSError:
            status, answer = 503, json.dumps({"error": {
                "type": "service_unavailable", "code": "limiter_unavailable",
                "message": "usage not recorded, retry: no worker answered"}}).encode()
        return HttpResponse(status, answer, "application/json")


def supervise(args, n: int) -> int:
    policy = load_policy(args.config) if args.config else sample_policy()
    if not isinstance(policy.backend, schema.RedisBackend):
        raise WorkerError("--workers > 1 needs the redis backend: with the embedded backend "
                          "each worker would keep its own limits and budgets (limit x workers)")
    if policy.backend.cluster:
        log.warning("--workers with a Redis cluster: reservations are not shared in cluster "
                    "mode, so usage of a request whose worker died reaches a sibling without "
                    "its reservation and is charged on top of the estimate (docs/deploy.md)")
    # the listeners' credentials, checked as a single sidecar checks its own (one line
    # and exit 2 for a listener beyond loopback without one)
    credentials = Credentials(ServerConfig(
        grpc_addr=args.grpc, http_addr=args.http, http_authz_addr=args.http_authz,
        admin_addr=args.admin, admin_token_file=args.admin_token_file,
        grpc_token_file=args.grpc_token_file, grpc_tls_cert=args.grpc_tls_cert,
        grpc_tls_key=args.grpc_tls_key, grpc_client_ca=args.grpc_client_ca), policy)
    tmp = Path(tempfile.mkdtemp(prefix="kt-workers-"))

    def command(i: int, grpc_addr: str, authz_addr: Optional[str]) -> list[str]:
        # each worker's own side and admin ports are on loopback: only the supervisor
        # reads them (a worker's admin port takes the same token)
        cmd = [sys.executable, "-m", "sidecar.cli", "serve", "--worker-of-supervisor",
               "--grpc", grpc_addr, "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0",
               "--ready-file", str(tmp / f"worker-{i}.json"), "--log-level", args.log_level]
        for flag in ("admin_token_file", "grpc_token_file", "grpc_tls_cert", "grpc_tls_key",
                     "grpc_client_ca", "otlp_endpoint"):
            if getattr(args, flag, None):
                cmd += ["--" + flag.replace("_", "-"), getattr(args, flag)]
        if args.config:
            cmd += ["--config", args.config]
        if getattr(args, "otlp_endpoint", None):
            cmd += ["--otlp-sample-ratio", repr(args.otlp_sample_ratio)]
        if authz_addr:
            cmd += ["--http-authz", authz_addr]
        return cmd

    def wait_ready(w: Worker) -> dict:
        deadline = time.monotonic() + 60
        while not w.poll_ready():
            assert w.proc is not None
            if stopping:
                raise _StopRequested
            if w.proc.poll() is not None:
                code = w.proc.returncode
                how = (f"was ended by {signal.Signals(-code).name}" if code < 0
                       else f"exited with {code}")
                raise WorkerExited(f"worker {w.index} {how} before serving", code)
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {w.index} not serving after 60 s")
            time.sleep(0.05)
        return json.loads(w.ready_file.read_text())

    workers: list[Worker] = []
    stopping = False
    http_server = admin_server = None

    received: list[str] = []

    def stop_all(signum: int = 0, _frame=None) -> None:
        nonlocal stopping
        stopping = True
        if signum:
            received.append(signal.Signals(signum).name)
        for w in workers:
            if w.running():
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    # held by `kt` since its start (sidecar/stop_signals.py): one that came meanwhile is
    # handled now, and the workers, started after this, begin with them unblocked
    stop_signals.release()
    try:
        supervisor = Supervisor(workers, credentials.admin)
        # the pod's side and admin ports first: a port in use stops everything before any
        # worker runs
        http_server = ThreadedHttpServer("--http", args.http, supervisor.side)
        admin_server = ThreadedHttpServer("--admin", args.admin, supervisor.admin)
        # the workers bind the decision ports with SO_REUSEPORT, which does not refuse a
        # port another sidecar of ours holds: check they are free first
        for flag, addr in (("--grpc", args.grpc), ("--http-authz", args.http_authz)):
            if addr and _port(addr)[1]:
                try:
                    probe_bind(addr)
                except OSError as exc:
                    raise listen_error(flag, addr, exc) from None
        # worker 0 binds the decision ports (possibly ephemeral); the others join them
        if stopping:
            raise _StopRequested
        first_worker = Worker(0, command(0, args.grpc, args.http_authz), tmp / "worker-0.json")
        workers.append(first_worker)
        first_worker.start()
        first = wait_ready(first_worker)
        grpc_addr = f"{_port(args.grpc)[0]}:{first['grpc_port']}"
        authz_addr = (f"{_port(args.http_authz)[0]}:{first['http_authz_port']}"
                      if args.http_authz else None)
        # with the ports now fixed, so that a restarted worker (0 included) joins them
        first_worker.command = command(0, grpc_addr, authz_addr)
        for i in range(1, n):
            if stopping:
                raise _StopRequested
            w = Worker(i, command(i, grpc_addr, authz_addr), tmp / f"worker-{i}.json")
            workers.append(w)
            w.start()
            wait_ready(w)
        http_port = http_server.server_address[1]
        if args.ready_file:
            doc = dict(first, http_port=http_port, workers=n,
                       admin_port=admin_server.server_address[1],
                       worker_http_ports=[w.http_port for w in workers],
                       worker_pids=[w.proc.pid for w in workers if w.proc is not None])
            Path(args.ready_file + ".tmp").write_text(json.dumps(doc))
            os.replace(args.ready_file + ".tmp", args.ready_file)
        log.info("%d workers serving gRPC on %s%s; side port %s (the workers' sum)", n,
                 grpc_addr, f", HTTP authz on {authz_addr}" if authz_addr else "", http_port)
        restarts: list[float] = []
        while not stopping:
            time.sleep(0.5)
            for w in workers:
                if stopping or w.running():
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                    log.error("workers keep dying (%d restarts in a minute): stopping",
                              len(restarts) - 1)
                    stop_all()
                    return 1
                assert w.proc is not None
                log.error("worker %d exited with %s: restarting it", w.index, w.proc.returncode)
                w.start()
        log.info("%s: stopping the workers", received[0] if received else "stop")
        return 0
    except _StopRequested:
        log.info("%s during start-up: stopping the workers", received[0])
        return 0
    finally:
        stop_all()
        for w in workers:
            if w.proc is not None:
                try:
                    w.proc.wait(10)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
        for side in (http_server, admin_server):
            if side is not None:
                side.shutdown()
                side.server_close()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
