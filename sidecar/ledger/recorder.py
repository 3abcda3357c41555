"""What the decision service calls to record spend. Runs on the event loop: every
method is a few dict operations and a deque append (EventLog.emit), never I/O.

- ``closed(...)``: one UsageEvent per reservation closed (settled, released, kept,
  expired) or usage charged without one;
- ``refused(tenant, reason)``: counted per tenant, reason and minute; a minute's
  counts become RefusalsEvents once it is over (``tick``) or at shutdown;
- ``budget_seen(...)``: a ThresholdEvent (and the metric) the first time in a period
  a tenant's spend reaches each configured fraction of its budget;
- ``token_rate(...)``: an AnomalyEvent when a tenant's token-rate flag starts or clears.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence

from sidecar.ledger.config import LedgerConfig
from sidecar.ledger.deadletter import DeadLetterFile
from sidecar.ledger.events import (AdminEvent, AnomalyEvent, RefusalsEvent, ThresholdEvent,
                                   UsageEvent)
from sidecar.ledger.sinks import FileSink, Sink, SpillFile
from sidecar.ledger.writer import EventLog
from sidecar.upstream_sli import NOT_KNOWN
from sidecar.upstream_sli import current as current_upstream

log = logging.getLogger("kt.ledger")
MINUTE_US = 60_000_000
# distinct (tenant, reason) pairs counted per minute; beyond it (a flood of invented
# tenant names) they are counted under one name, so memory stays bounded
REFUSAL_KEYS_MAX = 10_000
OVERFLOW_TENANT = "_many_tenants"
# tenants whose threshold progress is remembered (oldest forgotten first: at worst a
# crossing is recorded again, which the PostgreSQL key folds into one row)
THRESHOLD_TENANTS_MAX = 100_000


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Ledger:
    def __init__(self, events: Optional[EventLog], instance: str = "",
                 thresholds: Sequence[float] = (0.5, 0.8, 1.0),
                 clock_us: Callable[[], int] = wall_clock_us) -> None:
        self.events = events
        self.instance = instance or default_instance()
        self.thresholds = tuple(sorted(set(thresholds)))
        self.clock_us = clock_us
        self._minute = -1
        self._refusals: dict[tuple[str, str], int] = {}
        # tenant -> (period start, how many of self.thresholds were crossed)
        self._crossed: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.crossings: dict[tuple[str, float], int] = {}  # (tenant label, fraction) -> count
        # another sink of each usage event: the request's span (sidecar/tracing.py), with
        # the tenant's budget left after it (None: not known); None: no traces
        self.spans: Optional[Callable[[UsageEvent, Optional[int]], None]] = None

    # --- usage --------------------------------------------------------------
    def closed(self, *, request_id: str, tenant: str, outcome: str, settled_by: str,
               decided_us: int = 0, model_asked: str = "", model_served: str = "",
               tier: str = "", provider: str = "", decision: str = "", estimate_tokens: int = 0,
               input_tokens: int = 0, output_tokens: int = 0, cached_tokens: int = 0,
               cache_write_tokens: int = 0, cost_nano_usd: int = 0, budget_unit: str = "",
               budget_charge: int = 0, unpriced: bool = False, settled_us: int = 0,
               user: str = "", tags: tuple[str, ...] = (),
               budget_left: Optional[int] = None) -> None:
        """``settled_us``: when the backend applied it, on the clock that dated the
        durable spend (0: this recorder's clock, now). The provider's answer (status,
        timings, endpoint) comes from sidecar/upstream_sli.py's context variable.
        ``budget_left``: the tenant's budget after it, for the request's span only."""
        if self.events is None and self.spans is None:
            return
        # the provider's answer, when a transport is closing this request's reservation
        closing = current_upstream.get()
        up = closing[1] if closing is not None and closing[0] == request_id else NOT_KNOWN
        event = UsageEvent(
            request_id=request_id, tenant=tenant, outcome=outcome,  # type: ignore[arg-type]
            settled_by=settled_by, decided_us=decided_us,
            settled_us=settled_us or self.clock_us(),
            model_asked=model_asked, model_served=model_served, tier=tier, provider=provider,
            decision=decision, estimate_tokens=estimate_tokens, input_tokens=input_tokens,
            output_tokens=output_tokens, cached_tokens=cached_tokens,
            cache_write_tokens=cache_write_tokens, cost_nano_usd=cost_nano_usd,
            budget_unit=budget_unit, budget_charge=budget_charge, unpriced=unpriced,
            instance=self.instance, status=up.status, upstream_us=up.upstream_us,
            ttft_us=up.ttft_us, endpoint=up.endpoint, user=user, tags=tags)
        if self.events is not None:
            self.events.emit(event)
        if self.spans is not None:
            self.spans(event, budget_left)

    # --- the management API's changes ------------------------------------------
    def admin_change(self, *, who: str, action: str, holder: str, before: str, after: str,
                     version: int) -> None:
        """An audit event: a change made through the management API."""
        if self.events is None:
            return
        self.events.emit(AdminEvent(at_us=self.clock_us(), who=who, action=action,
                                    holder=holder, before=before, after=after,
                                    version=version, instance=self.instance))

    # --- refusals -----------------------------------------------------------
    def refused(self, tenant: str, reason: str, now_us: Optional[int] = None) -> None:
        if self.events is None:
            return
        now = self.clock_us() if now_us is None else now_us
        minute = now - now % MINUTE_US
        if minute != self._minute:
            self.tick(now)
            self._minute = minute
        key = (tenant, reason)
        counts = self._refusals
        if key not in counts and len(counts) >= REFUSAL_KEYS_MAX:
            key = (OVERFLOW_TENANT, reason)
        counts[key] = counts.get(key, 0) + 1

    def tick(self, now_us: Optional[int] = None, everything: bool = False) -> int:
        """Emit the counts of a minute that is over (or of the current one, ``everything``,
        at shutdown). Called by ``refused`` when the minute changes and by a timer."""
        if self.events is None or not self._refusals:
            return 0
        now = self.clock_us() if now_us is None else now_us
        if not everything and now - now % MINUTE_US == self._minute:
            return 0
        counts, self._refusals = self._refusals, {}
        for (tenant, reason), n in counts.items():
            self.events.emit(RefusalsEvent(minute_us=self._minute, tenant=tenant, reason=reason,
                                           count=n, instance=self.instance))
        return len(counts)

    # --- budget thresholds ----------------------------------------------------
    def budget_seen(self, tenant: str, label: str, unit: str, budget: int, spent: int,
                    period_start_us: int) -> int:
        """After a decision or settlement: record each threshold crossed for the first time
        this period. ``label`` is the tenant's metric label (bounded). Returns how many."""
        if not self.thresholds or budget < 0 or period_start_us < 0:
            return 0
        ps, done = self._crossed.get(tenant, (period_start_us, 0))
        if ps != period_start_us:
            if period_start_us < ps:
                return 0  # a late settlement of a closed period: its crossings are history
            done = 0
        n = done
        while n < len(self.thresholds) and spent >= self.thresholds[n] * budget:
            n += 1
        if n == done:
            if ps != period_start_us:
                self._remember(tenant, period_start_us, 0)
            return 0
        self._remember(tenant, period_start_us, n)
        now = self.clock_us()
        for fraction in self.thresholds[done:n]:
            key = (label, fraction)
            self.crossings[key] = self.crossings.get(key, 0) + 1
            log.info("tenant %s spent %d of %d %s this period: %.0f%% reached", tenant, spent,
                     budget, unit, fraction * 100)
            if self.events is not None:
                self.events.emit(ThresholdEvent(
                    tenant=tenant, period_start_us=period_start_us, fraction=fraction,
                    budget=budget, spent=spent, budget_unit=unit, at_us=now,
                    instance=self.instance))
        return n - done

    # --- token-rate anomalies -------------------------------------------------
    def token_rate(self, *, tenant: str, flagged: bool, tokens_per_minute: float,
                   baseline_per_minute: float, factor: float, action: str) -> None:
        """A tenant's token-rate flag started or cleared (sidecar/anomaly.py); the rates
        in whole tokens a minute."""
        if self.events is None:
            return
        self.events.emit(AnomalyEvent(
            tenant=tenant, flagged=flagged, at_us=self.clock_us(),
            tokens_per_minute=round(tokens_per_minute),
            baseline_per_minute=round(baseline_per_minute),
            factor=factor, action=action, instance=self.instance))

    def _remember(self, tenant: str, period_start_us: int, n: int) -> None:
        self._crossed[tenant] = (period_start_us, n)
        self._crossed.move_to_end(tenant)
        if len(self._crossed) > THRESHOLD_TENANTS_MAX:
            self._crossed.popitem(last=False)

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self.events is not None:
            self.events.start()

    def close(self) -> None:
        """Shutdown: the current minute's refusals too, then everything to the sink/spill."""
        self.tick(everything=True)
        if self.events is not None:
            self.events.close()

    def status(self) -> tuple[bool, str]:
        if self.events is None:
            return True, "ledger off"
        return self.events.status()


def build_ledger(cfg: Optional[LedgerConfig], sink: Optional[Sink] = None) -> Ledger:
    """The ledger a policy asks for (``ledger:``; absent: JSON Lines files under
    kt-state/events). ``sink`` overrides the configured one (tests)."""
    cfg = cfg or LedgerConfig()
    if cfg.sink == "none" and sink is None:
        return Ledger(None, cfg.instance or "", cfg.thresholds)
    if sink is None:
        if cfg.sink == "postgres":
            from sidecar.ledger.postgres import PostgresSink

            dsn = cfg.dsn or ""
            if cfg.dsn_file:
                dsn = Path(cfg.dsn_file).read_text().strip()
            sink = PostgresSink(dsn)
        else:
            sink = FileSink(cfg.dir, rotate_bytes=int(cfg.rotate_mb * (1 << 20)),
                            retention_s=cfg.retention_days * 86400, fsync=cfg.fsync)
    # one spill file per process (workers share the directory, never a spill file)
    limit = int(cfg.spill_max_mb * (1 << 20))
    spill = SpillFile(cfg.spill_file or str(Path(cfg.dir) / f"spill-{os.getpid()}.jsonl"),
                      max_bytes=limit)
    dead = DeadLetterFile(cfg.dead_letter_file or str(Path(cfg.dir) / "dead-letter.jsonl"),
                          max_bytes=limit)
    events = EventLog(sink, spill, buffer_events=cfg.buffer_events,
                      batch_events=cfg.batch_events, flush_interval_s=cfg.flush_interval_s,
                      retry_interval_s=cfg.retry_interval_s, sink_timeout_s=cfg.sink_timeout_s,
                      dead_letters=dead)
    return Ledger(events, cfg.instance or "", cfg.thresholds)
