"""SIGINT or SIGTERM at any moment of `kt serve`'s start-up: one clean stop, exit 0, no
traceback; with and without `--workers` (docs/deploy.md, "Stopping")."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.procs import LOOPBACK, wait_until, workdir
from tests.support.valkey import Valkey

# after kt's first line: from the import of gRPC to well after serving (the first ready
# file appears after about 0.5 s here, the workers' after 1-2 s)
DELAYS_S = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2)
WORKER_DELAYS_S = (0.0, 0.1, 0.3, 0.6, 1.0, 1.6, 2.5)


def _kt_running(pid: int) -> bool:
    """Whether kt's own code runs: the decision core (sidecar/_core, a shared object) is
    loaded, which happens after the interpreter's start and before gRPC, the policy or
    any port. The interpreter's start itself (site packages, before any line of kt) is
    what no line of kt can cover (sidecar/stop_signals.py)."""
    return "/sidecar/_core" in Path(f"/proc/{pid}/maps").read_text()


def _serve_and_signal(args: list[str], sig: signal.Signals, delay: float, to_group: bool,
                      d: Path) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "sidecar.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=d, start_new_session=True)
    try:
        wait_until(lambda: _kt_running(proc.pid), 30, "kt started")
        time.sleep(delay)
        if to_group:  # as a terminal's Ctrl-C: the supervisor and every worker
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _assert_clean(res: subprocess.CompletedProcess, what: str) -> None:
    assert "Traceback" not in res.stderr and "Error" not in res.stderr, f"{what}:\n{res.stderr}"
    assert res.returncode == 0, f"{what}: exit {res.returncode}\n{res.stderr}"


@pytest.mark.subprocess
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_of_start_up_stops_cleanly(sig):
    with workdir() as d:
        for delay in DELAYS_S:
            res = _serve_and_signal(
                ["--grpc", f"{LOOPBACK}:0", "--http", f"{LOOPBACK}:0", "--admin",
                 f"{LOOPBACK}:0", "--http-authz", f"{LOOPBACK}:0",
                 "--state-file", str(d / "spend.json")], sig, delay, False, d)
            _assert_clean(res, f"{sig.name} {delay} s after start")
            # the stop is said in one line, whenever it came
            assert res.stderr.count(f"{sig.name}: shutting down") == 1, res.stderr


@pytest.mark.valkey
def test_ctrl_c_and_sigterm_at_any_moment_of_start_up_with_workers():
    with workdir() as d, Valkey(d) as v:
        policy = d / "policy.yaml"
        policy.write_text("tiers: [{name: default, model: gpt-4o}]\n"
                          f"backend: {{kind: redis, url: \"{v.url}\"}}\n")
        args = ["--workers", "2", "--config", str(policy), "--grpc", f"{LOOPBACK}:0",
                "--http", f"{LOOPBACK}:0", "--admin", f"{LOOPBACK}:0"]
        for sig, to_group in ((signal.SIGINT, True), (signal.SIGTERM, False)):
            for delay in WORKER_DELAYS_S:
                res = _serve_and_signal(args, sig, delay, to_group, d)
                _assert_clean(res, f"{sig.name} {delay} s after start")
                assert "stopping the workers" in res.stderr, res.stderr
