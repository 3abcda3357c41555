"""The soak's parts as processes it can fault: one Valkey (AOF, fsync always, so a
restart keeps the books), one PostgreSQL, and two gateways, each a real Envoy from
`kt envoy-config` in front of its own `kt serve` (the Redis backend). Every process is
started on ephemeral loopback ports and stopped by its pid; a restarted one comes back
on the same ports."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

from tests.support.postgres import Postgres
from tests.support.procs import LOOPBACK, EnvoyProcess, SidecarProcess, free_port
from tests.support.valkey import Valkey

# a restart of Valkey is a SIGKILL: with every write fsynced to the AOF before it is
# acknowledged, nothing the sidecars were told was applied can be lost
VALKEY_DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


def durable_valkey(workdir: Path) -> Valkey:
    return Valkey(workdir, extra_args=VALKEY_DURABLE)


def kt(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """The `kt` command of this checkout (PYTHONPATH decides which sidecar package)."""
    return subprocess.run([sys.executable, "-m", "sidecar.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


class Gateway:
    """Envoy (printed by `kt envoy-config`) + `kt serve`, restartable on their ports."""

    def __init__(self, name: str, workdir: Path, policy: Path, mode: str,
                 upstreams: dict[str, int]) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self.mode = mode
        self.upstreams = upstreams
        self.sidecar = SidecarProcess(policy, self.dir, ("--http-authz", f"{LOOPBACK}:0",
                                                         "--log-level", "WARNING"))
        self.envoy: Optional[EnvoyProcess] = None
        self.listen_port = free_port()
        self.envoy_admin_port = free_port()

    def start(self) -> "Gateway":
        self.sidecar.start(timeout=60)
        args = self.sidecar.args  # the next start binds the same ports
        for flag, port in (("--grpc", self.sidecar.grpc_port), ("--http", self.sidecar.http_port),
                           ("--http-authz", self.sidecar.http_authz_port),
                           ("--admin", self.sidecar.admin_port)):
            args[args.index(flag) + 1] = f"{LOOPBACK}:{port}"
        cmd = ["envoy-config", "--config", str(self.policy), "--mode", self.mode,
               "--failure-mode", "deny",
               "--listen", f"{LOOPBACK}:{self.listen_port}",
               "--admin", f"{LOOPBACK}:{self.envoy_admin_port}",
               "--sidecar", f"{LOOPBACK}:{self.sidecar.grpc_port}",
               "--sidecar-http", f"{LOOPBACK}:{self.sidecar.http_authz_port}"]
        for tier, port in self.upstreams.items():
            cmd += ["--upstream", f"{tier}={LOOPBACK}:{port}"]
        printed = kt(*cmd)
        if printed.returncode != 0:
            raise RuntimeError(f"kt envoy-config failed: {printed.stderr}")
        self.envoy = EnvoyProcess(printed.stdout, self.dir, self.envoy_admin_port,
                                  self.listen_port)
        self.envoy.__enter__()
        return self

    def restart_envoy(self) -> None:
        assert self.envoy is not None
        self.envoy.__exit__()
        self.envoy.__enter__()

    def kill_sidecar(self) -> None:
        assert self.sidecar.proc is not None
        self.sidecar.proc.send_signal(signal.SIGKILL)
        self.sidecar.proc.wait(10)

    def restart_sidecar(self) -> None:
        self.sidecar.start(timeout=60)

    def pids(self) -> dict[str, int]:
        out = {}
        if self.sidecar.proc is not None and self.sidecar.proc.poll() is None:
            out[f"sidecar-{self.name}"] = self.sidecar.proc.pid
        if self.envoy is not None and self.envoy.proc is not None \
                and self.envoy.proc.poll() is None:
            out[f"envoy-{self.name}"] = self.envoy.proc.pid
        return out

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.__exit__()
        self.sidecar.stop(grace=20)


def postgres_tree(pg: Postgres) -> list[psutil.Process]:
    """The postmaster and its backends: SIGSTOP of the postmaster alone would leave the
    backend serving a sidecar's connection running."""
    if pg.proc is None or pg.proc.poll() is not None:
        return []
    root = psutil.Process(pg.proc.pid)
    return [root, *root.children(recursive=True)]


def hang_postgres(pg: Postgres, seconds: float) -> int:
    """SIGSTOP the whole server (its kernel still answers TCP), then SIGCONT; returns how
    many processes were stopped."""
    procs = postgres_tree(pg)
    stopped = []
    try:
        for p in procs:
            try:
                p.send_signal(signal.SIGSTOP)
                stopped.append(p)
            except psutil.NoSuchProcess:
                pass
        time.sleep(seconds)
    finally:
        for p in stopped:
            try:
                p.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
    return len(stopped)


def stall_valkey(v: Valkey, seconds: float) -> None:
    os.kill(v.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(v.pid, signal.SIGCONT)


def restart_valkey(v: Valkey) -> None:
    v.kill()  # SIGKILL: the AOF (fsync always) is what brings the books back
    v.start()


def restart_postgres(pg: Postgres, down_s: float) -> None:
    pg.stop()
    time.sleep(down_s)
    pg.start()

