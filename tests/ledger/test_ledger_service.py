"""The ledger wired to the decision service (in process, embedded backend, fake clock):
one event per closed reservation (settled, released, kept, expired, charged without a
reservation), whose budget charges add up to exactly what the budget holds; cache
pricing in the budget; refusals aggregated; thresholds once; and the sidecar's
metrics and readiness detail."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.writer import EventLog
from sidecar.model import Kind, Request
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_CACHE_PRICING

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_CACHE_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 10000000}
  budget: {tokens: 1000000, period: day}
tenants:
  acme:
    limits: {rpm: 8, tpm: 10000000}
    budget: {usd: 1, period: month, low_water: 0.1}
"""


@pytest.fixture
def ledgered(tmp_path):
    events = EventLog(FileSink(tmp_path / "events", fsync=False),
                      SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    led = Ledger(events, instance="test-1", thresholds=(0.5, 1.0))
    with RunningSidecar(POLICY, ledger=led) as sc:
        yield sc, led, tmp_path / "events"


def decide(sc, tenant: str, request_id: str, model: str = "gpt-4o", max_tokens: int = 1000):
    body = json.dumps({"model": model, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "x" * 396}]}).encode()
    req = Request(headers={"x-tenant-id": tenant}, body=body, request_id=request_id)
    return sc.run(sc.sidecar.service.decide(req))


def events_of(sc, led, directory):
    assert led.events is not None and led.events.flush()
    return list(read_events(event_files(directory)))


def test_each_closed_reservation_is_one_event_and_they_add_up_to_the_budget(ledgered):
    sc, led, directory = ledgered
    svc = sc.sidecar.service
    rid = {"e": "e"}  # the reservation ids the sidecar made (e: a reporter's own id)
    for name in ("a", "b", "c", "d"):
        d = decide(sc, "acme", name)
        assert d.kind is Kind.ALLOW
        rid[name] = d.reservation_id
    # a: settled from a buffered reply with cached prompt tokens
    res = sc.run(svc.settle_usage(rid["a"], None, "gpt-4o", 1000, 50, "ext_proc",
                                  cached_tokens=800, settled_by="ext_proc_json"))
    assert res.applied
    # b: the upstream failed: released; c: the client went away: kept, charged at its bound
    # (max_tokens 1000: the estimate's own output)
    sc.run(svc.release(rid["b"], "upstream_error"))
    sc.run(svc.charge_unread(rid["c"], "abandoned"))

    # d: never settled: expires, charged at its bound in the background
    async def expire() -> None:
        svc.reservations.ttl_s = -1
        svc.expire_reservations()
        svc.reservations.ttl_s = 600
        while svc._background:
            await asyncio.sleep(0.01)

    sc.run(expire())
    # e: a report for a request this sidecar never saw: charged in full
    sc.run(svc.settle_usage("e", "acme", "gpt-4o-mini", 300, 30, "report"))
    # a repeated report changes nothing and records nothing
    assert not sc.run(svc.settle_usage(rid["a"], None, "gpt-4o", 1000, 50, "report")).applied

    evs = [e for e in events_of(sc, led, directory) if e.__class__.__name__ == "UsageEvent"]
    name_of = {v: k for k, v in rid.items()}
    by_id = {name_of[e.request_id]: e for e in evs}
    assert len(evs) == 5 and set(by_id) == {"a", "b", "c", "d", "e"}
    assert [by_id[r].outcome for r in "abcde"] == ["settled", "released", "kept", "expired",
                                                   "settled"]
    assert [by_id[r].settled_by for r in "abcde"] == ["ext_proc_json", "release", "abandoned",
                                                      "expiry", "report"]
    a = by_id["a"]
    # 200 uncached at $0.0025/1K, 800 cached at $0.00125/1K, 50 out at $0.01/1K
    assert a.cost_nano_usd == 200 * 2500 + 800 * 1250 + 50 * 10000 == a.budget_charge
    assert (a.input_tokens, a.cached_tokens, a.budget_unit) == (1000, 800, "usd")
    assert a.model_asked == "gpt-4o" and a.decision == "allow" and a.tier == "default"
    assert a.decided_us > 0 and a.settled_us >= a.decided_us and a.instance == "test-1"
    assert a.estimate_tokens > 1000
    assert by_id["b"].budget_charge == 0 and by_id["b"].input_tokens == 0
    assert by_id["c"].budget_charge == by_id["c"].cost_nano_usd > 0  # the bound, priced
    assert (by_id["c"].output_tokens, by_id["d"].output_tokens) == (1000, 1000)
    assert by_id["e"].decided_us == 0 and by_id["e"].cost_nano_usd == 300 * 150 + 30 * 600
    # the invariant a FinOps engineer checks: events add up to the budget, to the nano-dollar
    assert sum(e.budget_charge for e in evs) == sc.backend.states["acme"].spent


def test_refusals_are_counted_per_minute_and_thresholds_recorded_once(ledgered):
    sc, led, directory = ledgered
    svc = sc.sidecar.service
    decisions = [decide(sc, "acme", f"r{i}", max_tokens=10) for i in range(12)]
    kinds = [d.kind for d in decisions]
    assert kinds.count(Kind.DENY_RATE) == 4  # rpm 8
    sc.clock.advance(3600)  # refills the bucket, keeps the month
    # a big report crosses 50% then 100% of the $1 budget
    sc.run(svc.settle_usage(decisions[0].reservation_id, None, "gpt-4o", 300_000, 30_000,
                            "report"))  # $1.05
    decide(sc, "acme", "after-1", max_tokens=10)
    decide(sc, "acme", "after-2", max_tokens=10)
    led.tick(everything=True)
    evs = events_of(sc, led, directory)
    refusals = [e for e in evs if e.__class__.__name__ == "RefusalsEvent"]
    assert sum(e.count for e in refusals if e.reason == "rate_limited") == 4
    assert {e.tenant for e in refusals} == {"acme"}
    budget_refusals = sum(e.count for e in refusals if e.reason == "budget_exhausted")
    assert budget_refusals == 2  # the budget is spent: both later requests refused
    thresholds = [e for e in evs if e.__class__.__name__ == "ThresholdEvent"]
    assert sorted(e.fraction for e in thresholds) == [0.5, 1.0]
    assert all(e.tenant == "acme" and e.budget == 10**9 for e in thresholds)
    metrics = urllib.request.urlopen(sc.http_base + "/metrics", timeout=5).read().decode()
    assert 'kt_budget_thresholds_crossed_total{fraction="1",tenant="acme"} 1.0' in metrics
    assert 'kt_ledger_events_total{state="lost"} 0.0' in metrics
    assert 'kt_ledger_sink_up{sink="file"} 1.0' in metrics
    with urllib.request.urlopen(sc.http_base + "/readyz", timeout=5) as r:
        assert "ledger file ok" in r.read().decode()


def test_a_usage_report_with_cache_counts_is_priced_and_checked(ledgered):
    sc, led, directory = ledgered
    from tests.support.procs import post_json

    status, ack = post_json(sc.admin_base + "/v1/usage", {
        "request_id": "rep-1", "tenant": "acme", "model": "gpt-4o", "input_tokens": 1000,
        "output_tokens": 0, "cached_tokens": 1000})
    assert status == 200 and ack["cost_usd"] == pytest.approx(1000 * 1250 / 1e9)
    assert sc.backend.states["acme"].spent == 1000 * 1250
    status, err = post_json(sc.admin_base + "/v1/usage", {
        "request_id": "rep-2", "tenant": "acme", "model": "gpt-4o", "input_tokens": 10,
        "output_tokens": 0, "cached_tokens": 11})  # more cached than input: a lie
    assert status == 400 and "cached_tokens" in err["error"]["message"]
    assert sc.backend.states["acme"].spent == 1000 * 1250


def test_a_changed_ledger_section_needs_a_restart(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    with RunningSidecar(POLICY, policy_path=str(path)) as sc:
        path.write_text(POLICY + "ledger: {sink: none}\n")
        assert sc.sidecar.reload_if_changed() is False  # refused: the writer is built at start
        assert sc.sidecar.policy.ledger.sink == "file"
        path.write_text(POLICY.replace("rpm: 8", "rpm: 9"))
        assert sc.sidecar.reload_if_changed() is True
