"""Token-rate anomalies: a tenant far above its own usual rate is flagged within minutes,
a steady heavy tenant never is, and the flag clears when the spike ends; the settlement
feeds the watch and the decision acts on the policy's `anomaly.action`."""
from __future__ import annotations

import asyncio
import json

import pytest

from sidecar import contract
from sidecar.anomaly import Anomaly, AnomalySettings, TokenRateWatch
from sidecar.backends.memory import MemoryBackend
from sidecar.flows import Flows
from sidecar.ledger.events import AnomalyEvent
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.writer import EventLog
from sidecar.model import Kind, Request
from sidecar.policy.load import PolicyError, parse_policy
from tests.support.clock import ManualClock


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


def test_every_flag_start_and_end_reaches_the_listener_even_for_a_tenant_gone_quiet():
    clock = Clock()
    watch = TokenRateWatch(AnomalySettings(), clock)
    heard: list[Anomaly] = []
    watch.listener = heard.append
    run(watch, clock, "acme", 1_000, 90)
    run(watch, clock, "acme", 40_000, 2)  # flagged
    assert [(a.tenant, a.flagged) for a in heard] == [("acme", True)]
    # then nothing at all from acme: no settlement, no decision; the sweep ends its flag
    watch.sweep()
    assert len(heard) == 1  # the same minute: still the spike's
    clock.now += 6 * 60
    watch.sweep()
    assert [(a.tenant, a.flagged) for a in heard] == [("acme", True), ("acme", False)]
    assert heard[1].tokens_per_minute < heard[0].tokens_per_minute
    watch.sweep()
    assert len(heard) == 2  # once
    # a watch being replaced ends the flags it holds
    run(watch, clock, "acme", 200_000, 2)
    assert heard[-1].flagged and watch.flagged("acme")
    n = len(heard)
    watch.end_all()
    assert (heard[-1].tenant, heard[-1].flagged) == ("acme", False) and len(heard) == n + 1
    assert not watch.flagged("acme")
    watch.end_all()
    assert len(heard) == n + 1


# --- wired: the settlement feeds the watch, the decision acts on its flag ------------

WIRED = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]
tenants: {acme: {limits: {rpm: 1000}}}
anomaly: {action: %s, warmup_minutes: 10, min_tokens_per_minute: 1000}
"""


def test_a_flagged_tenant_is_downgraded_then_refused_as_the_policy_says():
    flows = Flows(parse_policy((WIRED % "downgrade").encode(), "<test>"),
                  MemoryBackend(clock=ManualClock()))
    clock = Clock()
    flows.settlement.anomalies.clock = clock
    body = json.dumps({"model": "gpt-4o", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def main():
        for n in range(15):  # a quarter of an hour at its usual 100 tokens a minute
            await flows.settlement.settle_usage(f"r{n}", "acme", "gpt-4o", 80, 20, "report")
            clock.now += 60
        first = await flows.decider.decide(Request(headers={"x-tenant-id": "acme"}, body=body))
        await flows.settlement.settle_usage("spike", "acme", "gpt-4o", 4000, 1000, "report")
        second = await flows.decider.decide(Request(headers={"x-tenant-id": "acme"}, body=body))
        flows.replace_policy(parse_policy((WIRED % "refuse").encode(), "<test>"))
        third = await flows.decider.decide(Request(headers={"x-tenant-id": "acme"}, body=body))
        return first, second, third

    first, second, third = asyncio.run(main())
    assert first.kind is Kind.ALLOW and not first.downgraded
    assert second.kind is Kind.DOWNGRADE or second.downgraded, second
    assert second.model == "gpt-4o-mini"
    # the reload kept what the watch learned (the same settings): still flagged, refused
    assert third.kind is Kind.DENY_RATE and third.reason == "token_rate_anomaly"
    ans = contract.answer(third)
    assert ans.status == 429 and ("retry-after", "60") in ans.response_headers
    reg = flows.metrics.registry
    assert reg.get_sample_value("kt_token_rate_anomalies_total", {"tenant": "acme"}) == 1
    assert reg.get_sample_value("kt_token_rate_refusals_total", {"action": "downgrade"}) == 1
    assert reg.get_sample_value("kt_token_rate_refusals_total", {"action": "refuse"}) == 1


def test_the_anomaly_settings_are_checked_and_can_be_turned_off():
    with pytest.raises(PolicyError, match="factor"):
        parse_policy((WIRED % "flag").replace("warmup_minutes: 10", "factor: 1").encode(),
                     "<test>")
    off = parse_policy((WIRED % "flag").replace("action: flag", "enabled: false").encode(),
                       "<test>")
    assert Flows(off, MemoryBackend()).decider.anomalies is None


def test_a_flag_and_its_end_are_events_in_the_ledger_and_a_gauge(tmp_path):
    events = EventLog(FileSink(tmp_path / "events", fsync=False),
                      SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    ledger = Ledger(events, instance="gw-1")
    ledger.start()
    flows = Flows(parse_policy((WIRED % "downgrade").encode(), "<test>"),
                  MemoryBackend(clock=ManualClock()), ledger=ledger)
    clock = Clock()
    flows.settlement.anomalies.clock = clock
    reg = flows.metrics.registry

    def flagged_gauge() -> float:
        return reg.get_sample_value("kt_token_rate_flagged_tenants", {"tenant": "acme"})

    async def settle(rid: str, tokens: int) -> None:
        await flows.settlement.settle_usage(rid, "acme", "gpt-4o", tokens, 0, "report")

    async def main():
        for n in range(15):  # its usual 100 tokens a minute
            await settle(f"r{n}", 100)
            clock.now += 60
        await settle("spike", 5000)
        assert flagged_gauge() == 1
        clock.now += 10 * 60  # quiet: the server's sweep ends the flag
        flows.sweep_anomalies()
        assert flagged_gauge() == 0
        await settle("spike-2", 50_000)  # flagged again
        assert flagged_gauge() == 1
        # a reload that turns the watch off ends the flag in the books too
        flows.replace_policy(parse_policy((WIRED % "flag").replace(
            "action: flag", "enabled: false").encode(), "<test>"))
        assert flagged_gauge() == 0

    try:
        asyncio.run(main())
        assert events.flush()
    finally:
        ledger.close()
    got = [e for e in read_events(event_files(tmp_path / "events"))
           if isinstance(e, AnomalyEvent)]
    assert [(e.tenant, e.flagged, e.action, e.factor, e.instance) for e in got] == [
        ("acme", True, "downgrade", 20.0, "gw-1"), ("acme", False, "downgrade", 20.0, "gw-1"),
        ("acme", True, "downgrade", 20.0, "gw-1"), ("acme", False, "flag", 20.0, "gw-1")]
    assert got[0].tokens_per_minute >= 5000 and 90 <= got[0].baseline_per_minute <= 110
    assert got[1].tokens_per_minute < 1000 and got[0].at_us <= got[1].at_us
    assert reg.get_sample_value("kt_token_rate_anomalies_total", {"tenant": "acme"}) == 2
