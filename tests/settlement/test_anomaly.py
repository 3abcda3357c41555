"""Token-rate anomalies: a tenant far above its own usual rate is flagged within minutes,
a steady heavy tenant never is, and the flag clears when the spike ends."""
from __future__ import annotations

from sidecar.anomaly import AnomalySettings, TokenRateWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def run(watch: TokenRateWatch, clock: Clock, tenant: str, per_minute: int, minutes: int,
        requests_per_minute: int = 10) -> list:
    found = []
    for _ in range(minutes):
        for _ in range(requests_per_minute):
            a = watch.observe(tenant, per_minute // requests_per_minute)
            if a is not None:
                found.append(a)
            clock.now += 60 / requests_per_minute
    return found


def test_a_tenant_twenty_times_above_its_usual_rate_is_flagged_within_minutes():
    clock = Clock()
    watch = TokenRateWatch(AnomalySettings(), clock)
    assert run(watch, clock, "acme", 1_000, 180) == []  # three quiet hours
    assert not watch.flagged("acme")
    found = run(watch, clock, "acme", 40_000, 3)  # a leaked key: 40x
    assert [a.tenant for a in found] == ["acme"]
    assert found[0].tokens_per_minute >= 20 * found[0].baseline_per_minute
    assert 900 <= found[0].baseline_per_minute <= 1_100  # the usual rate, not the spike's
    assert watch.flagged("acme")
    # the spike ends: the flag clears within a few quiet minutes
    run(watch, clock, "acme", 1_000, 15)
    assert not watch.flagged("acme")


def test_below_the_floor_or_before_the_warmup_or_as_usual_nothing_is_flagged():
    clock = Clock()
    watch = TokenRateWatch(AnomalySettings(min_tokens_per_minute=10_000), clock)
    run(watch, clock, "tiny", 10, 120)
    assert run(watch, clock, "tiny", 5_000, 5) == []  # 500x, but 5,000 a minute
    # a brand-new tenant has no usual rate yet: its first hour is not judged
    assert run(watch, clock, "new", 100_000, 30) == []
    heavy = TokenRateWatch(AnomalySettings(), clock)
    assert run(heavy, clock, "heavy", 50_000, 180) == []  # heavy, but as usual
    assert not heavy.flagged("heavy")


def test_an_idle_week_costs_nothing_and_tenants_are_bounded():
    clock = Clock()
    watch = TokenRateWatch(AnomalySettings(max_tenants=3), clock)
    run(watch, clock, "a", 1_000, 90)
    clock.now += 7 * 86400
    watch.observe("a", 10)
    short, baseline = watch.rates("a")
    assert short < 1 and baseline < 1_000 * 0.01  # a week of silence, folded at once
    for t in ("b", "c", "d"):
        watch.observe(t, 1)
    assert watch.rates("a") is None and watch.rates("d") is not None  # oldest dropped
