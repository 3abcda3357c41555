"""Settlements queued in one loop tick go to a real Valkey as one settle_batch.lua call
(sidecar/backends/settle_batch.py): each settles exactly as settle.lua alone would,
idempotently, one bad key fails only its own settlement, and a lost script cache is
reloaded."""
from __future__ import annotations

import asyncio

import pytest
import redis

from sidecar.backends.base import BackendError
from sidecar.backends.redis import RedisBackend
from sidecar.policy.load import parse_policy
from tests.support.valkey import Valkey

POLICY = """
tiers: [{name: default, model: gpt-4o}]
pricing: {gpt-4o: {input: 0.0025, output: 0.01}}
defaults:
  limits: {rpm: 1000, tpm: 1000000}
  budget: {tokens: 1000000, period: day}
backend: {kind: redis, url: "%s", timeout_ms: 2000}
"""


@pytest.fixture
def backend(own_valkey: Valkey):
    pol = parse_policy((POLICY % own_valkey.url).encode(), "<test>")
    return RedisBackend(pol.backend), pol, own_valkey


def spent(v: Valkey, backend: RedisBackend, tenant: str) -> int:
    r = redis.Redis.from_url(v.url)
    try:
        return int(r.hget(backend.keys(tenant)[2], "s") or 0)
    finally:
        r.close()


def test_concurrent_settlements_go_as_one_call_and_each_applies_once(backend):
    b, pol, v = backend
    limits = pol.rule_for("a").limits

    async def run():
        await b.start()
        try:
            first = await asyncio.gather(*(
                b.settle(t, limits, f"id-{i}", 10 + i, 10 + i, -1)
                for i, t in enumerate(["a"] * 30 + ["b"] * 20)))
            again = await asyncio.gather(*(  # repeated ids: no-ops, in the same kind of batch
                b.settle("a", limits, f"id-{i}", 1000, 1000, -1) for i in range(5)))
            return first, again, b.settlements.batches
        finally:
            await b.close()

    first, again, batches = asyncio.run(run())
    assert batches == 2  # 50 settlements, then 5 repeats: one script call each
    assert all(s.applied for s in first) and not any(s.applied for s in again)
    assert spent(v, b, "a") == sum(10 + i for i in range(30))
    assert spent(v, b, "b") == sum(10 + i for i in range(30, 50))
    # the reply of each is its own tenant's spend after it, in the order given
    assert [s.budget_spent for s in first[:3]] == [10, 21, 33]


def test_one_bad_key_fails_only_its_own_settlement(backend):
    b, pol, v = backend
    limits = pol.rule_for("good").limits
    r = redis.Redis.from_url(v.url)
    r.set(b.keys("bad")[2], "not a hash")  # the budget key of "bad" has the wrong type
    r.close()

    async def run():
        await b.start()
        try:
            return await asyncio.gather(
                b.settle("good", limits, "g1", 5, 5, -1), b.settle("bad", limits, "b1", 5, 5, -1),
                b.settle("good", limits, "g2", 7, 7, -1), return_exceptions=True)
        finally:
            await b.close()

    good1, bad, good2 = asyncio.run(run())
    assert isinstance(bad, BackendError) and "WRONGTYPE" in str(bad)
    assert good1.applied and good2.applied and good2.budget_spent == 12
    assert spent(v, b, "good") == 12


def test_a_lost_script_cache_is_reloaded(backend):
    b, pol, v = backend
    limits = pol.rule_for("a").limits

    async def run():
        await b.start()
        try:
            await b.settle("a", limits, "before", 3, 3, -1)
            r = redis.Redis.from_url(v.url)
            r.script_flush()
            r.close()
            return await asyncio.gather(*(b.settle("a", limits, f"after-{i}", 4, 4, -1)
                                          for i in range(3)))
        finally:
            await b.close()

    after = asyncio.run(run())
    assert all(s.applied for s in after)
    assert spent(v, b, "a") == 3 + 12
