"""`kt capacity estimate`: from a day's traffic to what the providers, the event store and
the sidecar must hold at the peak (docs/providers.md, "Sizing").

Pure arithmetic on the figures given, the providers' limits from a policy (or given on
the command line) and the bench result `kt plan` reads (sidecar/plan.py): no guesses of
a provider's limits. Units: a peak minute is the average minute times the peak
multiplier; RPM and TPM needs are rounded up to whole requests and tokens; an event is
2 KB (2,000 bytes) as the capacity guide counts it; MB and GB are 10^6 and 10^9 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

MINUTES_PER_DAY = 1440
EVENT_BYTES = 2000  # the guide's 2 KB per usage event
RETENTION_DAYS = (30, 90)


class CapacityError(ValueError):
    """Figures that cannot be sized; the message says which."""


@dataclass(frozen=True)
class ProviderLimit:
    id: str
    rpm: int  # 0: no request limit
    tpm: int  # 0: no token limit


@dataclass(frozen=True)
class ProviderFit:
    """One provider (or the pool of them) against the peak minute."""

    id: str
    rpm: int
    tpm: int
    rpm_use: float  # share of the limit the peak takes (0 without a limit)
    tpm_use: float
    providers_needed: int  # like this one, to carry the peak alone
    rpm_short: int  # requests per minute the peak needs beyond the limit (0: fits)
    tpm_short: int

    @property
    def fits(self) -> bool:
        return self.rpm_short == 0 and self.tpm_short == 0


@dataclass(frozen=True)
class Capacity:
    requests_per_day: int
    avg_input_tokens: int
    avg_output_tokens: int
    peak_multiplier: float
    model: str
    tokens_per_request: int
    tokens_per_day: int
    avg_requests_per_minute: float
    avg_tokens_per_minute: float
    peak_requests_per_minute: float
    peak_tokens_per_minute: float
    rpm_needed: int
    tpm_needed: int
    peak_requests_per_second: float
    event_bytes_per_day: int
    event_bytes_retained: dict[int, int]
    providers: list[ProviderFit] = field(default_factory=list)
    pool: Optional[ProviderFit] = None
    cores: str = ""  # kt plan's answer for the peak rate, or why there is none

    def text(self) -> str:
        out = [
            f"Traffic: {self.requests_per_day:,} requests/day, {self.avg_input_tokens:,} input + "
            f"{self.avg_output_tokens:,} output tokens each ({self.tokens_per_request:,}), "
            f"peak x{self.peak_multiplier:g}" + (f", model {self.model}" if self.model else ""),
            f"  tokens per day:  {self.tokens_per_day:,}",
            f"  average minute:  {self.avg_requests_per_minute:,.2f} requests, "
            f"{self.avg_tokens_per_minute:,.0f} tokens",
            f"  peak minute:     {self.peak_requests_per_minute:,.2f} requests, "
            f"{self.peak_tokens_per_minute:,.0f} tokens -> needs RPM {self.rpm_needed:,}, "
            f"TPM {self.tpm_needed:,} ({self.peak_requests_per_second:,.2f} requests/s)",
        ]
        if self.providers:
            out.append("Providers (limits from the policy or --provider):")
            for fit in self.providers + ([self.pool] if self.pool is not None
                                         and len(self.providers) > 1 else []):
                out.append("  " + _fit_line(fit, self.rpm_needed, self.tpm_needed))
            pool = self.pool
            if pool is not None and not pool.fits:
                biggest = max(self.providers, key=lambda f: (f.tpm or 0, f.rpm or 0))
                out.append(
                    f"  the peak needs {_more(pool)}: {biggest.providers_needed} providers like "
                    f"{biggest.id} to carry it alone, or these limits raised by "
                    + " and ".join(x for x in (
                        f"{pool.rpm_short:,} RPM (x{self.rpm_needed / pool.rpm:.2f})"
                        if pool.rpm_short else "",
                        f"{pool.tpm_short:,} TPM (x{self.tpm_needed / pool.tpm:.2f})"
                        if pool.tpm_short else "") if x))
            elif pool is not None:
                out.append("  the providers together carry the peak")
        else:
            out.append("Providers: none given (--config with providers, or --provider "
                       "ID=RPM:TPM)")
        mb = self.event_bytes_per_day / 1e6
        kept = ", ".join(f"{days} days {b / 1e9:,.2f} GB"
                         for days, b in self.event_bytes_retained.items())
        out.append(f"Event storage at 2 KB per request: {mb:,.1f} MB per day; {kept}")
        out.append(f"Sidecar and Redis at the peak ({self.peak_requests_per_second:,.2f} "
                   f"requests/s): " + self.cores)
        return "\n".join(out)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def _fit_line(f: ProviderFit, rpm_needed: int, tpm_needed: int) -> str:
    parts = []
    if f.rpm:
        parts.append(f"RPM {rpm_needed:,} of {f.rpm:,} ({_pct(f.rpm_use)}, headroom "
                     f"{_pct(1 - f.rpm_use)})")
    if f.tpm:
        parts.append(f"TPM {tpm_needed:,} of {f.tpm:,} ({_pct(f.tpm_use)}, headroom "
                     f"{_pct(1 - f.tpm_use)})")
    if not parts:
        parts.append("no limits")
    verdict = "fits" if f.fits else f"SHORT: {_more(f)} ({f.providers_needed} like it)"
    return f"{f.id:<20} " + "; ".join(parts) + f"  {verdict}"


def _more(f: ProviderFit) -> str:
    return " and ".join(x for x in (f"{f.rpm_short:,} RPM more" if f.rpm_short else "",
                                    f"{f.tpm_short:,} TPM more" if f.tpm_short else "") if x)


def _fit(pid: str, rpm: int, tpm: int, rpm_needed: int, tpm_needed: int) -> ProviderFit:
    need = [math.ceil(n / lim) for n, lim in ((rpm_needed, rpm), (tpm_needed, tpm)) if lim]
    return ProviderFit(
        id=pid, rpm=rpm, tpm=tpm,
        rpm_use=rpm_needed / rpm if rpm else 0.0, tpm_use=tpm_needed / tpm if tpm else 0.0,
        providers_needed=max(need + [1]),
        rpm_short=max(0, rpm_needed - rpm) if rpm else 0,
        tpm_short=max(0, tpm_needed - tpm) if tpm else 0)


def estimate(requests_per_day: int, avg_input_tokens: int, avg_output_tokens: int,
             peak_multiplier: float, providers: list[ProviderLimit], model: str = "",
             cores: str = "") -> Capacity:
    if requests_per_day <= 0:
        raise CapacityError("--requests-per-day must be > 0")
    if avg_input_tokens < 0 or avg_output_tokens < 0 or avg_input_tokens + avg_output_tokens <= 0:
        raise CapacityError("--avg-input-tokens and --avg-output-tokens must be >= 0, "
                            "and not both 0")
    if not (math.isfinite(peak_multiplier) and peak_multiplier >= 1):
        raise CapacityError("--peak-multiplier must be a number >= 1 (the peak minute over "
                            "the average one)")
    per_request = avg_input_tokens + avg_output_tokens
    per_day = requests_per_day * per_request
    avg_rpm = requests_per_day / MINUTES_PER_DAY
    avg_tpm = per_day / MINUTES_PER_DAY
    peak_rpm = avg_rpm * peak_multiplier
    peak_tpm = avg_tpm * peak_multiplier
    # whole requests and tokens, from exact fractions (a float product can land a hair
    # above an integer and round up one too many)
    rpm_needed = -(-round(requests_per_day * peak_multiplier * 1000) // (MINUTES_PER_DAY * 1000))
    tpm_needed = -(-round(per_day * peak_multiplier * 1000) // (MINUTES_PER_DAY * 1000))
    fits = [_fit(p.id, p.rpm, p.tpm, rpm_needed, tpm_needed) for p in providers]
    pool = None
    if providers:
        rpm = 0 if any(p.rpm == 0 for p in providers) else sum(p.rpm for p in providers)
        tpm = 0 if any(p.tpm == 0 for p in providers) else sum(p.tpm for p in providers)
        pool = _fit("all together", rpm, tpm, rpm_needed, tpm_needed)
    event_day = requests_per_day * EVENT_BYTES
    return Capacity(
        requests_per_day=requests_per_day, avg_input_tokens=avg_input_tokens,
        avg_output_tokens=avg_output_tokens, peak_multiplier=peak_multiplier, model=model,
        tokens_per_request=per_request, tokens_per_day=per_day,
        avg_requests_per_minute=avg_rpm, avg_tokens_per_minute=avg_tpm,
        peak_requests_per_minute=peak_rpm, peak_tokens_per_minute=peak_tpm,
        rpm_needed=rpm_needed, tpm_needed=tpm_needed, peak_requests_per_second=peak_rpm / 60,
        event_bytes_per_day=event_day,
        event_bytes_retained={d: event_day * d for d in RETENTION_DAYS},
        providers=fits, pool=pool, cores=cores)


def parse_provider(spec: str) -> ProviderLimit:
    """`ID=RPM:TPM` (either may be 0: no such limit)."""
    pid, eq, limits = spec.partition("=")
    rpm_text, colon, tpm_text = limits.partition(":")
    if not (pid and eq and colon and rpm_text.isdigit() and tpm_text.isdigit()):
        raise CapacityError(f"--provider {spec!r}: expected an id from --config, or "
                            "ID=RPM:TPM (e.g. openai=5000:800000)")
    return ProviderLimit(pid, int(rpm_text), int(tpm_text))


def providers_from_policy(policy, model: str, ids: list[str]) -> list[ProviderLimit]:
    """The providers of a compiled policy: those named, else every one serving ``model``
    (else every one)."""
    plan = policy.providers
    if plan is None:
        raise CapacityError(f"{policy.source}: no `providers:` section to read limits from")
    chosen = []
    for pid in ids:
        rule = plan.by_id.get(pid)
        if rule is None:
            raise CapacityError(f"--provider {pid!r}: no such provider in {policy.source} "
                                f"(its providers: {', '.join(plan.by_id)})")
        chosen.append(rule)
    if not chosen:
        chosen = [p for p in plan.providers if not model or model in p.models]
        if not chosen:
            raise CapacityError(f"no provider in {policy.source} serves model {model!r}")
    # the minute limits as configured (the buckets hold `burst` of them: a peak minute is
    # a minute's worth, refilled continuously)
    return [ProviderLimit(p.id, p.quota.rpm, p.quota.tpm) for p in chosen]
