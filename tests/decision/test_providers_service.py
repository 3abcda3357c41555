"""Provider capacity through the decision service, in process with the embedded backend
and fake clocks (the backend's and the admission queue's move together): routing,
spill-over, the reservation, the queue's order, fairness and truthful refusals,
settlement of the provider's bucket, the answer's headers and the metrics."""
from __future__ import annotations

import asyncio
import json
from typing import Callable

import pytest
from prometheus_client import generate_latest

from sidecar import _core, contract
from sidecar.backends.memory import MemoryBackend
from sidecar.metrics import Metrics
from sidecar.model import Decision, Kind, Request
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService
from tests.support.clock import ManualClock

HEAD = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
estimate: {trusted: true}   # the tests name each request's tokens in x-kt-estimated-tokens
"""


class FakeTimer:
    """The queue's clock and timers on the backend's fake clock: advance() moves both and
    fires the timers due, letting the released requests decide again in between."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.timers: list[list] = []  # [when, callback, cancelled]

    def now(self) -> float:
        return self.clock.now / 1e6

    def call_at(self, when: float, callback: Callable[[], None]):
        entry = [when, callback, False]
        self.timers.append(entry)

        class Handle:
            def cancel(self) -> None:
                entry[2] = True
        return Handle()

    async def advance(self, seconds: float) -> None:
        end = self.clock.now + round(seconds * 1e6)
        while True:
            await settle_loop()
            live = [t for t in self.timers if not t[2]]
            due = [t for t in live if round(t[0] * 1e6) <= end]
            if not due:
                break
            first = min(due, key=lambda t: t[0])
            self.clock.now = max(self.clock.now, round(first[0] * 1e6))
            first[2] = True
            first[1]()
        self.clock.now = end
        await settle_loop()


async def settle_loop() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def service(policy_yaml: str):
    clock = ManualClock()
    timer = FakeTimer(clock)
    policy = parse_policy(policy_yaml.encode(), "<test>")
    svc = DecisionService(policy, MemoryBackend(clock=clock), Metrics(), queue_timer=timer)
    return svc, timer


def req(tenant: str, tokens: int = 10, model: str = "gpt-4o", rid: str = "") -> Request:
    body = json.dumps({"model": model, "messages": []}).encode()
    return Request(headers={"x-tenant-id": tenant, "x-kt-estimated-tokens": str(tokens)},
                   body=body, request_id=rid)


def run(coro):
    return asyncio.run(coro)


def test_spill_goes_to_the_other_provider_then_to_the_compact_tier_and_says_why():
    svc, _ = service(HEAD + """
providers:
  - {id: east, models: [gpt-4o], rate_limits: {requests_per_minute: 2}}
  - {id: west, models: [gpt-4o], rate_limits: {requests_per_minute: 2}}
  - {id: mini, models: [gpt-4o-mini], rate_limits: {requests_per_minute: 100}}
defaults: {limits: {rpm: 100}}
tenants:
  strict: {spill_to_next_tier: false}
""")

    async def main():
        return [await svc.decide(req("t")) for _ in range(6)], await svc.decide(req("strict"))

    got, strict = run(main())
    assert [d.provider for d in got] == ["east", "east", "west", "west", "mini", "mini"]
    assert [d.kind for d in got] == [Kind.ALLOW] * 4 + [Kind.DOWNGRADE] * 2
    spilled = contract.answer(got[4])
    up = dict(spilled.upstream_headers)
    assert (up["x-kt-decision"], up["x-kt-provider"], up["x-kt-tier"], up["x-kt-model"],
            up["x-kt-reason"]) == ("downgrade", "mini", "compact", "gpt-4o-mini", "provider_full")
    assert dict(spilled.response_headers)["x-kt-reason"] == "provider_full"
    assert spilled.metadata is not None and spilled.metadata["provider"] == "mini"
    assert "x-kt-reason" not in dict(contract.answer(got[0]).upstream_headers)
    # a tenant that may not spill is refused by provider quota, with a truthful retry-after
    ans = contract.answer(strict)
    assert ans.status == 429 and (strict.kind, strict.reason) == (Kind.DENY_RATE,
                                                                    "provider_quota")
    headers = dict(ans.response_headers)
    assert headers["retry-after"] == "30"  # rpm 2: the next request in 30 s
    assert headers["x-kt-reason"] == "provider_quota"
    assert "x-ratelimit-limit-requests" not in headers  # the tenant's limits did not refuse
    body = json.loads(ans.body)["error"]
    assert body["code"] == "rate_limit_exceeded" and "gpt-4o" in body["message"]


def test_weighted_routing_spreads_first_choices_by_weight():
    svc, _ = service(HEAD + """
providers:
  - {id: a, models: [gpt-4o, gpt-4o-mini]}
  - {id: b, models: [gpt-4o, gpt-4o-mini]}
routing:
  gpt-4o: {strategy: weighted, weights: {a: 70, b: 30}}
""")

    async def main():
        return [(await svc.decide(req(f"t{i}"))).provider for i in range(20)]

    firsts = run(main())
    assert firsts.count("a") == 14 and firsts.count("b") == 6
    # smooth: never more than three of a's in a row
    assert "aaaa" not in "".join(firsts)


def test_a_low_flood_leaves_high_the_reserved_share():
    svc, timer = service(HEAD + """
providers:
  - {id: p, models: [gpt-4o, gpt-4o-mini], rate_limits: {requests_per_minute: 10},
     reserve: {high: 0.2}}
tenants:
  vip: {priority: high}
  batch: {priority: low}
""")

    async def main():
        low = [await svc.decide(req("batch")) for _ in range(12)]
        high = [await svc.decide(req("vip")) for _ in range(3)]
        return low, high

    low, high = run(main())
    assert sum(d.admitted for d in low) == 8  # 80% of the quota, not 20% (LiteLLM #18953)
    assert sum(d.admitted for d in high) == 2  # the 20% kept for high
    refused = low[-1]
    assert refused.reason == "provider_quota" and refused.outcome is not None
    # low waits until the bucket holds one request above the floor (2 kept): 6 s at rpm 10
    assert refused.outcome.wait_us == 6_000_000


QUEUED = HEAD + """
providers:
  - {id: p, models: [gpt-4o, gpt-4o-mini], rate_limits: {requests_per_minute: 60, burst: 0.05}}
queue: {max_wait_ms: %(wait)d, max_size: %(size)d}
defaults: {spill_to_next_tier: false}
tenants:
  vip: {priority: high}
  a: {priority: low}
  b: {priority: low}
"""


def test_the_queue_absorbs_a_short_burst_and_refuses_a_long_one_truthfully():
    svc, timer = service(QUEUED % {"size": 100, "wait": 2000})  # 3 at once, then one a second

    async def main():
        burst = [asyncio.ensure_future(svc.decide(req("a"))) for _ in range(5)]
        await timer.advance(0)
        assert sum(f.done() for f in burst) == 3 and svc.queue.members == 2
        await timer.advance(2.0)
        short = [f.result() for f in burst]
        # a longer burst: 3 fit, 2 wait up to 2 s, the rest cannot get room in time
        await timer.advance(10.0)  # the bucket is full again
        long = [asyncio.ensure_future(svc.decide(req("b"))) for _ in range(8)]
        await timer.advance(3.0)
        return short, [f.result() for f in long]

    short, long = run(main())
    assert all(d.admitted for d in short)  # no 429 for a burst the queue can absorb
    assert sum(d.admitted for d in long) == 5
    refused = [d for d in long if not d.admitted]
    for d in refused:
        ans = contract.answer(d)
        assert ans.status == 429
        # truthful: the bucket that refused has room for one more request in this long
        assert dict(ans.response_headers)["retry-after"] == str(d.outcome.retry_after_s)
        assert 1 <= d.outcome.retry_after_s <= 3
    text = generate_latest(svc.metrics.registry).decode()
    assert 'kt_queue_rejections_total{reason="wait_too_long"} 3.0' in text
    assert "kt_request_queue_depth 0.0" in text
    assert 'kt_queue_wait_seconds_count{result="admitted"} 4.0' in text


def test_the_queue_releases_high_first_and_round_robin_between_tenants():
    svc, timer = service(QUEUED % {"size": 100, "wait": 5000})
    order: list[str] = []

    async def decide(tenant: str, n: int):
        d = await svc.decide(req(tenant))
        if d.admitted:
            order.append(f"{tenant}{n}")
        return d

    async def main():
        for _ in range(3):  # the bucket is empty
            assert (await svc.decide(req("vip"))).admitted
        tasks = [asyncio.ensure_future(decide(t, n)) for t, n in
                 (("a", 1), ("a", 2), ("a", 3), ("b", 1), ("vip", 1))]
        await timer.advance(0)
        assert svc.queue.members == 5
        await timer.advance(5.0)
        return [await t for t in tasks]

    done = run(main())
    # one a second: high first although it came last, then a and b in turn (b is not
    # left behind a's three), first come first served within a
    assert order == ["vip1", "a1", "b1", "a2", "a3"]
    assert all(d.admitted for d in done)


def test_a_full_queue_refuses_at_once_with_the_decisions_retry_after():
    svc, timer = service(QUEUED % {"size": 1, "wait": 2000})

    async def main():
        for _ in range(3):
            assert (await svc.decide(req("a"))).admitted
        first = asyncio.ensure_future(svc.decide(req("a")))
        await timer.advance(0)
        second = await svc.decide(req("b"))
        await timer.advance(1.0)
        return await first, second

    first, second = run(main())
    assert first.admitted
    assert not second.admitted and contract.answer(second).status == 429
    assert dict(contract.answer(second).response_headers)["retry-after"] == "1"
    text = generate_latest(svc.metrics.registry).decode()
    assert 'kt_queue_rejections_total{reason="full"} 1.0' in text


def test_rls_never_waits():
    svc, timer = service(QUEUED % {"size": 100, "wait": 2000})

    async def main():
        for _ in range(3):
            await svc.decide(req("a"), "rls")
        return await svc.decide(req("a"), "rls")

    d = run(main())
    assert d.kind is Kind.DENY_RATE and svc.queue.members == 0


def test_a_tenant_rate_limit_waits_in_the_queue_too():
    svc, timer = service(HEAD + """
queue: {max_wait_ms: 1500}
defaults: {limits: {rpm: 60}}
""")

    async def main():
        for _ in range(60):
            assert (await svc.decide(req("t"))).admitted
        later = asyncio.ensure_future(svc.decide(req("t")))
        await timer.advance(0.5)
        assert not later.done()
        await timer.advance(0.6)
        return await later

    d = run(main())
    assert d.admitted and d.kind is Kind.ALLOW


def test_settlement_corrects_the_providers_bucket_too():
    svc, timer = service(HEAD + """
providers:
  - {id: p, models: [gpt-4o, gpt-4o-mini], rate_limits: {tokens_per_minute: 10000}}
defaults: {limits: {tpm: 100000}}
""")
    backend = svc.backend
    assert isinstance(backend, MemoryBackend)

    async def main():
        d = await svc.decide(req("t", tokens=100, rid="r1"))
        assert d.admitted and d.provider == "p" and d.reservation_id
        before = backend.quota_state("p").tok_level
        # settled by the reservation id the sidecar made (x-kt-reservation)
        res = await svc.settle_usage(d.reservation_id, "t", "gpt-4o", 250, 50)
        again = await svc.settle_usage(d.reservation_id, "t", "gpt-4o", 250, 50)
        return before, res, again

    before, res, again = run(main())
    assert before == 10_000 - 100
    assert res.applied and not again.applied
    assert backend.quota_state("p").tok_level == 10_000 - 300  # actual, not the estimate
    text = generate_latest(svc.metrics.registry).decode()
    assert 'kt_tokens_remaining{provider="p"} 9900.0' in text  # as of the decision
    assert 'kt_provider_requests_total{decision="allow",provider="p"} 1.0' in text
    assert 'kt_provider_limit{limit="tokens_per_minute",provider="p"} 10000.0' in text


def test_upstream_answers_are_counted_by_provider_and_status_with_bounded_labels():
    svc, _ = service(HEAD + """
providers:
  - {id: p, models: [gpt-4o, gpt-4o-mini]}
""")
    svc.upstream_answered("p", 429)
    svc.upstream_answered("p", 200)
    svc.upstream_answered("forged-by-a-client", 429)
    svc.upstream_answered("p", 99999)
    text = generate_latest(svc.metrics.registry).decode()
    assert 'kt_upstream_responses_total{provider="p",status="429"} 1.0' in text
    assert 'kt_upstream_responses_total{provider="unknown",status="429"} 1.0' in text
    assert 'kt_upstream_responses_total{provider="p",status="other"} 1.0' in text


def test_fail_open_names_a_provider_so_envoy_can_route():
    from sidecar.backends.base import BackendError

    svc, _ = service(HEAD + """
providers:
  - {id: p, models: [gpt-4o]}
  - {id: m, models: [gpt-4o-mini]}
backend: {kind: redis, failure_mode: open}
""")

    class Down(MemoryBackend):
        async def decide_routed(self, *a, **kw):
            raise BackendError("down")

    svc.backend = Down()
    d = run(svc.decide(req("t", model="gpt-4o-mini")))
    assert d.kind is Kind.FAIL_OPEN and d.provider == "m"
    assert dict(contract.answer(d).upstream_headers)["x-kt-provider"] == "m"


@pytest.mark.parametrize("shadow", [True])
def test_shadow_mode_lets_a_provider_refusal_through_and_says_so(shadow):
    svc, _ = service(HEAD + """
providers:
  - {id: p, models: [gpt-4o, gpt-4o-mini], rate_limits: {requests_per_minute: 1}}
shadow_mode: true
""")

    async def main():
        return [await svc.decide(req("t")) for _ in range(2)]

    first, second = run(main())
    assert first.admitted and not first.shadow
    assert second.admitted and second.shadow and second.provider == "p"
    assert dict(contract.answer(second).upstream_headers)["x-kt-shadow"] == "rate_limited"


def _unused(d: Decision) -> None:  # keep the import honest for type checkers
    assert d.kind in Kind and _core.ALLOW == 0


def test_kt_serve_workers_merge_provider_gauges_by_meaning_not_by_sum():
    """`kt serve --workers N` shows one pod: the queue depths add up, a provider's limit
    and remaining capacity do not (every worker reads the same shared buckets)."""
    from sidecar.workers import merge_metrics

    def worker(depth: int, remaining: int) -> str:
        m = Metrics()
        m.queue_depth.set(depth)
        m.provider_limit.labels("p", "requests_per_minute").set(600)
        m.provider_requests_remaining.labels("p").set(remaining)
        m.provider_tokens_remaining.labels("p").set(remaining * 100)
        m.provider_utilisation.labels("p", "requests").set(1 - remaining / 600)
        return generate_latest(m.registry).decode()

    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in merge_metrics([worker(3, 500), worker(4, 450)]) for s in fam.samples}
    assert merged[("kt_request_queue_depth", ())] == 7
    assert merged[("kt_provider_limit", (("limit", "requests_per_minute"), ("provider", "p")))] == 600
    assert merged[("kt_provider_requests_remaining", (("provider", "p"),))] == 450
    assert merged[("kt_tokens_remaining", (("provider", "p"),))] == 45_000
    assert merged[("kt_provider_utilisation", (("limit", "requests"), ("provider", "p")))] == 0.25
