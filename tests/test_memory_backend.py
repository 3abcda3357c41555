"""Embedded backend durability and policy hot reload."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from sidecar import _core
from sidecar.backends.base import BackendError
from sidecar.backends.memory import MemoryBackend
from sidecar.policy.load import load_policy
from sidecar.server import ServerConfig, Sidecar
from tests.inproc import FakeClock

LIMITS = _core.Limits(budget=1000, period=_core.P_MONTH)


def run(coro):
    return asyncio.run(coro)


def test_spend_survives_a_restart(tmp_path):
    state = str(tmp_path / "spend.json")
    clock = FakeClock()

    async def first_life():
        b = MemoryBackend(state_file=state, clock=clock)
        await b.start()
        for _ in range(3):
            assert (await b.decide("t", LIMITS, 0, 0, 300, 300, False)).admitted
        await b.close()  # a clean shutdown flushes

    async def second_life():
        b = MemoryBackend(state_file=state, clock=clock)
        await b.start()
        out = await b.decide("t", LIMITS, 0, 0, 300, 300, False)
        await b.close()
        return out

    run(first_life())
    assert json.load(open(state))["tenants"]["t"]["spent"] == 900
    out = run(second_life())
    assert out.kind == _core.DENY_BUDGET and out.budget_remaining == 100


def test_spend_is_flushed_on_the_interval_without_shutdown(tmp_path):
    state = str(tmp_path / "spend.json")

    async def main():
        b = MemoryBackend(state_file=state, flush_interval_s=0.05, clock=FakeClock())
        await b.start()
        await b.decide("t", LIMITS, 0, 0, 250, 250, False)
        for _ in range(100):  # poll with a deadline, never a fixed sleep
            if os.path.exists(state):
                break
            await asyncio.sleep(0.02)
        doc = json.load(open(state))
        await b.close()
        return doc

    assert run(main())["tenants"]["t"]["spent"] == 250


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "tenants": {}}',
                                     '{"version": 1, "tenants": {"t": {"spent": "x"}}}'])
def test_a_corrupt_state_file_refuses_to_start_rather_than_reset_spend(tmp_path, content):
    state = tmp_path / "spend.json"
    state.write_text(content)
    with pytest.raises(BackendError, match="move it aside"):
        run(MemoryBackend(state_file=str(state)).start())
    assert state.read_text() == content  # untouched


def test_settle_is_idempotent_per_request_id():
    async def main():
        b = MemoryBackend(clock=FakeClock())
        out = await b.decide("t", LIMITS, 0, 0, 100, 100, False)
        start = _core.period_bounds(FakeClock()(), _core.P_MONTH)[0]
        s1 = await b.settle("t", LIMITS, "req-1", 50, 50, start)
        s2 = await b.settle("t", LIMITS, "req-1", 50, 50, start)
        return out, s1, s2

    out, s1, s2 = run(main())
    assert out.charged_cost == 100
    assert s1.applied and s1.budget_spent == 150
    assert not s2.applied and s2.budget_spent == 150


GOOD = """
tiers: [{name: default, model: gpt-4o}]
defaults: {limits: {rpm: 5}}
"""


def test_hot_reload_takes_a_good_policy_and_keeps_serving_on_a_bad_one(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    sc = Sidecar(ServerConfig(policy_path=str(path)), backend=MemoryBackend())
    assert sc.policy.defaults.limits.rpm == 5
    path.write_text(GOOD.replace("rpm: 5", "rpm: 7"))
    os.utime(path, ns=(1, 1))  # force a new stamp even within one mtime tick
    assert sc.reload_if_changed()
    assert sc.service.policy.defaults.limits.rpm == 7
    path.write_text("tiers: [")
    os.utime(path, ns=(2, 2))
    assert not sc.reload_if_changed()
    assert sc.service.policy.defaults.limits.rpm == 7
    errors = sc.metrics.registry.get_sample_value("kt_policy_reloads_total", {"result": "error"})
    assert errors == 1.0


def test_hot_reload_follows_a_configmap_style_symlink_swap(tmp_path):
    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(GOOD)
    v2.write_text(GOOD.replace("rpm: 5", "rpm: 9"))
    link = tmp_path / "policy.yaml"
    link.symlink_to(v1)
    sc = Sidecar(ServerConfig(policy_path=str(link)), backend=MemoryBackend())
    tmp_link = tmp_path / "policy.yaml.new"
    tmp_link.symlink_to(v2)
    os.replace(tmp_link, link)  # the atomic swap kubelet does
    assert sc.reload_if_changed()
    assert sc.service.policy.defaults.limits.rpm == 9
    assert load_policy(link).digest == sc.service.policy.digest


def test_random_tenant_names_do_not_grow_memory_without_bound_and_spend_is_kept():
    # `unknown: defaults` lets a client invent tenant names: states at rest are dropped
    clock = FakeClock()
    backend = MemoryBackend(clock=clock, sweep_at=50)
    rate_only = _core.Limits(rpm=60, tpm=6000)
    with_budget = _core.Limits(rpm=60, budget=1000, period=_core.P_MONTH)
    for i in range(5):  # these spend budget this month: never dropped
        out = backend.decide_now(f"payer-{i}", with_budget, 0, 100, 0, 100, False)
        assert out.charged_tokens == 100
    for i in range(1000):
        backend.decide_now(f"random-{i}", rate_only, 0, 10, 0, 10, False)
        clock.advance(0.01)  # one request per name, then 10 s of refill for the lot
    # kept: at most twice the states not at rest (the ~100 names of the last second,
    # whose buckets are still refilling, and the payers), never the 1,005 names seen
    assert len(backend.states) <= 2 * (100 + 5) + 1, len(backend.states)
    assert backend.states_dropped >= 1000 - 2 * (100 + 5)
    # a dropped name starts again exactly where a fresh state would: a full bucket
    again = backend.decide_now("random-0", rate_only, 0, 10, 0, 10, False)
    assert (again.remaining_requests, again.remaining_tokens) == (59, 5990)
    # the payers' spend survived every sweep
    for i in range(5):
        out = backend.decide_now(f"payer-{i}", with_budget, 0, 100, 0, 100, False)
        assert out.budget_remaining == 800
