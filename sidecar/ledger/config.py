"""The policy's ``ledger:`` section (decoded strictly, like the rest of the policy)."""
from __future__ import annotations

from typing import Literal, Optional

import msgspec


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    # where usage events go: JSON Lines files under `dir`, or PostgreSQL (`dsn`/`dsn_file`)
    sink: Literal["file", "postgres", "none"] = "file"
    dir: str = "kt-state/events"
    rotate_mb: float = 64.0  # a file sink's current file is rotated past this size
    retention_days: float = 90.0  # rotated files older than this are deleted
    fsync: bool = True  # fsync every batch (the writer thread's, never the event loop's)
    # libpq connection string; a password is better kept in `dsn_file` (read at start)
    dsn: Optional[str] = None
    dsn_file: Optional[str] = None
    # where events wait while the sink is failing (default: `dir`/spill-<pid>.jsonl; the
    # spill files of processes that are gone are adopted and replayed at start)
    spill_file: Optional[str] = None
    # the most the spill file holds (and, apart, the dead-letter file); past it events
    # are lost, counted (kt_ledger_events_total{state="lost"}) and /readyz fails
    spill_max_mb: float = 1024.0
    # events a sink refuses, one by one with the reason (default: `dir`/dead-letter.jsonl)
    dead_letter_file: Optional[str] = None
    buffer_events: int = 100_000  # in memory between the event loop and the writer thread
    batch_events: int = 5_000  # written per batch (one COPY / one file append)
    flush_interval_s: float = 0.2  # the writer wakes at least this often
    retry_interval_s: float = 2.0  # a failing sink is retried this often
    # the longest the writer waits for one sink call (a hung server included); then the
    # batch spills. buffer_events must hold this long of events at the peak rate
    sink_timeout_s: float = 5.0
    # fractions of a budget whose crossing is recorded once per tenant and period
    thresholds: list[float] = msgspec.field(default_factory=lambda: [0.5, 0.8, 1.0])
    instance: Optional[str] = None  # this sidecar's name in events (default host-pid-random)


def check(cfg: LedgerConfig) -> Optional[tuple[str, str]]:
    """(field path, what is wrong) for the first meaning error, or None."""
    if cfg.sink == "postgres" and not (cfg.dsn or cfg.dsn_file):
        return "$.ledger", "sink postgres needs `dsn` or `dsn_file`"
    if not 0 < cfg.rotate_mb < 1e6:
        return "$.ledger.rotate_mb", "must be > 0"
    if not 0 < cfg.retention_days < 1e5:
        return "$.ledger.retention_days", "must be > 0"
    if not 1 <= cfg.buffer_events <= 10_000_000:
        return "$.ledger.buffer_events", "must be in 1..10000000"
    if not 1 <= cfg.batch_events <= 100_000:
        return "$.ledger.batch_events", "must be in 1..100000"
    if not 0 < cfg.flush_interval_s <= 60 or not 0 < cfg.retry_interval_s <= 3600:
        return "$.ledger", "flush_interval_s and retry_interval_s must be > 0"
    if not 0 < cfg.sink_timeout_s <= 600:
        return "$.ledger.sink_timeout_s", "must be in (0, 600]"
    if not 1 <= cfg.spill_max_mb <= 1e7:
        return "$.ledger.spill_max_mb", "must be in 1..10000000"
    for f in cfg.thresholds:
        if not 0 < f <= 10:
            return "$.ledger.thresholds", f"fractions must be in (0, 10], got {f}"
    return None
