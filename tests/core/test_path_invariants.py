"""Consequences of a hierarchy any correct implementation must satisfy, checked on the
reference model, the Cython core (embedded backend) and the Lua scripts (a real Valkey),
without trusting the model: keys of two teams under one org, whose total demand exceeds
every level, decide and settle in a random order over random times.

- no cell admits beyond its budget in any window: every admitted charge fit in what the
  cell's history (charges and settlements, rebuilt here) left in its window;
- no request bucket admits more than its capacity over any interval;
- the remaining values an answer shows are in [0, limit];
- once every admitted request is settled, the org's spend is the sum of its teams', and
  each team's the sum of its keys': settlement moved every level by the same usage."""
from __future__ import annotations

import asyncio
import itertools
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar import _core
from sidecar.backends.memory import MemoryBackend
from sidecar.backends.redis import RedisBackend
from sidecar.policy import schema
from sidecar.policy.holders import HolderPath, PathCell, PathSettlement, path_deltas
from tests.core import reference_model as ref
from tests.support.clock import ManualClock

_trees = itertools.count()
MINUTE = 60_000_000


def limits(**kw) -> tuple[_core.Limits, ref.Limits]:
    return _core.Limits(**kw), ref.Limits(**kw)


def tree(org_total: int, org_minute: int, team_total: int, key_total: int, key_rpm: int):
    """org (a total budget and a per-minute window) > team-a, team-b > two keys each."""
    n = next(_trees)
    org = f"org{n}"
    cells = {
        org: limits(budget=org_total, period=_core.P_TOTAL),
        f"{org}{{tokens-minute}}": limits(budget=org_minute, period=_core.P_MINUTE),
        **{f"team-{t}{n}": limits(budget=team_total, period=_core.P_TOTAL) for t in "ab"},
        **{f"key-{t}{k}{n}": limits(rpm=key_rpm, budget=key_total, period=_core.P_TOTAL)
           for t in "ab" for k in "12"},
    }

    def cell(cid: str) -> PathCell:
        return PathCell(id=cid, holder=cid, label="", unit="tokens", limits=cells[cid][0])

    paths = {}
    for t in "ab":
        for k in "12":
            key = f"key-{t}{k}{n}"
            paths[key] = HolderPath(org, (cell(key), cell(f"team-{t}{n}"), cell(org),
                                          cell(f"{org}{{tokens-minute}}")))
    return org, cells, paths


class Model:
    """The reference model behind the backends' decide_path/settle interface."""

    def __init__(self, clock: ManualClock, cells) -> None:
        self.clock = clock
        self.ref = {cid: ref_lim for cid, (_, ref_lim) in cells.items()}
        self.states = {cid: ref.State() for cid in cells}
        self.settled: set[tuple[str, str]] = set()

    async def decide_path(self, tenant, path, tier, inp, out, firm, shadow):
        return ref.decide_path([(self.ref[c.id], self.states[c.id]) for c in path.cells],
                               self.clock(), tier, inp, out, firm, shadow)

    async def settle(self, tenant, target, rid, d_tokens, d_cost, period_start):
        if (tenant, rid) in self.settled:
            return None
        self.settled.add((tenant, rid))
        ref.settle_path([(self.ref[c.id], self.states[c.id]) for c in target.path.cells],
                        self.clock(), d_tokens, list(target.deltas))

    def spent(self, cid: str, now: int) -> int:
        st_ = self.states[cid]
        lim = self.ref[cid]
        return st_.spent if st_.period_start == ref.period_bounds(now, lim.period)[0] else 0


def make(kind: str, clock: ManualClock, cells, url: str):
    if kind == "model":
        return Model(clock, cells)
    if kind == "memory":
        return MemoryBackend(clock=clock)
    return RedisBackend(schema.RedisBackend(url=url, timeout_ms=2000), clock_override=clock)


def spent_of(kind, backend, root, cid, lim: _core.Limits, now: int) -> int:
    if kind == "model":
        return backend.spent(cid, now)
    if kind == "memory":
        st_ = backend.states.get(cid)
        if st_ is None or st_.period_start != _core.period_bounds(now, lim.period)[0]:
            return 0
        return st_.spent
    import redis as redis_client

    r = redis_client.Redis.from_url(backend.cfg.url)
    try:
        v = r.get(backend.keyspace.cell(root, cid))  # lua/cell.lua: six doubles
    finally:
        r.close()
    if v is None:
        return 0
    ps, s = struct.unpack("<6d", v)[4:]
    if int(ps) != _core.period_bounds(now, lim.period)[0]:
        return 0
    return int(s)


programs = st.tuples(
    st.sampled_from([2_000, 4_000]),  # org total
    st.sampled_from([1_000, 6_000]),  # org per minute
    st.sampled_from([1_200, 3_000]),  # each team's total
    st.sampled_from([800, 2_500]),  # each key's total
    st.sampled_from([2, 6, 30]),  # each key's rpm
    st.lists(st.tuples(
        st.integers(0, 3),  # which key
        st.integers(0, 20_000_000),  # µs since the previous step
        st.integers(1, 400),  # estimated tokens
        st.integers(0, 800),  # actual tokens when settled
        st.booleans(),  # settle the oldest open request now
    ), min_size=5, max_size=40))

EXAMPLES = {"model": 60, "memory": 60, "redis": 20}
KINDS = ["model", "memory", pytest.param("redis", marks=pytest.mark.valkey)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hierarchy_never_admits_beyond_any_level_and_settles_every_level(kind, request):
    url = request.getfixturevalue("valkey").url if kind == "redis" else ""
    refusing_cells: set[int] = set()
    admissions = [0]

    @settings(max_examples=EXAMPLES[kind], deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(programs)
    # refusals at the org's total (cell 2), a team (1) and a key (0), then at the org's
    # minute window (3): every level is reached whatever hypothesis draws
    @example((2000, 6000, 1200, 800, 30, [(w, 0, 400, 400, False)
                                          for w in (0, 2, 1, 3, 0, 2, 1, 0)]))
    @example((4000, 1000, 3000, 2500, 30, [(w, 0, 400, 400, False) for w in (0, 2, 1)]))
    def run(program):
        org_total, org_minute, team_total, key_total, key_rpm, steps = program
        clock = ManualClock()
        org, cells, paths = tree(org_total, org_minute, team_total, key_total, key_rpm)
        keys = list(paths)
        backend = make(kind, clock, cells, url)
        # per cell: (period start -> spend) rebuilt from the history; admissions' times
        spend: dict[str, dict[int, int]] = {cid: {} for cid in cells}
        admitted_at: dict[str, list[int]] = {k: [] for k in keys}
        open_: list[tuple[str, str, object, int]] = []
        ids = itertools.count()
        admitted = refused = 0

        def apply(cid: str, now: int, amount: int, charge_start: int) -> None:
            lim = cells[cid][0]
            start = _core.period_bounds(now, lim.period)[0]
            book = spend[cid]
            if amount >= 0 or charge_start == start:
                book[start] = max(0, book.get(start, 0) + amount)

        async def settle_one(now: int) -> None:
            key, rid, out, actual = open_.pop(0)
            path = paths[key]
            target = path_deltas(path, out.charges, actual, 0)
            await backend.settle(key, target, rid, actual - out.charged_tokens, 0, 0)
            for c, (d_cost, charge_start) in zip(path.cells, target.deltas, strict=True):
                apply(c.id, now, d_cost, charge_start)

        async def main():
            nonlocal admitted, refused
            if kind != "model":
                await backend.start()
            try:
                for which, gap, est, actual, settle_now in steps:
                    clock.now += gap
                    now = clock.now
                    key = keys[which]
                    path = paths[key]
                    out = await backend.decide_path(key, path, 0, est, 0, est, False)
                    own = path.cells[0].limits  # the headers are the key's own
                    for remaining, limit in ((out.remaining_requests, own.rpm),
                                             (out.budget_remaining, own.budget)):
                        assert 0 <= remaining <= limit, out
                    if out.kind in (_core.ALLOW, _core.DOWNGRADE):
                        admitted += 1
                        admitted_at[key].append(now)
                        for c, (charged, ps) in zip(path.cells, out.charges, strict=True):
                            lim = c.limits
                            start = _core.period_bounds(now, lim.period)[0]
                            assert ps == start
                            before = spend[c.id].get(start, 0)
                            assert before + charged <= lim.budget, (
                                f"{c.id} admitted {charged} with {before} of {lim.budget} "
                                "spent in its window")
                            spend[c.id][start] = before + charged
                        open_.append((key, f"r{next(ids)}", out, actual))
                    else:
                        refused += 1
                        refusing_cells.add(out.cell)
                        assert not any(c for c, _ in out.charges)  # no cell charged
                    if settle_now and open_:
                        await settle_one(now)
                while open_:
                    await settle_one(clock.now)
                now = clock.now
                for cid, (lim, _) in cells.items():
                    start = _core.period_bounds(now, lim.period)[0]
                    assert spent_of(kind, backend, org, cid, lim, now) == \
                        spend[cid].get(start, 0), cid
                # every request settled: each level's spend is the sum of the level below
                total = {cid: spent_of(kind, backend, org, cid, cells[cid][0], now)
                         for cid in cells}
                n = org[3:]
                teams = [total[f"team-{t}{n}"] for t in "ab"]
                assert total[org] == sum(teams)
                for i, t in enumerate("ab"):
                    assert teams[i] == sum(total[f"key-{t}{k}{n}"] for k in "12")
            finally:
                if kind != "model":
                    await backend.close()

        asyncio.run(main())
        admissions[0] += admitted
        # no key's request bucket admitted more than its capacity over any interval
        for key in keys:
            times = admitted_at[key]
            for i in range(len(times)):
                for j in range(i, len(times)):
                    span = times[j] - times[i]
                    assert j - i + 1 <= key_rpm + key_rpm * span / MINUTE + 1e-9

    run()
    # the programs reached every level: keys, teams, the org's total and its minute window
    assert admissions[0] > 0 and refusing_cells >= {0, 1, 2, 3}, refusing_cells


def test_demand_beyond_the_parent_is_refused_at_the_parent():
    """Two teams' keys whose own budgets would take 4 x 1,500 tokens under an org of
    3,000: the org refuses the rest, names itself (cell 2), and no key is charged for a
    refusal; the keys' headers keep their own figures."""
    clock = ManualClock()
    org, cells, paths = tree(3_000, 10**9, 10**9, 1_500, 600)

    async def main():
        backend = MemoryBackend(clock=clock)
        outs = []
        for key in itertools.islice(itertools.cycle(paths), 8):
            outs.append((key, await backend.decide_path(key, paths[key], 0, 500, 0, 500,
                                                         False)))
        return backend, outs

    backend, outs = asyncio.run(main())
    assert [o.admitted for _, o in outs] == [True] * 6 + [False] * 2
    key, last = outs[-1]
    assert (last.kind, last.cell) == (_core.DENY_BUDGET, 2)  # key, team, ORG
    assert last.budget_limit == 1_500 and last.budget_remaining == 1_000  # its own figures
    assert backend.states[org].spent == 3_000
    assert sum(backend.states[k].spent for k in paths) == 3_000


def test_a_settlement_moves_the_cells_it_was_charged_on():
    """The reservation's path, not the policy's: a path settled after it was replaced
    still moves the cells the charge went to."""
    clock = ManualClock()
    org, cells, paths = tree(10**6, 10**6, 10**6, 10**6, 600)
    key = next(iter(paths))

    async def main():
        backend = MemoryBackend(clock=clock)
        out = await backend.decide_path(key, paths[key], 0, 100, 0, 100, False)
        settled = PathSettlement(paths[key], path_deltas(paths[key], out.charges, 250,
                                                          0).deltas)
        assert (await backend.settle(key, settled, "r1", 150, 0, 0)).applied
        assert not (await backend.settle(key, settled, "r1", 150, 0, 0)).applied
        return backend

    backend = asyncio.run(main())
    assert [backend.states[c.id].spent for c in paths[key].cells] == [250] * 4
