"""Token-rate anomalies: a tenant using tokens far faster than its own usual rate.

The abuse case of a leaked key or a runaway agent: a tenant that usually spends 2,000
tokens a minute suddenly spends 40,000. Budgets stop it eventually; this says so within
minutes, and the policy may refuse or downgrade the tenant's requests meanwhile
(`anomaly:` in the policy, docs/policy.md).

Per tenant, two exponentially weighted rates of settled tokens per minute, folded once a
minute (nothing per request but an addition): a short one (`short_minutes`, what the
tenant does now) and a baseline (`baseline_minutes`, what it usually does). A tenant is
flagged while its short rate is at least `factor` times its baseline and at least
`min_tokens_per_minute`, once it has `warmup_minutes` of history; a flag clears when
the short rate falls back under the factor. The baseline is a handful of numbers per
tenant, never a series per request; tenants are bounded (least recently seen dropped).
Each sidecar sees its own share of a tenant's traffic: behind a balancer that share is
the same before and during a spike, so the ratio holds on every replica.

Every change of a flag, on or off, goes to the watch's ``listener`` (the settlement
service's: the log, the metrics and the ledger's event). A tenant that stops sending is
judged again by ``sweep`` (the server calls it every few seconds), so its flag clears
within a minute of its last settlement even when no request of its follows."""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from sidecar.policy import schema


@dataclass(frozen=True)
class AnomalySettings:
    factor: float = 20.0
    min_tokens_per_minute: float = 10_000.0
    short_minutes: float = 5.0
    baseline_minutes: float = 1440.0
    warmup_minutes: int = 60
    max_tenants: int = 100_000


@dataclass(frozen=True)
class Anomaly:
    """A tenant's flag starting (``flagged``) or clearing."""

    tenant: str
    tokens_per_minute: float  # the short rate when it was judged
    baseline_per_minute: float
    flagged: bool = True


class _Tenant:
    __slots__ = ("minute", "count", "last", "short", "baseline", "minutes", "flagged")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.count = 0.0
        self.last = 0.0  # the last finished minute's count
        self.short = 0.0
        self.baseline = 0.0
        self.minutes = 0
        self.flagged = False


class TokenRateWatch:
    def __init__(self, settings: AnomalySettings = AnomalySettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._short_keep = math.exp(-1.0 / settings.short_minutes)
        self._base_keep = math.exp(-1.0 / settings.baseline_minutes)
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._flagged: set[str] = set()  # the tenants flagged now, for sweep
        self.listener: Optional[Callable[[Anomaly], None]] = None

    def _fold(self, t: _Tenant, minute: int) -> None:
        """Fold the minutes from t.minute up to (not including) ``minute`` into the rates."""
        gap = minute - t.minute
        if gap <= 0:
            return
        # the finished minute, then gap-1 empty minutes (closed form: no loop over a
        # tenant idle for a week)
        t.short = t.short * self._short_keep + (1 - self._short_keep) * t.count
        t.baseline = t.baseline * self._base_keep + (1 - self._base_keep) * t.count
        if gap > 1:
            t.short *= self._short_keep ** (gap - 1)
            t.baseline *= self._base_keep ** (gap - 1)
        t.minutes += gap
        t.last = t.count if gap == 1 else 0.0
        t.minute, t.count = minute, 0.0

    def observe(self, tenant: str, tokens: int) -> Optional[Anomaly]:
        """Count settled tokens; an Anomaly when this tenant becomes flagged."""
        minute = int(self.clock() // 60)
        t = self._tenants.get(tenant)
        if t is None:
            if len(self._tenants) >= self.settings.max_tenants:
                gone, old = self._tenants.popitem(last=False)
                if old.flagged:  # forgotten: no longer flagged for the decisions either
                    self._change(Anomaly(gone, 0.0, 0.0, flagged=False))
            t = self._tenants[tenant] = _Tenant(minute)
        else:
            self._tenants.move_to_end(tenant)
            if minute != t.minute:
                self._fold(t, minute)
        t.count += tokens
        return self._judge(tenant, t)

    def _judge(self, tenant: str, t: _Tenant) -> Optional[Anomaly]:
        s = self.settings
        if t.minutes < s.warmup_minutes:
            return None
        short, baseline = self._corrected(t)
        # now: the short rate, or the last whole minute or this one so far if higher (the
        # short rate lags a spike by minutes; a flag must not flap at each minute's start)
        now = max(short, t.last, t.count)
        hot = now >= s.min_tokens_per_minute and now >= s.factor * baseline
        if hot == t.flagged:
            return None
        t.flagged = hot
        change = Anomaly(tenant, now, baseline, flagged=hot)
        self._change(change)
        return change if hot else None

    def _change(self, change: Anomaly) -> None:
        if change.flagged:
            self._flagged.add(change.tenant)
        else:
            self._flagged.discard(change.tenant)
        if self.listener is not None:
            self.listener(change)

    def _corrected(self, t: _Tenant) -> tuple[float, float]:
        """The rates without the bias of starting from zero: a weighted mean over the
        minutes seen (a tenant with an hour of history has an hour's baseline, not a
        fortieth of it)."""
        if t.minutes == 0:
            return 0.0, 0.0
        return (t.short / (1 - self._short_keep ** t.minutes),
                t.baseline / (1 - self._base_keep ** t.minutes))

    def flagged(self, tenant: str) -> bool:
        """Whether the tenant is flagged now (a quiet minute since its last settlement
        is folded first, so a flag does not outlive the spike by more than a minute)."""
        t = self._tenants.get(tenant)
        if t is None or not t.flagged:
            return False
        minute = int(self.clock() // 60)
        if minute != t.minute:
            self._fold(t, minute)
            self._judge(tenant, t)
        return t.flagged

    def end_all(self) -> None:
        """End every flag (this watch is being replaced: a reload changed its settings or
        turned it off; the next one judges afresh)."""
        for tenant in list(self._flagged):
            t = self._tenants[tenant]
            t.flagged = False
            short, baseline = self._corrected(t)
            self._change(Anomaly(tenant, short, baseline, flagged=False))

    def sweep(self) -> None:
        """Judge again every flagged tenant whose minute is over (``flagged`` does)."""
        for tenant in list(self._flagged):
            self.flagged(tenant)

    def rates(self, tenant: str) -> Optional[tuple[float, float]]:
        """(short rate, baseline) in tokens per minute, for status and tests."""
        t = self._tenants.get(tenant)
        return None if t is None else self._corrected(t)


def settings_of(policy: schema.Anomaly) -> AnomalySettings:
    return AnomalySettings(factor=policy.factor,
                           min_tokens_per_minute=policy.min_tokens_per_minute,
                           baseline_minutes=policy.baseline_minutes,
                           warmup_minutes=policy.warmup_minutes)


def watch_for(policy: schema.Anomaly,
              current: Optional[TokenRateWatch] = None) -> Optional[TokenRateWatch]:
    """The watch a policy asks for: None when turned off; ``current`` kept (with what it
    learned) when its settings did not change."""
    if not policy.enabled:
        return None
    settings = settings_of(policy)
    if current is not None and current.settings == settings:
        return current
    return TokenRateWatch(settings)
