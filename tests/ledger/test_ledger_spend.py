"""Durable, fleet-wide spend (issue 15 item 1): actual tokens and cost per tenant, model
and day, kept where the budget lives, written by the same atomic settlement that corrects
the budget; `/v1/spend` answers any period for every tenant (no `_other`) from any
replica, and survives a restart. Same tests on both backends."""
from __future__ import annotations

import contextlib
import json
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import pytest

from sidecar.backends.memory import MemoryBackend
from sidecar.backends.redis import RedisBackend
from sidecar.model import Kind, Request
from sidecar.policy.load import parse_policy
from tests.support.clock import T0_US, ManualClock, utc_day, utc_month
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_CACHE_PRICING
from tests.support.procs import workdir
from tests.support.valkey import Valkey

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_CACHE_PRICING + """defaults:
  limits: {rpm: 10000, tpm: 100000000}
  budget: {usd: 100, period: month}
tenants:
  acme:
    limits: {rpm: 10000, tpm: 100000000}
    budget: {usd: 100, period: month}
%s
"""
DAY_S = 86400


BODY = json.dumps({"model": "gpt-4o", "max_tokens": 500,
                   "messages": [{"role": "user", "content": "x" * 396}]}).encode()
BODY_INPUT = -(-len(BODY) // 4)  # its input tokens: the body's bytes / 4


def decide(sc, tenant: str, request_id: str):
    body = BODY
    out = sc.run(sc.sidecar.service.decide(Request(headers={"x-tenant-id": tenant}, body=body,
                                                   request_id=request_id)))
    assert out.kind is Kind.ALLOW
    return out


def spend(sc, query: str = "") -> dict:
    with urllib.request.urlopen(f"{sc.admin_base}/v1/spend{query}", timeout=10) as r:
        return json.load(r)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.valkey)])
def two(request, tmp_path):
    """Two sidecars on one store (redis: two replicas on one Valkey; memory: one sidecar
    twice, restarted on its state file), sharing a fake clock."""
    clock = ManualClock()
    with ExitStack() as stack:
        if request.param == "redis":
            d = stack.enter_context(workdir())
            v = stack.enter_context(Valkey(d))
            text = POLICY % f'backend: {{kind: redis, url: "{v.url}", timeout_ms: 500}}'
            pol = parse_policy(text.encode(), "<test>")

            def make():
                return RunningSidecar(text, backend=RedisBackend(pol.backend,
                                                                 clock_override=clock),
                                      clock=clock)
        else:
            text = POLICY % ""
            state = str(tmp_path / "spend.json")

            def make():
                return RunningSidecar(text, backend=MemoryBackend(state_file=state, clock=clock),
                                      clock=clock)
        yield request.param, make, clock


def test_spend_per_day_and_model_for_every_tenant_from_any_replica(two):
    kind, make, clock = two
    with make() as a:
        r1 = decide(a, "acme", "r1").reservation_id  # the id the sidecar made
        a.run(a.sidecar.service.settle_usage(r1, None, "gpt-4o", 1000, 200, "ext_proc",
                                             cached_tokens=600))
        a.run(a.sidecar.service.settle_usage("rep-1", "someone-new", "gpt-4o-mini", 5000, 700,
                                             "report"))
        clock.advance(DAY_S)  # the next UTC day
        r2 = decide(a, "acme", "r2").reservation_id
        # the client left: charged at its bound (its input, max_tokens 500); a report
        # arriving after it changes nothing (the bound was settled under its id, once)
        a.run(a.sidecar.service.charge_unread(r2, "abandoned"))
        assert not a.run(a.sidecar.service.settle_usage(r2, "acme", "gpt-4o", 10, 10,
                                                        "report")).applied
        spent_a = a.run(_spent(a, "acme"))
    with make() as b:  # another replica (redis) / the same sidecar restarted (memory)
        doc = spend(b)
        assert b.run(_spent(b, "acme")) == spent_a
        by_day = spend(b, "?period=day")["tenants"]["acme"]
        # the months of both days (the second may be the next month, or year)
        month = spend(b, f"?period=month&since={utc_day(T0_US)}&until={utc_day(T0_US, 1)}")
        since = spend(b, f"?since={utc_day(T0_US, 1)}")
    acme = doc["tenants"]["acme"]["gpt-4o"]
    first = 400 * 2500 + 600 * 1250 + 200 * 10000
    assert (acme["requests"], acme["input_tokens"], acme["output_tokens"],
            acme["cached_tokens"]) == (2, 1000 + BODY_INPUT, 200 + 500, 600)
    # the bound counts as spend; the budget holds the spend of its period (the second
    # day's month: both days' when they share a month, the second's alone when a month
    # ends)
    second_month = utc_month(T0_US + DAY_S * 1_000_000)
    same_month = utc_month(T0_US) == second_month
    assert acme["cost_nano_usd"] == first + BODY_INPUT * 2500 + 500 * 10000
    assert acme["cost_nano_usd"] == (spent_a if same_month else first + spent_a)
    # every tenant by name, none folded into _other
    assert doc["tenants"]["someone-new"]["gpt-4o-mini"]["cost_nano_usd"] == 5000 * 150 + 700 * 600
    assert "_other" not in doc["tenants"]
    # by day: the first day holds only r1's usage
    assert sorted(by_day) == [utc_day(T0_US), utc_day(T0_US, 1)]
    assert by_day[utc_day(T0_US)]["gpt-4o"]["cost_nano_usd"] == first
    by_month = month["tenants"]["acme"]
    assert set(by_month) == {utc_month(T0_US), second_month}
    assert by_month[second_month]["gpt-4o"]["cost_nano_usd"] == spent_a
    assert since["tenants"]["acme"]["gpt-4o"]["requests"] == 1  # r2, charged at its bound


async def _spent(sc, tenant: str) -> int:
    """What the tenant's budget holds this period (a zero-cost decision reads it)."""
    svc = sc.sidecar.service
    rule = svc.policy.rule_for(tenant)
    out = await svc.backend.decide(tenant, rule.limits, 0, 0, 0, 0, False)
    return out.budget_limit - out.budget_remaining


def test_a_repeated_settlement_adds_no_spend(two):
    kind, make, clock = two
    with make() as a:
        x = decide(a, "acme", "x").reservation_id
        for _ in range(3):
            a.run(a.sidecar.service.settle_usage(x, None, "gpt-4o", 100, 10, "report"))
        rec = spend(a)["tenants"]["acme"]["gpt-4o"]
        assert (rec["requests"], rec["input_tokens"]) == (1, 100)


@pytest.mark.parametrize("query, fragment", [
    ("?period=week", "period must be day, month or total"),
    ("?since=2026-13-01", "expected a date YYYY-MM-DD"),
    ("?since=2026-11-02&until=2026-11-01", "until is before since"),
])
def test_a_bad_spend_query_is_a_400(query, fragment):
    with RunningSidecar(POLICY % "") as sc:
        try:
            urllib.request.urlopen(f"{sc.admin_base}/v1/spend{query}", timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 400 and fragment in json.load(exc)["error"]["message"]
        else:
            raise AssertionError("no error")


def test_the_state_file_keeps_spend_and_refuses_a_corrupt_one(tmp_path: Path):
    state = tmp_path / "spend.json"
    clock = ManualClock()
    with RunningSidecar(POLICY % "", backend=MemoryBackend(state_file=str(state), clock=clock),
                        clock=clock) as sc:
        sc.run(sc.sidecar.service.settle_usage("q", "acme", "gpt-4o", 10, 1, "report"))
    doc = json.loads(state.read_text())
    assert list(doc["spend"]["acme"].values()) == [[1, 10, 1, 0, 0, 10 * 2500 + 1 * 10000]]
    doc["spend"]["acme"] = {k: [1, 2] for k in doc["spend"]["acme"]}
    state.write_text(json.dumps(doc))
    from sidecar.backends.base import BackendError

    with pytest.raises(BackendError, match="six counts"):
        with RunningSidecar(POLICY % "", backend=MemoryBackend(state_file=str(state))):
            pass


@pytest.mark.subprocess
def test_acknowledged_spend_survives_a_sigkill_of_the_embedded_sidecar(tmp_path: Path):
    """Each acknowledged report's spend cell is in the journal record of its settlement,
    so a SIGKILL between snapshots loses neither the budget's correction nor the spend."""
    import signal

    from tests.support.procs import SidecarProcess, post_json

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY % "backend: {kind: memory, flush_interval_s: 3600}")
    sc = SidecarProcess(policy, tmp_path)
    with sc:
        sent = []
        for i in range(20):
            doc = {"request_id": f"k-{i}", "tenant": "acme", "model": "gpt-4o",
                   "input_tokens": 100 + i, "output_tokens": 10, "cached_tokens": i}
            status, ack = post_json(f"http://127.0.0.1:{sc.admin_port}/v1/usage", doc)
            assert status == 200 and ack["applied"]
            sent.append(doc)
        sc.proc.send_signal(signal.SIGKILL)  # no snapshot since start: only the journal
        sc.proc.wait(10)
        sc.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{sc.admin_port}/v1/spend",
                                    timeout=10) as r:
            rec = json.load(r)["tenants"]["acme"]["gpt-4o"]
    assert rec["requests"] == 20
    assert rec["input_tokens"] == sum(d["input_tokens"] for d in sent)
    assert rec["cached_tokens"] == sum(d["cached_tokens"] for d in sent)
    assert rec["cost_nano_usd"] == sum((d["input_tokens"] - d["cached_tokens"]) * 2500
                                       + d["cached_tokens"] * 1250 + 10 * 10000 for d in sent)


NO_BUDGET_POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_CACHE_PRICING + """defaults:
  limits: {rpm: 10000, tpm: 100000000}
backend: {kind: memory, flush_interval_s: 3600}
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_the_embedded_sidecar_restarts_after_settling_a_tenant_without_a_budget(tmp_path: Path,
                                                                               stop: str):
    """A tenant without a budget (every policy without `budget:`, as docs/providers.md's
    example) settles with no budget spend: the journal holds its state's own spend, and the
    next start reads it back, with the durable spend it recorded."""
    import signal

    from tests.support.procs import SidecarProcess, post_json

    policy = tmp_path / "policy.yaml"
    policy.write_text(NO_BUDGET_POLICY)
    sc = SidecarProcess(policy, tmp_path)
    with sc:
        doc = {"request_id": "nb-1", "tenant": "acme", "model": "gpt-4o",
               "input_tokens": 100, "output_tokens": 10}
        status, ack = post_json(f"http://127.0.0.1:{sc.admin_port}/v1/usage", doc)
        assert status == 200 and ack["applied"]
        if stop == "sigterm":
            sc.stop(grace=30)
        else:
            sc.proc.send_signal(signal.SIGKILL)
            sc.proc.wait(10)
        sc.start()  # raises (and shows the log) when the sidecar refuses its journal
        spent = sc.spend()["acme"]["gpt-4o"]
        assert (spent["requests"], spent["input_tokens"], spent["cost_nano_usd"]) == \
            (1, 100, 100 * 2500 + 10 * 10000)
        # the settlement is remembered: the same report again adds nothing
        status, ack = post_json(f"http://127.0.0.1:{sc.admin_port}/v1/usage", doc)
        assert status == 200 and not ack["applied"]


def test_a_journal_with_the_no_budget_reply_as_spend_is_read_back(tmp_path: Path):
    """Journals written before the fix hold -1 (settle's "no budget" reply) as the spend
    of a tenant without a budget; the sidecar that wrote them must still start."""
    state = tmp_path / "spend.json"
    journal = tmp_path / "spend.json.journal.1"
    journal.write_text('[1,"acme","old-1",-1,-1]\n')
    with RunningSidecar(POLICY % "", backend=MemoryBackend(state_file=str(state))) as sc:
        out = sc.run(sc.sidecar.service.backend.settle(
            "acme", sc.sidecar.service.policy.rule_for("acme").limits, "old-1", 5, 5, -1))
        assert not out.applied  # remembered from the journal
    # spend -1 with a budget period is still refused: that is not a spend
    journal.write_text('[1,"acme","old-1",1795000000000000,-1]\n')
    for leftover in tmp_path.glob("spend.json*"):
        if leftover != journal:
            leftover.unlink()
    from sidecar.backends.base import BackendError

    with pytest.raises(BackendError, match="spent must be an integer"):
        with RunningSidecar(POLICY % "", backend=MemoryBackend(state_file=str(state))):
            pass


@contextlib.contextmanager
def sidecar_on_valkey(clock: ManualClock, timeout_ms: int = 2000) -> Iterator[tuple]:
    """One in-process sidecar on a Valkey of its own, its scripts on ``clock``:
    (sidecar, its RedisBackend, the Valkey)."""
    with workdir() as d, Valkey(d) as v:
        text = POLICY % f'backend: {{kind: redis, url: "{v.url}", timeout_ms: {timeout_ms}}}'
        backend = RedisBackend(parse_policy(text.encode(), "<test>").backend,
                               clock_override=clock)
        with RunningSidecar(text, backend=backend, clock=clock) as sc:
            yield sc, backend, v


@pytest.mark.valkey
def test_a_spend_report_over_a_range_reads_only_the_tenants_it_holds(tmp_path: Path):
    """A client inventing tenant ids under `unknown: defaults` must not make every later
    report read every tenant ever seen: a range is read through the day index (Redis's
    own command counts show which hashes were read), and what it answers is the same."""
    import redis

    noon = T0_US - T0_US % (DAY_S * 1_000_000) + DAY_S * 1_000_000 // 2
    clock = ManualClock(noon)
    with sidecar_on_valkey(clock) as (sc, _, v):
        svc = sc.sidecar.service
        for i in range(300):  # the flood, on the first day
            sc.run(svc.settle_usage(f"f-{i}", f"rnd-{i}", "gpt-4o", 10, 1, "report"))
        clock.advance(DAY_S)
        for i in range(3):  # the next day: three tenants
            sc.run(svc.settle_usage(f"n-{i}", f"day2-{i}", "gpt-4o", 100, 10, "report"))
        r = redis.Redis.from_url(v.url)
        r.config_resetstat()
        ranged = spend(sc, f"?since={utc_day(noon, 1)}")["tenants"]
        stats = r.info("commandstats")
        everything = spend(sc)["tenants"]
        r.close()
    assert sorted(ranged) == ["day2-0", "day2-1", "day2-2"]
    assert ranged["day2-0"]["gpt-4o"]["cost_nano_usd"] == 100 * 2500 + 10 * 10000
    # three hashes read, no scan of the 303 spend keys
    assert stats["cmdstat_hgetall"]["calls"] == 3
    assert "cmdstat_scan" not in stats
    # the whole history is still every tenant, exactly
    assert len(everything) == 303
    assert everything["rnd-7"]["gpt-4o"]["cost_nano_usd"] == 10 * 2500 + 1 * 10000


@pytest.mark.valkey
def test_a_range_starting_before_the_index_existed_is_read_whole(tmp_path: Path):
    """Spend written before the day index (older versions, or the index's first day) is
    found by a scan: a range never misses spend because its tenants were not indexed."""
    import redis

    clock = ManualClock(T0_US - T0_US % (DAY_S * 1_000_000) + DAY_S * 1_000_000 // 2)
    with sidecar_on_valkey(clock) as (sc, _, v):
        svc = sc.sidecar.service
        sc.run(svc.settle_usage("a-1", "indexed", "gpt-4o", 10, 1, "report"))
        r = redis.Redis.from_url(v.url)
        # spend an older sidecar wrote today: in its hash, not in the index
        r.delete(f"kt:spend-index:{clock() // (DAY_S * 1_000_000)}")
        today = utc_day(clock())
        doc = spend(sc, f"?since={today}")["tenants"]
        r.close()
    assert sorted(doc) == ["indexed"]


@pytest.mark.valkey
def test_an_index_write_the_store_did_not_take_is_sent_again(tmp_path: Path):
    """The day index is written ahead of a spend write and never fails it; what did not
    arrive (the store was gone) is sent again by the heartbeat once the store answers, so a
    ranged report finds the tenant without waiting for its next spend."""
    import asyncio

    import redis

    clock = ManualClock(T0_US - T0_US % (DAY_S * 1_000_000) + DAY_S * 1_000_000 // 2)
    with sidecar_on_valkey(clock, timeout_ms=300) as (sc, backend, v):
        svc = sc.sidecar.service
        sc.run(svc.settle_usage("w-1", "warm", "gpt-4o", 1, 1, "report"))
        v.stop()  # the store is gone: the index write and the spend write both fail
        from sidecar.backends.base import BackendError

        with pytest.raises(BackendError):
            sc.run(svc.settle_usage("g-1", "gone-then-back", "gpt-4o", 10, 1, "report"))
        assert backend.spend_index.has_failed()
        v.start()

        async def indexed() -> bool:
            for _ in range(200):
                if not backend.spend_index.has_failed():
                    return True
                await asyncio.sleep(0.05)
            return False

        assert sc.run(indexed(), timeout=30)
        r = redis.Redis.from_url(v.url)
        day = clock() // (DAY_S * 1_000_000)
        assert r.sismember(f"kt:spend-index:{day}", "gone-then-back")
        r.close()


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.valkey)])
def test_a_settlements_event_falls_on_the_day_its_spend_does(tmp_path: Path, kind: str):
    """The durable spend is dated by the backend's clock (Redis's TIME, in the call that
    charges the budget); the ledger's event takes the same instant, so the PostgreSQL
    roll-up (by the event's day) and `kt spend` agree at midnight and at a month's end.
    Here the backend's clock is 0.2 s before a month ends, far from this host's."""
    from tests.ledger.test_ledger_providers import file_ledger, usage_events

    month_end = T0_US - T0_US % (DAY_S * 1_000_000)
    while utc_month(month_end) == utc_month(T0_US):
        month_end += DAY_S * 1_000_000
    clock = ManualClock(month_end - 200_000)
    directory = tmp_path / "events"
    led = file_ledger(directory)
    with ExitStack() as stack:
        if kind == "redis":
            d = stack.enter_context(workdir())
            v = stack.enter_context(Valkey(d))
            text = POLICY % f'backend: {{kind: redis, url: "{v.url}", timeout_ms: 2000}}'
            backend = RedisBackend(parse_policy(text.encode(), "<t>").backend,
                                   clock_override=clock)
        else:
            text, backend = POLICY % "", MemoryBackend(clock=clock)
        with RunningSidecar(text, backend=backend, clock=clock, ledger=led) as sc:
            rid = decide(sc, "acme", "m-1").reservation_id
            sc.run(sc.sidecar.service.settle_usage(rid, None, "gpt-4o", 100, 10, "report"))
            by_day = spend(sc, "?period=day")["tenants"]["acme"]
    [event] = [e for e in usage_events(led, directory) if e.request_id == rid]
    assert sorted(by_day) == [utc_day(clock())]
    assert utc_day(event.settled_us) == utc_day(clock())
    assert event.decided_us <= event.settled_us
