"""Shared pytest setup. The real servers tests start live in tests/support/; the fixture
here only gives a module one of them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import settings

from tests.support.postgres import Postgres
from tests.support.procs import log_tail, workdir
from tests.support.valkey import Valkey

# CI runs on 2 cores: bounded, deterministic-enough property runs with no per-example deadline.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    """One real PostgreSQL for the module's tests, with the ledger's schema."""
    from sidecar.ledger.postgres import migrate

    with workdir("kt-pg-") as d, Postgres(d) as server:
        migrate(server.dsn)
        yield server


@pytest.fixture
def db(pg: Postgres) -> Iterator:
    """A connection to ``pg`` with the ledger's tables emptied."""
    import psycopg

    conn = psycopg.connect(pg.dsn, autocommit=True)
    conn.execute("TRUNCATE kt_usage_events, kt_usage_daily, kt_refusals, kt_budget_thresholds")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture(scope="module")
def valkey() -> Iterator[Valkey]:
    """One real Valkey for the module's tests, which keep apart by key (a module whose
    tests need it empty overrides this fixture and flushes it)."""
    with workdir() as d, Valkey(d) as v:
        yield v


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the last lines of the logs of the servers its fixtures started
    (a module-scoped stack's sidecar and Envoy, say): the assertion alone rarely says why
    a request was answered as it was, and the logs are gone with the fixture's directory."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        for part in (value, getattr(value, "sidecar", None), getattr(value, "envoy", None)):
            log = getattr(part, "log", None)
            if isinstance(log, Path) and log.exists():
                report.sections.append((f"{name}: {log.name}", log_tail(log, 30)))
