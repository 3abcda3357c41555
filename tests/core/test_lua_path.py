"""decide_path.lua and settle_path.lua (Redis backend) against the reference model, on a
real Valkey: random paths of cells (a holder, its windows, its parents) and random
request sequences, every outcome field, each cell's charge and stored state equal to the
model's; batched and one by one; and a path's keys in one slot."""
from __future__ import annotations

import asyncio
import itertools
import math
import struct

import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.backends.redis import RedisBackend
from sidecar.policy import schema
from sidecar.policy.holders import HolderPath, PathCell, PathSettlement
from tests.core import reference_model as ref
from tests.core.test_core_reference import requests, to_core
from tests.core.test_path_core import PATH_FIELDS, paths
from tests.support.clock import ManualClock

_trees = itertools.count()


def holder_path(cells: list[ref.Limits]) -> HolderPath:
    """A tree of its own per example: the root's own cell is the last, the others are
    cells of holders below it."""
    root = f"root-{next(_trees)}"
    ids = [f"c{i}-{root}" for i in range(len(cells) - 1)] + [root]
    return HolderPath(root, tuple(PathCell(id=i, holder=i, label="", unit="",
                                           limits=to_core(lim))
                                  for i, lim in zip(ids, cells, strict=True)))


def cell_state(r: redis.Redis, key: str) -> tuple[float, float, int, int]:
    """(request level, token level, period start, spent) of a stored cell (lua/cell.lua);
    absent: never used (full buckets, no period)."""
    v = r.get(key)
    if v is None:
        return math.inf, math.inf, -1, 0
    req, _, tok, _, ps, spent = struct.unpack("<6d", v)
    return req, tok, int(ps), int(spent)


def stored(r: redis.Redis, backend: RedisBackend, path: HolderPath) -> list[tuple]:
    out = []
    for c in path.cells:
        req, tok, _, spent = cell_state(r, backend.keyspace.cell(path.root, c.id))
        out.append((req, tok, spent))
    return out


def check_states(r, backend, path, cells, model) -> None:
    for lim, (_, st_), (req_l, tok_l, spent) in zip(cells, model, stored(r, backend, path),
                                                     strict=True):
        if lim.rpm > 0:
            assert req_l == st_.req_level
        if lim.tpm > 0:
            assert tok_l == st_.tok_level
        if lim.budget >= 0:
            assert spent == st_.spent


def run_path(valkey, cells: list[ref.Limits], seq, batched: bool, adjustments=()) -> None:
    clock = ManualClock()
    times = []
    for gap, *_ in seq:
        clock.now += gap
        times.append(clock.now)
    now_of = iter(times).__next__ if batched else clock
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=now_of)
    path = holder_path(cells)
    model = [(lim, ref.State()) for lim in cells]
    r = redis.Redis.from_url(valkey.url)

    async def main():
        await backend.start()
        try:
            calls, wants = [], []
            clock.now = times[0] - seq[0][0]
            for (_, tier, inp, out, firm_out, shadow), at in zip(seq, times, strict=True):
                tier = min(tier, len(cells[0].prices) - 1)
                firm = inp + (out if firm_out else 0)
                wants.append(ref.decide_path(model, at, tier, inp, out, firm, shadow))
                call = backend.decide_path("t", path, tier, inp, out, firm, shadow)
                if batched:
                    calls.append(call)
                else:
                    clock.now = at
                    got = await call
                    want = wants[-1]
                    for name in PATH_FIELDS:
                        assert getattr(got, name) == getattr(want, name), (name, got, want)
                    assert got.charges == want.charges
                    check_states(r, backend, path, cells, model)
            if batched:
                for got, want in zip(await asyncio.gather(*calls), wants, strict=True):
                    for name in PATH_FIELDS:
                        assert getattr(got, name) == getattr(want, name), (name, got, want)
                    assert got.charges == want.charges
                check_states(r, backend, path, cells, model)
            for i, (gap, d_tokens, d_cost) in enumerate(adjustments):
                clock.now += gap
                deltas = tuple((d_cost, ref.lim_bounds(lim, clock.now)[0])
                               for lim in cells)
                want = ref.settle_path(model, clock.now, d_tokens, list(deltas))
                target = PathSettlement(path, deltas)
                got = await backend.settle(path.root, target, f"req-{i}", d_tokens, 0, 0)
                assert got.applied and got.budget_spent == want[0]
                again = await backend.settle(path.root, target, f"req-{i}", d_tokens, 0, 0)
                assert not again.applied  # once per request id
                check_states(r, backend, path, cells, model)
        finally:
            await backend.close()

    asyncio.run(main())
    r.close()


@settings(max_examples=20, deadline=None)
@given(paths(min_cells=2), requests)
def test_decide_path_lua_matches_reference_model(valkey, cells, seq):
    run_path(valkey, cells, seq, batched=False)


@settings(max_examples=20, deadline=None)
@given(paths(min_cells=1), requests)
def test_decide_path_batch_lua_matches_reference_model_in_queue_order(valkey, cells, seq):
    run_path(valkey, cells, seq, batched=True)


@settings(max_examples=25, deadline=None)
@given(paths(min_cells=2), requests,
       st.lists(st.tuples(st.integers(0, 90_000_000), st.integers(-3000, 3000),
                          st.integers(-3000, 3000)), min_size=1, max_size=8))
def test_settle_path_lua_matches_reference_model(valkey, cells, seq, adjustments):
    run_path(valkey, cells, seq, batched=False, adjustments=adjustments)


def test_a_trees_keys_share_the_roots_slot(valkey):
    backend = RedisBackend(schema.RedisBackend(url=valkey.url))
    path = holder_path([ref.Limits(rpm=1), ref.Limits(budget=5), ref.Limits(tpm=9)])
    keys = [backend.keyspace.cell(path.root, c.id) for c in path.cells]
    r = redis.Redis.from_url(valkey.url)
    assert len(set(keys)) == 3
    assert len({r.execute_command("CLUSTER", "KEYSLOT", k) for k in keys}) == 1
    r.close()


def test_a_cell_with_a_period_expires_a_day_after_it_and_a_total_one_never(valkey):
    clock = ManualClock()
    backend = RedisBackend(schema.RedisBackend(url=valkey.url, timeout_ms=2000),
                           clock_override=clock)
    path = holder_path([ref.Limits(rpm=60), ref.Limits(budget=500, period=ref.P_DAY),
                        ref.Limits(budget=500, period=ref.P_TOTAL)])

    async def main():
        await backend.start()
        try:
            assert (await backend.decide_path("t", path, 0, 10, 10, 20, False)).kind == 0
        finally:
            await backend.close()

    asyncio.run(main())
    r = redis.Redis.from_url(valkey.url)
    bucket, day, total = (backend.keyspace.cell(path.root, c.id) for c in path.cells)
    assert 0 < r.pttl(bucket) <= 1000 + 1000  # full again in 1 s (+1 s)
    day_end_ms = (clock.now // 86_400_000_000 + 1) * 86_400_000 + 86_400_000
    assert 0 <= (day_end_ms - clock.now // 1000) - r.pttl(day) < 5000
    assert r.pttl(total) == -1
    assert cell_state(r, total)[3] == 20
    r.close()
