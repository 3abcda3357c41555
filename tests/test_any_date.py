"""The suite's time-dependent tests at the calendar's edges.

Every fake clock starts at tests/support/clock.T0_US, which ``KT_TEST_T0`` moves. Here
the tests that take a fake clock (the Lua scripts against the reference model, the
invariants, the durable spend, the embedded backend, provider quotas) run again with it
half a second before a month ends and at a year's first instant: a test that mixes its
fake clock with a real one (Valkey's TIME, the wall clock), or hard-codes a date, fails
here on any day of the year, not only on the day the calendar turns."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIME_DEPENDENT = [
    "tests/ledger/test_ledger_spend.py", "tests/settlement/test_usage.py", "tests/core/test_lua_reference.py",
    "tests/backends/test_memory_backend.py", "tests/core/test_invariants.py",
    "tests/core/test_providers_redis.py", "tests/decision/test_providers_service.py",
    "tests/core/test_path_invariants.py", "tests/decision/test_holders.py",
]


EDGES = ["2026-11-30T23:59:59.5Z", "2027-01-01T00:00:00Z"]


@pytest.mark.valkey
@pytest.mark.cluster
def test_time_dependent_tests_pass_at_the_calendars_edges() -> None:
    # both edges at once, each in its own process (two cores: the suite itself is serial)
    runs = {t0: subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-n", "0",
         "-k", "not embedded_sidecar_restarts", *TIME_DEPENDENT],
        cwd=ROOT, env=dict(os.environ, KT_TEST_T0=t0), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for t0 in EDGES}
    try:
        for t0, run in runs.items():
            out, err = run.communicate(timeout=900)
            tail = "\n".join(out.splitlines()[-40:])
            assert run.returncode == 0, f"KT_TEST_T0={t0}:\n{tail}\n{err[-2000:]}"
            assert " passed" in tail and " failed" not in tail
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
