"""``kt events stats``: counts, tokens, cost and refusals per tenant, model and provider
over a recent window, from a file sink's directory or from PostgreSQL.

The two sources give the same numbers for the same events: both count each event key
once (a file can hold an event twice after a crash during a spill replay; PostgreSQL's
primary key never does)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from sidecar.ledger.events import Event, RefusalsEvent, UsageEvent

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: str) -> int:
    """"1h", "24h", "30d", "90m" -> seconds; ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"expected a duration like 1h, 24h or 30d, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def printable(name: str) -> str:
    """A name from an event (a client's model, a tenant) as one safe terminal cell: control
    and format characters (ANSI escapes, newlines that would forge rows, bidirectional
    overrides, line separators) and the backslash are written as escapes."""
    if name.isprintable() and "\\" not in name:  # the usual name: nothing to do
        return name
    out = []
    for c in name:
        if c == "\\":
            out.append("\\\\")
        elif not c.isprintable():  # Unicode's "Other" and "Separator" but the space
            n = ord(c)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000
                       else f"\\U{n:08x}")
        else:
            out.append(c)
    return "".join(out)


@dataclass
class Row:
    events: int = 0
    settled: int = 0
    released: int = 0
    kept: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost_nano_usd: int = 0

    def add(self, e: UsageEvent) -> None:
        self.events += 1
        if e.outcome == "settled":
            self.settled += 1
        elif e.outcome == "released":
            self.released += 1
        else:
            self.kept += 1
        self.input_tokens += e.input_tokens
        self.output_tokens += e.output_tokens
        self.cached_tokens += e.cached_tokens
        self.cache_write_tokens += e.cache_write_tokens
        self.cost_nano_usd += e.cost_nano_usd


@dataclass
class Stats:
    since_us: int
    until_us: int
    usage: dict[tuple[str, str, str], Row] = field(default_factory=dict)  # tenant, model, provider
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)  # tenant, reason
    skipped_lines: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "since_us": self.since_us, "until_us": self.until_us,
            "usage": [{"tenant": t, "model": m, "provider": p, **vars(r),
                       "cost_usd": r.cost_nano_usd / 1e9}
                      for (t, m, p), r in sorted(self.usage.items())],
            "refusals": [{"tenant": t, "reason": r, "count": n}
                         for (t, r), n in sorted(self.refusals.items())],
        }

    def text(self) -> str:
        out = [f"{'tenant':<20} {'model':<20} {'provider':<12} {'events':>8} {'settled':>8} "
               f"{'released':>8} {'kept':>6} {'input':>12} {'output':>12} {'cached':>10} "
               f"{'usd':>14}"]
        for (t, m, p), r in sorted(self.usage.items()):
            t, m, p = printable(t), printable(m), printable(p or "-")
            out.append(f"{t:<20} {m:<20} {p:<12} {r.events:>8} {r.settled:>8} "
                       f"{r.released:>8} {r.kept:>6} {r.input_tokens:>12} {r.output_tokens:>12} "
                       f"{r.cached_tokens:>10} {r.cost_nano_usd / 1e9:>14.9f}")
        if self.refusals:
            out.append("")
            out.append(f"{'tenant':<20} {'refused because':<20} {'count':>10}")
            for (t, reason), n in sorted(self.refusals.items()):
                out.append(f"{printable(t):<20} {printable(reason):<20} {n:>10}")
        if self.skipped_lines:
            out.append(f"\n({len(self.skipped_lines)} unreadable lines skipped, first: "
                       f"{printable(self.skipped_lines[0])})")
        return "\n".join(out) + "\n"


def from_events(events: Iterable[Event], since_us: int, until_us: int) -> Stats:
    st = Stats(since_us, until_us)
    seen: set[tuple] = set()
    for e in events:
        if isinstance(e, UsageEvent):
            if not since_us <= e.settled_us < until_us:
                continue
            k: tuple = ("u", *e.key)
            if k in seen:
                continue
            seen.add(k)
            st.usage.setdefault((e.tenant, e.model_served, e.provider), Row()).add(e)
        elif isinstance(e, RefusalsEvent):
            if not since_us <= e.minute_us < until_us:
                continue
            k = ("r", *e.key)
            if k in seen:
                continue
            seen.add(k)
            st.refusals[(e.tenant, e.reason)] = st.refusals.get((e.tenant, e.reason), 0) + e.count
    return st


def from_directory(directory: str, since_us: int, until_us: int) -> Stats:
    from sidecar.ledger.sinks import event_files, read_events

    bad: list[str] = []
    st = from_events(read_events(event_files(directory), bad), since_us, until_us)
    st.skipped_lines = bad
    return st


def from_postgres(dsn: str, since_us: int, until_us: int, conn=None) -> Stats:
    from sidecar.ledger.postgres import connect, ts

    st = Stats(since_us, until_us)
    own = conn is None
    conn = conn or connect(dsn)
    try:
        rows = conn.execute(
            "SELECT tenant, model_served, provider, count(*), "
            "count(*) FILTER (WHERE outcome = 'settled'), "
            "count(*) FILTER (WHERE outcome = 'released'), "
            "count(*) FILTER (WHERE outcome IN ('kept', 'expired')), "
            "sum(input_tokens), sum(output_tokens), sum(cached_tokens), "
            "sum(cache_write_tokens), sum(cost_nano_usd) "
            "FROM kt_usage_events WHERE settled_at >= %s AND settled_at < %s "
            "GROUP BY 1, 2, 3", (ts(since_us), ts(until_us))).fetchall()
        for t, m, p, *nums in rows:
            st.usage[(t, m, p)] = Row(*(int(x) for x in nums))
        for t, reason, n in conn.execute(
                "SELECT tenant, reason, sum(count) FROM kt_refusals "
                "WHERE minute >= %s AND minute < %s GROUP BY 1, 2",
                (ts(since_us), ts(until_us))).fetchall():
            st.refusals[(t, reason)] = int(n)
    finally:
        if own:
            conn.close()
    return st


def stats(source_dir: Optional[str], dsn: Optional[str], since_us: int, until_us: int) -> Stats:
    if dsn:
        return from_postgres(dsn, since_us, until_us)
    assert source_dir is not None
    return from_directory(source_dir, since_us, until_us)
