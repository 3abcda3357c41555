"""`kt events stats` prints names a client chose (the model of its request, echoed by the
provider into the ledger) on an operator's terminal: control characters must not forge
rows, recolour the table or hide text."""
from __future__ import annotations

import time

from sidecar.cli import main as kt
from sidecar.ledger.events import RefusalsEvent
from sidecar.ledger.recorder import MINUTE_US
from sidecar.ledger.sinks import FileSink
from tests.ledger.test_ledger import usage_event

FORGED = "gpt-4o\x1b[8m\nmallory              gpt-4o                        1        1"


def test_events_stats_escapes_control_characters_in_names(tmp_path, capsys):
    now = time.time_ns() // 1000
    sink = FileSink(tmp_path, fsync=False)
    sink.write([usage_event(1, t_us=now, model_served=FORGED),
                usage_event(2, tenant="acme\u202eevil", t_us=now, provider="p\rq")])
    sink.write([RefusalsEvent(minute_us=now - now % MINUTE_US, tenant="bob\x07",
                              reason="rate_limited", count=3, instance="t")])
    sink.close()
    assert kt(["events", "stats", "--dir", str(tmp_path), "--last", "1h"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # one header, two usage rows, a blank line, the refusals header and one refusal row:
    # the newline in the model name forged no "mallory" row
    assert len(lines) == 6, out
    assert not any(line.startswith("mallory") for line in lines)
    assert not any(c in out for c in "\x1b\r\x07\u202e")
    assert "gpt-4o\\x1b[8m\\x0amallory" in out
    assert "acme\\u202eevil" in out and "p\\x0dq" in out and "bob\\x07" in out


def test_printable_names_are_unchanged_and_escapes_cannot_be_forged():
    from sidecar.ledger.stats import printable

    for name in ("gpt-4o", "claude-sonnet-4", "modèle-中文", "a b"):
        assert printable(name) is name
    # a literal backslash is escaped too: "x\x1b" typed by a client reads as itself
    assert printable("x\\x1b") == "x\\\\x1b"
    assert printable("\x85\u2028\U000e0001") == "\\x85\\u2028\\U000e0001"
