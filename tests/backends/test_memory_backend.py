"""Embedded backend durability and policy hot reload."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from sidecar import _core
from sidecar.backends.base import BackendError
from sidecar.backends.memory import MemoryBackend
from sidecar.policy.load import load_policy
from sidecar.server import ServerConfig, Sidecar
from tests.support.clock import T0_US, ManualClock

LIMITS = _core.Limits(budget=1000, period=_core.P_MONTH)


def run(coro):
    return asyncio.run(coro)


def test_spend_survives_a_restart(tmp_path):
    state = str(tmp_path / "spend.json")
    clock = ManualClock()

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
        b = MemoryBackend(state_file=state, flush_interval_s=0.05, clock=ManualClock())
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
    with pytest.raises(BackendError, match="refusing to start rather than reset spend"):
        run(MemoryBackend(state_file=str(state)).start())
    assert state.read_text() == content  # untouched


def test_settle_is_idempotent_per_request_id():
    async def main():
        b = MemoryBackend(clock=ManualClock())
        out = await b.decide("t", LIMITS, 0, 0, 100, 100, False)
        start = _core.period_bounds(ManualClock()(), _core.P_MONTH)[0]
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
    # the test's ten seconds stay inside one month, whatever the suite's fixed instant
    clock = ManualClock(T0_US - T0_US % 86_400_000_000 + 3_600_000_000)
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


# --- the state file: refused when unusable, never a traceback, never a silent reset ----
def test_an_unwritable_state_file_refuses_to_start(tmp_path):
    # issue 11/14: `kt serve` reported ready, logged an error every second and persisted
    # nothing. A path under a regular file cannot be written, even by root.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    backend = MemoryBackend(state_file=str(blocker / "spend.json"))
    with pytest.raises(BackendError, match="cannot write there"):
        run(backend.start())


def kt_serve(tmp_path, state_file: str) -> subprocess.CompletedProcess:
    """`kt serve` with the sample policy; it must exit at once (a timeout is a failure)."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "serve", "--grpc", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--state-file", state_file],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.subprocess
def test_kt_serve_with_an_unwritable_state_file_exits_with_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    res = kt_serve(tmp_path, str(tmp_path / "file" / "spend.json"))
    assert res.returncode == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("kt serve: backend: state file ") and "cannot write" in lines[0]


BAD_SPEND = [
    ("spent", -5, "-5"), ("spent", 2.5, "2.5"), ("spent", True, "true"),
    ("spent", "100", '"100"'), ("spent", float("inf"), "Infinity"),
    ("spent", 1e30, "1e+30"), ("spent", None, "null"),
    ("period_start", "x", '"x"'), ("period_start", 1.5, "1.5"),
    ("period_start", False, "false"), ("period_start", -1, "-1"),
]


@pytest.mark.parametrize("field,value,shown", BAD_SPEND)
def test_a_state_file_value_that_is_not_a_spend_names_file_tenant_and_field(
        tmp_path, field, value, shown):
    state = tmp_path / "spend.json"
    rec = {"period_start": 1_793_491_200_000_000, "spent": 100}
    rec[field] = value
    state.write_text(json.dumps({"version": 1, "tenants": {"good": {"period_start": 0,
                                                                    "spent": 1},
                                                           "acme": rec}}))
    before = state.read_text()
    with pytest.raises(BackendError) as info:
        run(MemoryBackend(state_file=str(state)).start())
    message = str(info.value)
    assert str(state) in message and "'acme'" in message and field in message, message
    assert shown in message and "refusing to start" in message
    assert state.read_text() == before  # untouched


@pytest.mark.subprocess
def test_kt_serve_with_a_state_file_holding_infinity_exits_with_one_line(tmp_path):
    # Infinity or 1e30 used to exit with a traceback (int(inf): OverflowError)
    state = tmp_path / "spend.json"
    state.write_text('{"version": 1, "tenants": {"acme": {"period_start": 0, '
                     '"spent": Infinity}}}')
    res = kt_serve(tmp_path, str(state))
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'acme'" in lines[0] and "spent" in lines[0], res.stderr


def test_a_snapshot_left_half_written_by_a_crash_is_removed_at_start(tmp_path):
    state = tmp_path / "spend.json"
    left = tmp_path / ".spend.json.tmp-abc123"
    left.write_text('{"version":2,"tenants":{"t":')
    other = tmp_path / ".other.json.tmp-abc123"  # another file's: not ours to remove
    other.write_text("{")

    async def start_and_stop():
        b = MemoryBackend(state_file=str(state))
        await b.start()
        await b.close()

    run(start_and_stop())
    assert not left.exists() and other.exists()


def test_a_version_1_state_file_still_loads(tmp_path):
    state = tmp_path / "spend.json"
    start = _core.period_bounds(ManualClock()(), _core.P_MONTH)[0]
    state.write_text(json.dumps({"version": 1, "written_at_us": 1, "tenants": {
        "t": {"period_start": start, "spent": 900}}}))

    async def main():
        b = MemoryBackend(state_file=str(state), clock=ManualClock())
        await b.start()
        try:
            return [await b.decide("t", LIMITS, 0, 0, 60, 60, False) for _ in range(2)]
        finally:
            await b.close()

    first, second = run(main())
    assert first.admitted and first.budget_remaining == 40
    assert second.kind == _core.DENY_BUDGET
    doc = json.loads(state.read_text())
    assert doc["version"] == 2 and doc["tenants"]["t"]["spent"] == 960


def test_a_state_file_that_becomes_unwritable_fails_readiness_and_is_counted(tmp_path):
    from sidecar.metrics import Metrics

    directory = tmp_path / "state"
    state = directory / "spend.json"
    metrics = Metrics()

    async def main():
        b = MemoryBackend(state_file=str(state), flush_interval_s=0.02, clock=ManualClock())
        metrics.watch_backend(b)
        await b.start()
        try:
            await b.decide("t", LIMITS, 0, 0, 100, 100, False)
            await b.flush()
            assert b.status().ready
            shutil.rmtree(directory)
            directory.write_text("now a file")  # nothing can be created in it any more
            await b.decide("t", LIMITS, 0, 0, 100, 100, False)
            for _ in range(250):
                if not b.status().ready:
                    break
                await asyncio.sleep(0.02)
            down = b.status()
            failures = metrics.registry.get_sample_value(
                "kt_state_write_failures_total", {"what": "snapshot"})
            directory.unlink()
            directory.mkdir()  # writable again: the next snapshot writes everything
            for _ in range(250):
                if b.status().ready:
                    break
                await asyncio.sleep(0.02)
            return down, failures, b.status()
        finally:
            await b.close()

    down, failures, up = run(main())
    assert not down.ready and "cannot write state file" in down.detail
    assert failures >= 1
    assert up.ready
    assert json.loads(state.read_text())["tenants"]["t"]["spent"] == 200


def test_a_usage_report_the_journal_cannot_hold_is_refused_not_acknowledged(tmp_path):
    # the journal's next segment is /dev/full: every write fails (ENOSPC), even for root
    state = tmp_path / "spend.json"
    segment = tmp_path / "spend.json.journal.1"

    async def main():
        b = MemoryBackend(state_file=str(state), clock=ManualClock())
        await b.start()
        try:
            segment.unlink()
            segment.symlink_to("/dev/full")
            b._files._broken = True  # as after a failed write: the next one opens a segment
            with pytest.raises(BackendError, match="not recorded durably"):
                await b.settle("t", LIMITS, "r-1", 10, 10, -1)
            return b.status(), b.write_failures["journal"]
        finally:
            segment.unlink()  # the disk has room again: the journal catches up on close
            await b.close()

    status, failures = run(main())
    assert not status.ready and "journal" in status.detail and failures >= 1
    assert ('"t","r-1"' in segment.read_text())  # written once the disk had room


def test_settlement_is_idempotent_per_tenant_and_request_id():
    # issue 12: idempotency was global, so another tenant's request id (or one of one's
    # own requests reusing it) made a settlement a no-op: keyed by (tenant, id) now
    async def main():
        b = MemoryBackend(clock=ManualClock())
        start = _core.period_bounds(ManualClock()(), _core.P_MONTH)[0]
        first = await b.settle("a", LIMITS, "same-id", 50, 50, start)
        other = await b.settle("b", LIMITS, "same-id", 70, 70, start)
        again = await b.settle("a", LIMITS, "same-id", 50, 50, start)
        return first, other, again

    first, other, again = run(main())
    assert first.applied and first.budget_spent == 50
    assert other.applied and other.budget_spent == 70
    assert not again.applied and again.budget_spent == 50


def test_settled_ids_and_spend_survive_a_restart_without_a_snapshot(tmp_path):
    # the journal alone (no snapshot since) brings back both the spend and the ids
    state = tmp_path / "spend.json"
    start = _core.period_bounds(ManualClock()(), _core.P_MONTH)[0]

    async def first_life():
        b = MemoryBackend(state_file=str(state), flush_interval_s=3600, clock=ManualClock())
        await b.start()
        for i in range(20):
            assert (await b.settle("t", LIMITS, f"r-{i}", 10, 10, start)).applied
        # no close(): as after a SIGKILL, nothing but the journal was written
        b._flusher.cancel()

    async def second_life():
        b = MemoryBackend(state_file=str(state), clock=ManualClock())
        await b.start()
        try:
            again = [await b.settle("t", LIMITS, f"r-{i}", 10, 10, start) for i in range(20)]
            fresh = await b.settle("t", LIMITS, "r-new", 10, 10, start)
            return again, fresh
        finally:
            await b.close()

    run(first_life())
    assert not state.exists()
    again, fresh = run(second_life())
    assert [s.applied for s in again] == [False] * 20
    assert fresh.applied and fresh.budget_spent == 210


def test_a_torn_last_journal_record_is_ignored_but_a_bad_one_inside_is_refused(tmp_path):
    state = tmp_path / "spend.json"
    segment = tmp_path / "spend.json.journal.1"
    segment.write_bytes(b'[1,"t","r-1",0,10]\n[2,"t","r-2",0,2')  # a crash mid-write

    async def load():
        b = MemoryBackend(state_file=str(state), clock=ManualClock())
        await b.start()
        await b.close()
        return b

    b = run(load())
    assert ("t", "r-1") in b.settled and ("t", "r-2") not in b.settled
    segment.write_bytes(b'[1,"t","r-1",0,10]\n[2,"t","r-2",0,Infinity]\n[3,"t","r-3",0,10]\n')
    with pytest.raises(BackendError, match=r"line 2: tenant 't': spent must be an integer"):
        run(load())


def test_a_snapshot_does_not_stop_decisions(tmp_path):
    # the snapshot of 100,000 tenants is written by a thread while the event loop keeps
    # deciding: decisions complete while it is under way (on the loop, none could)
    state = tmp_path / "spend.json"

    async def main():
        b = MemoryBackend(state_file=str(state), flush_interval_s=3600, clock=ManualClock())
        await b.start()
        try:
            for i in range(100_000):
                b.decide_now(f"t-{i}", LIMITS, 0, 0, 1, 1, False)
            writing = asyncio.ensure_future(b.flush())
            await asyncio.sleep(0)  # the snapshot job is handed to its thread
            during = 0
            while not writing.done():
                await b.decide("busy", LIMITS, 0, 0, 1, 1, False)
                during += 1
                await asyncio.sleep(0)
            await writing
            return during, b.snapshot_tenants
        finally:
            await b.close()

    during, written = run(main())
    assert written == 100_000
    assert during > 0
    assert len(json.loads(state.read_text())["tenants"]) == 100_001


REPORTS_POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
defaults:
  limits: {rpm: 100000, tpm: 100000000}
  budget: {tokens: 100000000, period: month}
backend: {kind: memory}
"""


@pytest.mark.subprocess
def test_acknowledged_usage_reports_are_not_applied_again_after_a_sigkill(tmp_path):
    # issue 11: after a SIGKILL of the embedded sidecar, 200 of 200 acknowledged usage
    # reports were applied again (the settled ids lived only in memory). A report is
    # acknowledged once its journal record is on disk, with its (tenant, request id).
    from tests.support.procs import SidecarProcess, post_json

    policy = tmp_path / "policy.yaml"
    policy.write_text(REPORTS_POLICY)

    def report(sc: SidecarProcess, i: int) -> dict:
        status, ack = post_json(f"http://127.0.0.1:{sc.admin_port}/v1/usage", {
            "request_id": f"report-{i}", "tenant": "acme", "model": "gpt-4o",
            "input_tokens": 7, "output_tokens": 3})
        assert status == 200, ack
        return ack

    sc = SidecarProcess(policy, tmp_path).start()
    try:
        first = [report(sc, i) for i in range(200)]
    finally:
        sc.proc.kill()  # SIGKILL: no shutdown flush
        sc.proc.wait(10)
    assert all(a["applied"] for a in first)
    sc = SidecarProcess(policy, tmp_path).start()
    try:
        replayed = [report(sc, i) for i in range(200)]
        fresh = report(sc, 200)
    finally:
        sc.stop()
    assert sum(a["applied"] for a in replayed) == 0  # was 200
    assert fresh["applied"]
    # the 200 reports' spend survived the SIGKILL (the journal), counted once, plus the new one
    assert json.loads((tmp_path / "spend.json").read_text())["tenants"]["acme"]["spent"] == 2010


def test_tenants_the_policy_does_not_name_are_held_up_to_a_cap(tmp_path):
    """`unknown: defaults` lets a client invent tenant ids, and every one with spend this
    period is a budget the embedded backend must keep: past `backend.max_tenants`, a new
    name is refused (403, counted), while names held already and the policy's own tenants
    go on being decided."""
    import asyncio
    import json

    from sidecar.model import Kind, Request
    from sidecar.policy.load import parse_policy
    from sidecar.service import DecisionService

    policy = parse_policy(b"""
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
pricing: {gpt-4o: {input: 2.5, output: 10}}
defaults:
  limits: {rpm: 100, tpm: 100000}
  budget: {usd: 10, period: month}
tenants:
  named: {limits: {rpm: 100, tpm: 100000}}
backend: {kind: memory, state_file: "", max_tenants: 1000}
""", "<test>")
    backend = MemoryBackend(clock=ManualClock(), max_tenants=policy.backend.max_tenants)
    svc = DecisionService(policy, backend)
    body = json.dumps({"model": "gpt-4o", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def ask(tenant: str):
        return await svc.decide(Request(headers={"x-tenant-id": tenant}, body=body))

    async def main():
        admitted = [await ask(f"rnd-{i}") for i in range(1000)]
        assert all(d.kind is Kind.ALLOW for d in admitted)  # each spent budget: all kept
        refused = await ask("rnd-new")
        assert refused.kind is Kind.UNKNOWN_TENANT and "capacity" in refused.message
        assert (await ask("rnd-5")).kind is Kind.ALLOW  # held already
        assert (await ask("named")).kind is Kind.ALLOW  # the policy's own
        assert len(backend.states) <= 1001

    asyncio.run(main())
    refusals = svc.metrics.registry.get_sample_value("kt_tenant_capacity_refusals_total")
    assert refusals == 1.0

