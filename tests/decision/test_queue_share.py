"""The admission queue cannot be filled by one tenant nor held by a lower priority: each
tenant holds at most its share of the places, and a higher priority takes the place of
the lowest one when the queue is full (in process, embedded backend, fake clocks)."""
from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from sidecar import contract
from sidecar.policy.load import PolicyError, parse_policy
from tests.decision.test_providers_service import HEAD, req, run, service

QUEUE = HEAD + """
providers:
  - {id: p, models: [gpt-4o, gpt-4o-mini], rate_limits: {requests_per_minute: 60, burst: 0.05}}
queue: {max_wait_ms: 20000, max_size: %(size)d%(share)s}
defaults: {spill_to_next_tier: false}
tenants:
  vip: {priority: high}
  spam: {priority: low}
  other: {priority: low}
"""


def _rejections(svc, reason: str) -> float:
    text = generate_latest(svc.metrics.registry).decode()
    for line in text.splitlines():
        if line.startswith(f'kt_queue_rejections_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_one_tenant_cannot_fill_the_queue_for_everyone():
    svc, timer = service(QUEUE % {"size": 20, "share": ""})  # the default share, 0.25

    async def main():
        for _ in range(3):  # the provider's bucket is empty
            assert (await svc.decide(req("spam"))).admitted
        spam = [asyncio.ensure_future(svc.decide(req("spam"))) for _ in range(40)]
        await timer.advance(0)
        refused_at_once = sum(f.done() for f in spam)
        others = [asyncio.ensure_future(svc.decide(req(t))) for t in ("other", "vip", "vip")]
        await timer.advance(0)
        members = svc.queue.members
        await timer.advance(20.0)
        return refused_at_once, members, [f.result() for f in others], [f.result() for f in spam]

    refused_at_once, members, others, spam = run(main())
    assert refused_at_once == 40 - 5  # 5 places of 20 for one tenant, the rest refused now
    assert members == 5 + 3  # the others found places
    assert all(d.admitted for d in others)
    assert sum(d.admitted for d in spam) == 5
    refused = [d for d in spam if not d.admitted]
    assert all(contract.answer(d).status == 429 for d in refused)
    assert _rejections(svc, "tenant_share") == 35


def test_a_higher_priority_takes_the_place_of_a_lower_one_in_a_full_queue():
    svc, timer = service(QUEUE % {"size": 4, "share": ", tenant_share: 1.0"})

    async def main():
        for _ in range(3):
            assert (await svc.decide(req("spam"))).admitted
        spam = [asyncio.ensure_future(svc.decide(req("spam"))) for _ in range(4)]
        await timer.advance(0)
        assert svc.queue.members == 4 and not any(f.done() for f in spam)
        vip = [asyncio.ensure_future(svc.decide(req("vip"))) for _ in range(2)]
        await timer.advance(0)
        preempted_now = [f.done() for f in spam]
        members = svc.queue.members
        # another low-priority request finds the queue full and nobody below it
        late_low = await svc.decide(req("other"))
        await timer.advance(20.0)
        return preempted_now, members, late_low, [f.result() for f in vip], [
            f.result() for f in spam]

    preempted_now, members, late_low, vip, spam = run(main())
    assert preempted_now == [False, False, True, True]  # the latest parked leave first
    assert members == 4  # never more than max_size
    assert all(d.admitted for d in vip)
    assert [d.admitted for d in spam] == [True, True, False, False]
    for d in spam[2:] + [late_low]:
        ans = contract.answer(d)
        assert ans.status == 429 and int(dict(ans.response_headers)["retry-after"]) >= 1
    assert _rejections(svc, "preempted") == 2 and _rejections(svc, "full") == 1
    assert svc.queue.members == 0 and not svc.queue._held


def test_a_tenant_share_outside_0_1_is_a_policy_error():
    for share in ("0", "1.5", "-0.1", ".nan"):
        try:
            parse_policy((QUEUE % {"size": 4, "share": f", tenant_share: {share}"}).encode(),
                         "<test>")
        except PolicyError as exc:
            assert "$.queue.tenant_share" in str(exc)
        else:
            raise AssertionError(f"tenant_share {share} accepted")


def test_a_wait_ends_before_the_caller_gives_up():
    # a check that reached a busy sidecar late: Envoy waits only 0.6 s more, so a wait of
    # about a second would end after Envoy's own timeout answered by its failure mode;
    # the truthful 429 now instead (without the caller's wait it waits and is admitted)
    svc, timer = service(QUEUE % {"size": 20, "share": ""})

    async def main():
        for _ in range(3):
            assert (await svc.decide(req("other"))).admitted
        hurried = asyncio.ensure_future(svc.decide(req("other"), "authz", caller_wait_s=0.6))
        patient = asyncio.ensure_future(svc.decide(req("vip"), "authz", caller_wait_s=5.0))
        await timer.advance(0)
        refused_at_once = hurried.done()
        await timer.advance(5.0)
        return refused_at_once, hurried.result(), patient.result()

    refused_at_once, hurried, patient = run(main())
    assert refused_at_once and not hurried.admitted
    ans = contract.answer(hurried)
    assert ans.status == 429 and int(dict(ans.response_headers)["retry-after"]) >= 1
    assert patient.admitted
    assert _rejections(svc, "wait_too_long") == 1
