"""Budget holders on the Redis backend, on one node and on the 3-node cluster (the ``store``
fixture): two sidecars on one store, keys of two teams under one org deciding at once with
a total demand beyond every level. A tree's keys share the root's slot, so each decision is
one script call on one node (a cross-slot call would fail on the cluster); no level admits
beyond its budget; once settled, the org's spend is its teams' and each team's its keys'."""
from __future__ import annotations

import asyncio
import json
import struct

from sidecar.backends.redis import RedisBackend
from sidecar.decision.estimate import estimate
from sidecar.flows import Flows
from sidecar.model import Kind, Request
from sidecar.policy import schema
from sidecar.policy.load import parse_policy

POLICY = """
tenant: {header: x-tenant-id, unknown: deny}
tiers: [{name: default, model: m}]
tenants:
  org-%(run)s: {budget: {tokens: 3000, period: total}}
  search-%(run)s: {parent: org-%(run)s, budget: {tokens: 2000, period: total}}
  support-%(run)s: {parent: org-%(run)s, budget: {tokens: 2000, period: total}}
  s1-%(run)s: {parent: search-%(run)s, budget: {tokens: 1500, period: total}}
  s2-%(run)s: {parent: search-%(run)s, budget: {tokens: 1500, period: total}}
  p1-%(run)s: {parent: support-%(run)s, budget: {tokens: 1500, period: total}}
  p2-%(run)s: {parent: support-%(run)s, budget: {tokens: 1500, period: total}}
"""


def request(policy, tenant: str, tokens: int) -> Request:
    for max_tokens in range(tokens, 0, -1):
        body = json.dumps({"model": "m", "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        est = estimate(policy, Request(headers={}, body=body))
        if est.input_tokens + est.output_tokens == tokens:
            return Request(headers={"x-tenant-id": tenant}, body=body)
    raise AssertionError(tokens)


def test_two_sidecars_never_let_a_tree_overspend_on_a_node_or_a_cluster(store):
    run = "c" if store.cluster else "n"
    policy = parse_policy((POLICY % {"run": run}).encode(), "<test>")
    cfg = schema.RedisBackend(url=store.url, cluster=store.cluster, timeout_ms=2000)
    keys = [f"{k}-{run}" for k in ("s1", "s2", "p1", "p2")]

    async def main():
        backends = [RedisBackend(cfg), RedisBackend(cfg)]
        sidecars = [Flows(policy, b) for b in backends]
        for b in backends:
            await b.start()
        try:
            path = policy.tenants[keys[0]].path
            slots = {await backends[0].link.plain("CLUSTER", "KEYSLOT",
                                                  backends[0].keyspace.cell(path.root, c.id))
                     for c in path.cells} if store.cluster else {0}
            assert len(slots) == 1  # the whole tree in the root's slot
            # 24 requests of 250 tokens (6,000) from two sidecars at once, beyond each key's
            # 1,500, each team's 2,000 and the org's 3,000
            calls = [sidecars[i % 2].decider.decide(request(policy, keys[i % 4], 250))
                     for i in range(24)]
            decisions = await asyncio.gather(*calls)
            admitted = [d for d in decisions if d.kind is Kind.ALLOW]
            assert len(admitted) == 12  # exactly the org's 3,000 / 250
            refused = {d.reason for d in decisions if d.kind is Kind.DENY_BUDGET}
            assert refused <= {"holder:org-" + run, "holder:search-" + run,
                               "holder:support-" + run, ""}
            # settle each at 200 tokens used, on the sidecar that decided it
            for i, d in enumerate(decisions):
                if d.kind is Kind.ALLOW:
                    flows = sidecars[i % 2]
                    r = await flows.settlement.settle_usage(d.reservation_id, None, "m", 100, 100)
                    assert r.applied

            async def spent(cell: str) -> int:
                key = backends[0].keyspace.cell(path.root, cell)
                v = await backends[0].link.plain("GET", key)  # lua/cell.lua
                return int(struct.unpack("<6d", v)[5]) if v else 0

            org, search, support = (await spent(f"org-{run}"), await spent(f"search-{run}"),
                                    await spent(f"support-{run}"))
            per_key = [await spent(k) for k in keys]
            assert org == 12 * 200 == search + support
            assert search == per_key[0] + per_key[1] and support == per_key[2] + per_key[3]
            assert all(s <= 1500 for s in per_key) and search <= 2000 and support <= 2000
            # the management API's reader of a cell (live counters) reads what the script
            # wrote, from either sidecar
            for b in backends:
                st = await b.read_cell_state(path.root, f"org-{run}")
                assert st is not None and st.spent == org and st.period_start >= 0
            fresh = await backends[1].read_cell_state(path.root, "never-written")
            assert fresh is not None and fresh.spent == 0
        finally:
            for b in backends:
                await b.close()

    asyncio.run(main())


def test_a_weekly_window_in_a_time_zone_rolls_over_at_its_local_start(store):
    """Monday 00:00 in Berlin, by the scripts' clock (here an override: the sidecar computes
    the window from the same one), on a node and on the cluster."""
    from tests.policy.test_calendar import us

    run = "wc" if store.cluster else "wn"
    text = f"""
tenant: {{header: x-tenant-id}}
tiers: [{{name: d, model: m}}]
tenants:
  org-{run}: {{budget: {{tokens: 100000, period: month}}}}
  key-{run}:
    parent: org-{run}
    budget: {{tokens: 500, period: week, timezone: Europe/Berlin}}
"""
    policy = parse_policy(text.encode(), "<test>")
    monday = us("2026-11-22T23:00:00Z")  # Monday 2026-11-23 00:00 in Berlin
    now = [monday - 1_000_000]
    cfg = schema.RedisBackend(url=store.url, cluster=store.cluster, timeout_ms=2000)

    async def main():
        backend = RedisBackend(cfg, clock_override=lambda: now[0])
        await backend.start()
        try:
            flows = Flows(policy, backend)
            req = request(policy, f"key-{run}", 400)
            first = await flows.decider.decide(req)
            refused = await flows.decider.decide(req)
            now[0] = monday
            again = await flows.decider.decide(req)
            return first, refused, again
        finally:
            await backend.close()

    first, refused, again = asyncio.run(main())
    assert first.kind is Kind.ALLOW
    assert refused.kind is Kind.DENY_BUDGET and refused.outcome.retry_after_s == 1
    assert again.kind is Kind.ALLOW and again.outcome.period_start_us == monday
