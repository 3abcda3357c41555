"""Shared pytest setup: the suite's fixtures (each a real server, or a view of one), the
marks that say which servers a test starts (tests/support/servers.py), and the logs a
failed test shows. The servers themselves are started by tests/support/."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import redis
from hypothesis import settings

from tests.support.postgres import Postgres
from tests.support.procs import log_tail, workdir
from tests.support.servers import ENV, MARKS, starting, starts
from tests.support.valkey import Store, Valkey, ValkeyCluster

# CI runs on 2 cores: bounded, deterministic-enough property runs with no per-example deadline.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


# --- servers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
@starts("valkey")
def valkey() -> Iterator[Valkey]:
    """One real Valkey for the module's tests, which keep apart by key."""
    with workdir() as d, Valkey(d) as v:
        yield v


@pytest.fixture
def empty_valkey(valkey: Valkey) -> Valkey:
    """The module's Valkey, emptied: the test starts from no state."""
    _flush(valkey)
    return valkey


@pytest.fixture
@starts("valkey")
def own_valkey() -> Iterator[Valkey]:
    """A Valkey of the test's own, which it may stall, kill or restart."""
    with workdir() as d, Valkey(d) as v:
        yield v


@pytest.fixture(scope="module")
@starts("cluster")
def valkey_cluster() -> Iterator[ValkeyCluster]:
    """One 3-node Valkey cluster for the module's tests."""
    with workdir() as d, ValkeyCluster(d) as c:
        yield c


@pytest.fixture
def empty_cluster(valkey_cluster: ValkeyCluster) -> ValkeyCluster:
    """The module's cluster, every node emptied: the test starts from no state."""
    for node in valkey_cluster.nodes:
        _flush(node)
    return valkey_cluster


@pytest.fixture(scope="module", params=[pytest.param("node", marks=pytest.mark.valkey),
                                        pytest.param("cluster", marks=pytest.mark.cluster)])
def store(request) -> Iterator[Store]:
    """The module's tests run twice: on one Valkey node, then on a 3-node cluster."""
    with workdir() as d:
        if request.param == "cluster":
            with ValkeyCluster(d) as c:
                yield Store(c)
        else:
            with Valkey(d) as v:
                yield Store(v)


@pytest.fixture(scope="module")
@starts("postgres")
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
    conn.execute("TRUNCATE kt_usage_events, kt_usage_daily, kt_refusals, kt_budget_thresholds, "
                 "kt_token_rate_anomalies, kt_admin_audit")
    try:
        yield conn
    finally:
        conn.close()


def _flush(server: Valkey) -> None:
    r = redis.Redis.from_url(server.url)
    try:
        r.flushall()
    finally:
        r.close()


# --- what a test starts -----------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before -m selects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with what its fixtures start (``@starts``); a cluster is Valkey
    servers, so ``cluster`` brings ``valkey``; a test with none of MARKS is ``inprocess``."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        started: set[str] = set()
        for name in getattr(item, "fixturenames", ()):
            for fixturedef in (fixtures.name2fixturedefs.get(name, ()) if fixtures else ()):
                started.update(getattr(fixturedef.func, "kt_starts", ()))
        if "cluster" in started or item.get_closest_marker("cluster") is not None:
            started.add("valkey")
        for mark in sorted(started):
            if item.get_closest_marker(mark) is None:
                item.add_marker(getattr(pytest.mark, mark))
        if not any(item.get_closest_marker(m) is not None for m in MARKS):
            item.add_marker(pytest.mark.inprocess)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """While the test runs (set-up and tear-down included), its marks are in the
    environment, where tests/support/servers.starting() holds what it starts to them."""
    before = os.environ.get(ENV)
    os.environ[ENV] = ",".join(m for m in MARKS if item.get_closest_marker(m) is not None)
    try:
        return (yield)
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


class _MarkedPopen(subprocess.Popen):
    """Every process a test starts is held to its marks (an ``inprocess`` test starts none)."""

    def __init__(self, *args, **kwargs) -> None:
        starting("subprocess")
        super().__init__(*args, **kwargs)


subprocess.Popen = _MarkedPopen  # type: ignore[misc]


# --- what a failed test shows -----------------------------------------------------------
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
