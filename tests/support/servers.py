"""What a test starts, as pytest marks (registered in pyproject.toml):

- ``envoy``: a real Envoy (a proxy, or ``envoy --mode validate``);
- ``valkey``: a real Valkey server; ``cluster``: a 3-node Valkey cluster (also ``valkey``);
- ``postgres``: a real PostgreSQL server;
- ``subprocess``: none of those, but processes of its own (``kt serve``, a ``kt`` command,
  mypy, pip, a bench script): seconds where an in-process test takes milliseconds;
- ``inprocess``: none of the above (given by tests/conftest.py, never written by hand).

``python -m pytest -m inprocess`` runs the in-process suite alone; ``-m "not envoy and not
valkey and not postgres"`` runs everything that needs no server.

How a test gets its marks (tests/conftest.py applies them at collection):
- from the fixtures it uses: a fixture that starts servers says which with ``@starts(...)``
  under its ``@pytest.fixture`` (conftest's ``valkey``, ``pg``... and a module's own), or,
  for a parametrized one, per parameter with ``pytest.param(..., marks=...)``;
- a test that starts one itself (``with Valkey(d) as v:``, a bench script, the README's
  commands) carries the mark: ``@pytest.mark.valkey``, or ``pytestmark`` when every test of
  its module does.

The marks cannot drift: while a test runs, ``KT_TEST_MARKS`` holds its marks, and the
support helpers that start a server (tests/support/valkey.py, postgres.py, procs.py's
``find_binary("envoy")``) call ``starting()`` first, as does every ``subprocess.Popen``
of the test process (conftest); a test that is not marked for what it starts fails, with
the mark to add. Child processes inherit the variable (a bench script run by a test, which
starts its own Valkey, is held to the test's marks too); outside pytest it is unset and
nothing is checked."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

SERVERS = ("envoy", "valkey", "cluster", "postgres")
MARKS = SERVERS + ("subprocess",)  # a test with none of these is marked "inprocess"
ENV = "KT_TEST_MARKS"

F = TypeVar("F", bound=Callable)


def starts(*marks: str) -> Callable[[F], F]:
    """Under ``@pytest.fixture``: every test using this fixture is marked ``marks``."""
    unknown = set(marks) - set(MARKS)
    assert not unknown, f"unknown marks {unknown}: one of {MARKS}"

    def mark(fixture: F) -> F:
        fixture.kt_starts = marks  # type: ignore[attr-defined]
        return fixture
    return mark


class Unmarked(AssertionError):
    pass


def starting(what: str) -> None:
    """Called just before ``what`` (one of MARKS) is started. A server needs its own mark;
    a process (``subprocess``) any of MARKS: a server's test starts processes anyway."""
    held = os.environ.get(ENV)
    if held is None:  # not inside a test
        return
    marks = set(held.split(",")) - {""}
    if what in marks or (what == "subprocess" and marks):
        return
    raise Unmarked(
        f"this test starts {what} but is not marked {what!r}: add @pytest.mark.{what} "
        f"(or @starts({what!r}) under the @pytest.fixture that starts it; "
        f"tests/support/servers.py)")
