"""The README's command table against the code: every `kt` command the CLI has is in the
table, and every flag the table names exists on the command it names (and every flag of
a bench script the table names is one that script reads)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from sidecar.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def command_rows() -> list[str]:
    """The first cell of each row of the README's "## Commands" table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ("kt",)):
    """(words, parser) of every command that runs something, e.g. ("kt", "events", "stats")."""
    subs = subcommands(parser)
    if not subs:
        yield prefix, parser
    for name, sub in subs.items():
        yield from commands(sub, prefix + (name,))


def documented() -> list[tuple[tuple[str, ...], list[str]]]:
    """(command words, flags) of every `kt ...` code span in the table's first column."""
    spans = [span for row in command_rows() for span in re.findall(r"`([^`]+)`", row)]
    out = []
    for span in spans:
        if not span.startswith("kt "):
            continue
        words = tuple(w for w in span.split() if re.fullmatch(r"[a-z][a-z-]*", w))
        out.append((words, re.findall(r"--[a-z][a-z-]*", span)))
    return out


def test_every_kt_command_is_in_the_readme_table_with_flags_it_has():
    cli = dict(commands(build_parser()))
    spans = documented()
    for words in cli:
        assert any(w[:len(words)] == words for w, _ in spans), \
            f"`{' '.join(words)}` is not in the README's command table"
    for words, flags in spans:
        found = [(c, p) for c, p in cli.items() if words[:len(c)] == c]
        assert found, f"the README names `{' '.join(words)}`, which kt does not have"
        command, parser = max(found, key=lambda cp: len(cp[0]))
        known = {o for a in parser._actions for o in a.option_strings}
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"the README gives `{' '.join(command)}` flags it lacks: {unknown}"


def test_the_bench_scripts_in_the_table_read_the_flags_it_gives_them():
    scripts = [span for row in command_rows() for span in re.findall(r"`(python [^`]+)`", row)]
    assert scripts
    for span in scripts:
        path = ROOT / span.split()[1]
        assert path.is_file(), f"the README names {path.name}, which is not there"
        source = path.read_text()
        missing = [f for f in re.findall(r"--[a-z][a-z-]*", span) if f'"{f}"' not in source]
        assert not missing, f"{path.name} does not take {missing}"
