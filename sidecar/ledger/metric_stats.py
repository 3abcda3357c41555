"""``kt events stats --metric NAME``: the distribution of one number of the usage events
(count, p50, p95, p99, max) over a recent window, in all or per tenant, model or provider,
from a file sink's directory or from PostgreSQL (its rows read back as the same events:
one computation, the same numbers from either).
What `kt capacity estimate` asks for (average tokens a request, the peak minute) read back
from what the sidecar recorded.

Percentiles are nearest-rank (the smallest recorded value with at least that share of the
values at or below it): always a value that was seen, exact whatever the count.
Each event key counts once, as in ``kt events stats`` (a replayed spill can hold a line
twice)."""
from __future__ import annotations

import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from sidecar.ledger.events import Event, UsageEvent
from sidecar.ledger.postgres import connect, ts, us_of
from sidecar.ledger.sinks import event_files, read_events
from sidecar.ledger.stats import printable

MINUTE_US = 60_000_000
QUANTILES = (0.5, 0.95, 0.99)
GROUPS = ("tenant", "model", "provider")


def _charged(value: Callable[[UsageEvent], float]) -> Callable[[UsageEvent], Optional[float]]:
    """A number of the events that charged something: a released reservation (the
    provider failed, the estimate given back) has no tokens and would pull every
    percentile toward 0."""
    return lambda e: None if e.outcome == "released" else value(e)


def _ok_reply(us: Callable[[UsageEvent], int]) -> Callable[[UsageEvent], Optional[float]]:
    """A time of a 2xx reply that was measured (0: not known), in seconds."""
    def value(e: UsageEvent) -> Optional[float]:
        t = us(e)
        return t / 1e6 if t > 0 and 200 <= e.status < 300 else None
    return value


def _tokens_per_second(e: UsageEvent) -> Optional[float]:
    """A streamed 2xx reply's output tokens over the time from its first byte to its
    last, as kt_upstream_output_tokens_per_second (a buffered reply has no such time)."""
    generating = e.upstream_us - e.ttft_us
    if (e.settled_by.endswith("_sse") and 200 <= e.status < 300 and e.ttft_us > 0
            and generating > 0 and e.output_tokens > 0):
        return e.output_tokens * 1e6 / generating
    return None


# one number per event (None: the event does not have it)
PER_EVENT: dict[str, Callable[[UsageEvent], Optional[float]]] = {
    "input_tokens": _charged(lambda e: e.input_tokens),
    "output_tokens": _charged(lambda e: e.output_tokens),
    "total_tokens": _charged(lambda e: e.input_tokens + e.output_tokens),
    "cached_tokens": _charged(lambda e: e.cached_tokens),
    "estimate_tokens": lambda e: e.estimate_tokens or None,
    "cost_usd": _charged(lambda e: e.cost_nano_usd / 1e9),
    "upstream_latency_seconds": _ok_reply(lambda e: e.upstream_us),
    "ttft_seconds": _ok_reply(lambda e: e.ttft_us),
    "output_tokens_per_second": _tokens_per_second,
}
# one number per UTC minute, from the group's first event's minute to its last (a minute
# without events counts 0)
PER_MINUTE: dict[str, Callable[[UsageEvent], int]] = {
    "requests_per_minute": lambda e: 1,
    "tokens_per_minute": lambda e: (0 if e.outcome == "released"
                                    else e.input_tokens + e.output_tokens),
}
METRICS = (*PER_EVENT, *PER_MINUTE)
# names a reader may try that are not in the events, with where to read them instead
NOT_EVENTS = {
    "queue_depth": "a live gauge, not in the events: kt_request_queue_depth on /metrics, "
                   "or kt status",
}


class MetricError(ValueError):
    """A metric name the events do not have; the message is one line for the user."""


def check_metric(name: str) -> None:
    if name in NOT_EVENTS:
        raise MetricError(f"--metric {name}: {NOT_EVENTS[name]}")
    if name not in METRICS:
        raise MetricError(f"--metric '{printable(name)}' is not a metric of the usage events; "
                          f"one of: {', '.join(METRICS)}")


def quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Summary:
    metric: str
    group: str  # "" when not grouped
    count: int
    p50: Optional[float]
    p95: Optional[float]
    p99: Optional[float]
    max: Optional[float]

    @classmethod
    def of(cls, metric: str, group: str, values: Iterable[float]) -> "Summary":
        ordered = sorted(values)
        if not ordered:
            return cls(metric, group, 0, None, None, None, None)
        p50, p95, p99 = (quantile(ordered, q) for q in QUANTILES)
        return cls(metric, group, len(ordered), p50, p95, p99, ordered[-1])


@dataclass
class MetricStats:
    since_us: int
    until_us: int
    by: str  # "" or one of GROUPS
    rows: list[Summary] = field(default_factory=list)
    skipped_lines: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"since_us": self.since_us, "until_us": self.until_us, "by": self.by or None,
                "metrics": [{"metric": r.metric, **({self.by: r.group} if self.by else {}),
                             "count": r.count, "p50": r.p50, "p95": r.p95, "p99": r.p99,
                             "max": r.max} for r in self.rows]}

    def text(self) -> str:
        head = f"{'metric':<26} " + (f"{self.by:<20} " if self.by else "")
        out = [head + f"{'count':>9} {'p50':>12} {'p95':>12} {'p99':>12} {'max':>12}"]
        for r in self.rows:
            cells = " ".join(f"{_number(v):>12}" for v in (r.p50, r.p95, r.p99, r.max))
            group = f"{printable(r.group or '-'):<20} " if self.by else ""
            out.append(f"{r.metric:<26} {group}{r.count:>9} {cells}")
        if self.skipped_lines:
            out.append(f"\n({len(self.skipped_lines)} unreadable lines skipped, first: "
                       f"{printable(self.skipped_lines[0])})")
        return "\n".join(out) + "\n"


def _number(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}"


def _group(e: UsageEvent, by: str) -> str:
    if by == "tenant":
        return e.tenant
    if by == "model":
        return e.model_served
    if by == "provider":
        return e.provider
    return ""


def from_events(events: Iterable[Event], since_us: int, until_us: int,
                metrics: list[str], by: str = "", unique: bool = False) -> MetricStats:
    """The summaries of ``metrics`` over the usage events settled in [since_us, until_us),
    one row per metric (and group, with ``by``), in the order asked, groups sorted.
    ``unique``: the events are known to be distinct (PostgreSQL's primary key), so their
    keys need not be kept to count each once."""
    for m in metrics:
        check_metric(m)
    if by and by not in GROUPS:
        raise MetricError(f"--by '{printable(by)}': one of {', '.join(GROUPS)}")
    per_event = {m: PER_EVENT[m] for m in metrics if m in PER_EVENT}
    per_minute = {m: PER_MINUTE[m] for m in metrics if m in PER_MINUTE}
    values: dict[tuple[str, str], array] = {}
    minutes: dict[tuple[str, str], Counter] = {}
    groups: set[str] = set()
    seen: set[tuple[str, str, str]] = set()
    for e in events:
        if not isinstance(e, UsageEvent) or not since_us <= e.settled_us < until_us:
            continue
        if not unique:
            if e.key in seen:
                continue
            seen.add(e.key)
        g = _group(e, by)
        groups.add(g)
        for m, read in per_event.items():
            v = read(e)
            if v is not None:
                values.setdefault((m, g), array("d")).append(v)
        minute = e.settled_us // MINUTE_US
        for m, read in per_minute.items():
            minutes.setdefault((m, g), Counter())[minute] += read(e)
    st = MetricStats(since_us, until_us, by)
    for m in metrics:
        for g in sorted(groups) or [""]:
            if m in per_minute:
                counts = minutes.get((m, g), Counter())
                series = ([counts.get(t, 0) for t in range(min(counts), max(counts) + 1)]
                          if counts else [])
                st.rows.append(Summary.of(m, g, series))
            else:
                st.rows.append(Summary.of(m, g, values.get((m, g), ())))
    return st


def from_directory(directory: str, since_us: int, until_us: int, metrics: list[str],
                   by: str = "") -> MetricStats:
    """The same from a file sink's directory; unreadable lines are skipped and named."""
    bad: list[str] = []
    st = from_events(read_events(event_files(directory), bad), since_us, until_us, metrics, by)
    st.skipped_lines = bad
    return st


def _rows_as_events(rows: Iterable[tuple]) -> Iterable[UsageEvent]:
    """kt_usage_events rows (the columns _SELECT names) as the events they were written
    from, with the fields the metrics read (the times back in µs: NULL is 0, not known)."""
    for (tenant, request_id, outcome, settled_by, settled_at, model_served, provider,
         estimate, inp, out, cached, nano, status, upstream_ms, ttft_ms) in rows:
        yield UsageEvent(request_id=request_id, tenant=tenant, outcome=outcome,
                         settled_by=settled_by, settled_us=us_of(settled_at),
                         model_served=model_served, provider=provider,
                         estimate_tokens=estimate, input_tokens=inp, output_tokens=out,
                         cached_tokens=cached, cost_nano_usd=nano, status=status or 0,
                         upstream_us=round(upstream_ms * 1000) if upstream_ms else 0,
                         ttft_us=round(ttft_ms * 1000) if ttft_ms else 0)


_SELECT = ("SELECT tenant, request_id, outcome, settled_by, settled_at, model_served, "
           "provider, estimate_tokens, input_tokens, output_tokens, cached_tokens, "
           "cost_nano_usd, status, upstream_ms, ttft_ms FROM kt_usage_events "
           "WHERE settled_at >= %s AND settled_at < %s")


def from_postgres(dsn: str, since_us: int, until_us: int, metrics: list[str], by: str = "",
                  conn=None) -> MetricStats:
    """The same from PostgreSQL's kt_usage_events (streamed: a server-side cursor)."""
    for m in metrics:
        check_metric(m)
    own = conn is None
    conn = conn or connect(dsn)
    try:
        with conn.transaction():
            with conn.cursor(name="kt_metric_stats") as cur:
                cur.itersize = 10_000
                cur.execute(_SELECT, (ts(since_us), ts(until_us)))
                return from_events(_rows_as_events(cur), since_us, until_us, metrics, by,
                                   unique=True)
    finally:
        if own:
            conn.close()
