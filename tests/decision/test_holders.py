"""Budget holders through the decision and settlement flows, in process (embedded backend,
the suite's manual clock): the company of issue 24 as a policy. Keys of two teams under
one org; a per-model cap; several windows; what a refused key is told; settlement moving
every level by the actual usage; the path a reservation was charged on settled even after
a reload changed the tree; a tenant outside any tree on the fast path."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sidecar import contract
from sidecar.backends.memory import MemoryBackend
from sidecar.decision.estimate import estimate
from sidecar.flows import Flows
from sidecar.model import Kind, Request
from sidecar.policy.load import parse_policy
from tests.support.clock import ManualClock

COMPANY = """
tenant: {header: x-tenant-id, unknown: deny}
tiers:
  - {name: premium, model: gpt-4o}
  - {name: economy, model: gpt-4o-mini}
defaults: {limits: {rpm: 60}}
tenants:
  acme: {budget: {tokens: 20000, period: month}}
  team-search: {parent: acme, budget: {tokens: 6000, period: month}}
  team-support:
    parent: acme
    budgets:
      - {tokens: 4000, period: month}
      - {tokens: 3000, period: week}
  search-key:
    parent: team-search
    limits: {rpm: 600}
    budget: {tokens: 5000, period: day}
  batch-key:
    parent: team-support
    limits: {rpm: 600}
    budget: {tokens: 10000, period: day}
    models:
      gpt-4o: {budget: {tokens: 1500, period: day}}
  flat-key: {budget: {tokens: 1000, period: day}}
"""


def body(model: str, tokens: int) -> bytes:
    """A request estimated at exactly ``tokens``: its prompt's estimate + max_tokens (firm)."""
    def of(max_tokens: int) -> bytes:
        return json.dumps({"model": model, "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()

    policy = parse_policy(COMPANY.encode(), "<test>")
    max_tokens = tokens
    for _ in range(5):  # the prompt's estimate counts the body's bytes, max_tokens' too
        est = estimate(policy, Request(headers={}, body=of(max_tokens)))
        if est.input_tokens + est.output_tokens == tokens:
            return of(max_tokens)
        max_tokens = tokens - est.input_tokens
    raise AssertionError(f"no body estimated at {tokens} tokens")


def flows(text: str = COMPANY) -> tuple[Flows, MemoryBackend, ManualClock]:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    return Flows(parse_policy(text.encode(), "<test>"), backend), backend, clock


def ask(f: Flows, tenant: str, model: str, tokens: int):
    return asyncio.run(f.decider.decide(Request(headers={"x-tenant-id": tenant},
                                                body=body(model, tokens))))


def spent(backend: MemoryBackend, *ids: str) -> list[int]:
    return [backend.states[i].spent if i in backend.states else 0 for i in ids]


def test_the_policy_compiles_paths_only_where_a_tenant_has_more_than_its_own_cell():
    p = parse_policy(COMPANY.encode(), "<test>")
    assert p.tenants["flat-key"].path is None and p.tenants["flat-key"].model_paths is None
    assert [c.id for c in p.tenants["search-key"].path.cells] == [
        "search-key", "team-search", "acme"]
    assert [c.id for c in p.tenants["batch-key"].path_for("gpt-4o").cells] == [
        "batch-key", "batch-key{m:gpt-4o}", "team-support", "team-support{tokens-week}", "acme"]
    # a tree member holds only what it declares: no default rpm on a team
    assert p.tenants["team-search"].limits.rpm == 0
    assert p.tenants["flat-key"].limits.rpm == 60  # a flat tenant: the defaults fill in


def test_a_team_without_room_refuses_its_key_and_names_itself_not_its_figures():
    f, backend, _ = flows()
    for _ in range(5):
        assert ask(f, "search-key", "gpt-4o-mini", 1000).kind is Kind.ALLOW
    # the key has 0 of 5,000 left today; but first: a key of the other team still passes
    assert ask(f, "batch-key", "gpt-4o-mini", 1000).kind is Kind.ALLOW
    d = ask(f, "search-key", "gpt-4o-mini", 1000)
    assert d.kind is Kind.DENY_BUDGET
    assert spent(backend, "search-key", "team-search", "acme") == [5000, 5000, 6000]
    # the key's own budget refused it (cell 0): today's message, its own figures
    assert "search-key" in contract.answer(d).body.decode() and not d.reason
    f2, backend2, _ = flows(COMPANY.replace("{tokens: 6000, period: month}",
                                            "{tokens: 2500, period: month}"))
    assert ask(f2, "search-key", "gpt-4o-mini", 2000).kind is Kind.ALLOW
    d = ask(f2, "search-key", "gpt-4o-mini", 1000)
    assert d.kind is Kind.DENY_BUDGET and d.outcome.cell == 1
    answer = contract.answer(d)
    headers = dict(answer.response_headers)
    assert headers[contract.H_REASON] == "holder:team-search"
    message = json.loads(answer.body)["error"]["message"]
    assert "team-search" in message and "search-key" in message
    assert "2500" not in message and "500" not in message  # no figure of the team's
    # the headers are the key's own: its 5,000 a day, 3,000 left after 2,000
    assert headers[contract.H_LIMIT_REQUESTS] == "600"
    assert headers[contract.H_BUDGET_REMAINING] == "3000"
    assert spent(backend2, "search-key", "team-search", "acme") == [2000, 2000, 2000]


def test_a_model_cap_and_a_weekly_window_apply_with_the_overall_ones():
    f, backend, _ = flows()
    assert ask(f, "batch-key", "gpt-4o", 1500).kind is Kind.ALLOW
    d = ask(f, "batch-key", "gpt-4o", 100)  # gpt-4o: 1,500 a day for this key
    assert (d.kind, d.reason, d.outcome.cell) == (Kind.DENY_BUDGET, "holder:batch-key", 1)
    assert "gpt-4o tokens budget per day" in d.message
    assert ask(f, "batch-key", "gpt-4o-mini", 1400).kind is Kind.ALLOW  # other models
    assert spent(backend, "batch-key", "batch-key{m:gpt-4o}", "team-support",
                 "team-support{tokens-week}") == [2900, 1500, 2900, 2900]
    d = ask(f, "batch-key", "gpt-4o-mini", 200)  # the team's 3,000 a week
    assert (d.kind, d.reason) == (Kind.DENY_BUDGET, "holder:team-support")
    assert "tokens budget per week of 'team-support'" in d.message


def test_a_models_dated_snapshot_is_under_the_models_cap():
    """A client asking for `gpt-4o-2024-08-06` (OpenAI's dated name of gpt-4o, and the
    name in its usage) is under `models: {gpt-4o: ...}`: the cap is not escaped by a
    snapshot's name. `gpt-4o-mini` is another model, not a snapshot."""
    f, backend, _ = flows()
    assert ask(f, "batch-key", "gpt-4o-2024-08-06", 1500).kind is Kind.ALLOW
    d = ask(f, "batch-key", "gpt-4o-2024-11-20", 100)
    assert (d.kind, d.reason) == (Kind.DENY_BUDGET, "holder:batch-key")
    assert spent(backend, "batch-key{m:gpt-4o}") == [1500]
    rule = f.decider.policy.rule_for("batch-key")
    cap = rule.path_for("gpt-4o")
    assert rule.path_for("gpt-4o-0806") is cap and rule.path_for("gpt-4o-20240806") is cap
    assert rule.path_for("gpt-4o-mini") is rule.path is not cap
    assert rule.path_for("gpt-4o-mini-2024-07-18") is rule.path


def test_settlement_moves_every_level_by_the_actual_usage():
    f, backend, _ = flows()
    d = ask(f, "search-key", "gpt-4o-mini", 1000)
    assert d.kind is Kind.ALLOW and d.reservation_id
    r = asyncio.run(f.settlement.settle_usage(d.reservation_id, None, "gpt-4o-mini", 100, 150))
    assert r.applied
    assert spent(backend, "search-key", "team-search", "acme") == [250, 250, 250]
    # the org's spend is its keys' settled usage, across both teams
    d = ask(f, "batch-key", "gpt-4o", 1000)
    asyncio.run(f.settlement.settle_usage(d.reservation_id, None, "gpt-4o", 300, 100))
    assert spent(backend, "acme")[0] == 250 + 400
    assert spent(backend, "batch-key{m:gpt-4o}", "team-support{tokens-week}") == [400, 400]


def test_a_reservation_settles_on_the_path_it_was_charged_on_after_a_reload():
    f, backend, _ = flows()
    d = ask(f, "search-key", "gpt-4o-mini", 1000)
    # the key moves to the other team before its usage comes back
    f.replace_policy(parse_policy(COMPANY.replace(
        "search-key:\n    parent: team-search", "search-key:\n    parent: team-support").encode(),
        "<test>"))
    asyncio.run(f.settlement.settle_usage(d.reservation_id, None, "gpt-4o-mini", 10, 10))
    assert spent(backend, "team-search", "team-support", "acme") == [20, 0, 20]


def test_four_levels_decide_as_one():
    text = """
tenant: {header: x-tenant-id}
tiers: [{name: default, model: m}]
tenants:
  org: {budget: {tokens: 130, period: total}}
  division: {parent: org}
  team: {parent: division, limits: {rpm: 2}}
  key: {parent: team, budget: {tokens: 1000, period: day}}
"""
    f, backend, _ = flows(text)
    assert [c.id for c in f.policy.tenants["key"].path.cells] == ["key", "team", "org"]
    assert ask(f, "key", "m", 40).kind is Kind.ALLOW
    assert ask(f, "key", "m", 40).kind is Kind.ALLOW
    d = ask(f, "key", "m", 40)  # the team's 2 requests a minute
    assert (d.kind, d.reason) == (Kind.DENY_RATE, "holder:team")
    assert d.outcome.retry_after_s == 30
    assert spent(backend, "key", "org") == [80, 80]


def test_every_level_survives_a_restart_of_the_embedded_backend(tmp_path):
    """Decisions' charges (the snapshot at a clean stop) and a settlement (the journal,
    without a snapshot after it) come back for every cell: the key, its model cell, the
    team's two windows and the org; a repeated report of the same request changes nothing."""
    state = str(tmp_path / "spend.json")
    clock = ManualClock()
    ids = ["batch-key", "batch-key{m:gpt-4o}", "team-support", "team-support{tokens-week}",
           "acme"]

    async def life(settle_rid: str = ""):
        backend = MemoryBackend(state_file=state, clock=clock, flush_interval_s=3600)
        await backend.start()
        f = Flows(parse_policy(COMPANY.encode(), "<test>"), backend)
        try:
            if not settle_rid:
                d = await f.decider.decide(Request(headers={"x-tenant-id": "batch-key"},
                                                   body=body("gpt-4o", 1000)))
                assert d.kind is Kind.ALLOW
                return d.reservation_id, f.reservations.pop(d.reservation_id)
            return await f.settlement.settle_usage(settle_rid, None, "gpt-4o", 100, 100,
                                                   reservation=settle_res)
        finally:
            await backend.close()

    rid, settle_res = asyncio.run(life())
    before = Path(state).read_bytes()
    first = asyncio.run(life(rid))
    assert first.applied
    # as if killed right after the settlement was acknowledged: the snapshot from before
    # it, and the journal, which holds it
    Path(state).write_bytes(before)

    async def read():
        backend = MemoryBackend(state_file=state, clock=clock)
        await backend.start()
        try:
            again = await backend.was_settled("batch-key", rid)
            return [backend.states[i].spent for i in ids], again
        finally:
            await backend.close()

    spent, settled = asyncio.run(read())
    assert spent == [200] * 5 and settled
