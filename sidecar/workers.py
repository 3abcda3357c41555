"""`kt serve --workers N`: N sidecar processes sharing the gRPC and HTTP-authz ports.

One Python process decides on one core; workers let a sidecar use more. The kernel
spreads Envoy's connections over the processes (SO_REUSEPORT). Each worker is a whole
`kt serve` with its own side port (metrics, probes), so every worker is scraped on its
own port: worker i serves `--http` port + i (or an ephemeral port with port 0; the ready
file lists them). Workers share state only through Redis, so the embedded backend,
whose state lives in one process, refuses N > 1.

This supervisor serves nothing itself: it starts the workers, restarts one that dies
(at most 5 times a minute, then it gives up and stops them all, so the pod restarts),
and forwards SIGTERM / SIGINT for a graceful stop.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from sidecar.policy import schema
from sidecar.policy.load import load_policy
from sidecar.server import sample_policy

log = logging.getLogger("kt.workers")
MAX_RESTARTS_PER_MINUTE = 5


class WorkerError(Exception):
    """The workers cannot run as asked; the message says why."""


def _port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def supervise(args, n: int) -> int:
    policy = load_policy(args.config) if args.config else sample_policy()
    if not isinstance(policy.backend, schema.RedisBackend):
        raise WorkerError("--workers > 1 needs the redis backend: with the embedded backend "
                          "each worker would keep its own limits and budgets (limit x workers)")
    tmp = Path(tempfile.mkdtemp(prefix="kt-workers-"))
    http_host, http_port = _port(args.http)

    def command(i: int, grpc_addr: str, authz_addr: Optional[str]) -> list[str]:
        cmd = [sys.executable, "-m", "sidecar.cli", "serve", "--worker-of-supervisor",
               "--grpc", grpc_addr, "--http", f"{http_host}:{http_port + i if http_port else 0}",
               "--ready-file", str(tmp / f"worker-{i}.json"), "--log-level", args.log_level]
        if args.config:
            cmd += ["--config", args.config]
        if authz_addr:
            cmd += ["--http-authz", authz_addr]
        return cmd

    def wait_ready(i: int, proc: subprocess.Popen) -> dict:
        ready = tmp / f"worker-{i}.json"
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None:
                raise WorkerError(f"worker {i} exited with {proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise WorkerError(f"worker {i} not serving after 60 s")
            time.sleep(0.05)
        return json.loads(ready.read_text())

    procs: list[Optional[subprocess.Popen]] = [None] * n
    stopping = False

    def stop_all(*_sig) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    try:
        # worker 0 binds the ports (possibly ephemeral); the others join the same ones
        proc = procs[0] = subprocess.Popen(command(0, args.grpc, args.http_authz))
        first = wait_ready(0, proc)
        grpc_addr = f"{_port(args.grpc)[0]}:{first['grpc_port']}"
        authz_addr = (f"{_port(args.http_authz)[0]}:{first['http_authz_port']}"
                      if args.http_authz else None)
        # with the ports now fixed, so that a restarted worker (0 included) joins them
        commands = [command(i, grpc_addr, authz_addr) for i in range(n)]
        ports = [first["http_port"]]
        for i in range(1, n):
            proc = procs[i] = subprocess.Popen(commands[i])
            ports.append(wait_ready(i, proc)["http_port"])
        if args.ready_file:
            doc = dict(first, worker_http_ports=ports, workers=n)
            Path(args.ready_file + ".tmp").write_text(json.dumps(doc))
            os.replace(args.ready_file + ".tmp", args.ready_file)
        log.info("%d workers serving gRPC on %s%s; side ports %s", n, grpc_addr,
                 f", HTTP authz on {authz_addr}" if authz_addr else "", ports)
        restarts: list[float] = []
        while not stopping:
            time.sleep(0.5)
            for i, p in enumerate(procs):
                if stopping or p is None or p.poll() is None:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > MAX_RESTARTS_PER_MINUTE:
                    log.error("workers keep dying (%d restarts in a minute): stopping",
                              len(restarts) - 1)
                    stop_all()
                    return 1
                log.error("worker %d exited with %s: restarting it", i, p.returncode)
                procs[i] = subprocess.Popen(commands[i])
        return 0
    finally:
        stop_all()
        for p in procs:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
