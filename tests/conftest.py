"""Shared pytest setup. The real servers tests start live in tests/support/; the fixture
here only gives a module one of them."""
from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import settings

from tests.support.procs import workdir
from tests.support.valkey import Valkey

# CI runs on 2 cores: bounded, deterministic-enough property runs with no per-example deadline.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="module")
def valkey() -> Iterator[Valkey]:
    """One real Valkey for the module's tests, which keep apart by key (a module whose
    tests need it empty overrides this fixture and flushes it)."""
    with workdir() as d, Valkey(d) as v:
        yield v
