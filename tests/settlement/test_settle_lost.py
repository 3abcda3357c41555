"""A settlement whose reply was lost (a real Valkey stalled with SIGSTOP past every resend)
is resolved by asking the store for its idempotency marker once it answers again: never
re-opened as if it had not been applied (sidecar/settle_outcome.py, docs/usage.md)."""
from __future__ import annotations

import asyncio
from typing import Optional

import pytest
import redis

from sidecar.backends.base import BackendError
from sidecar.backends.redis import RedisBackend
from sidecar.model import Kind, Request
from sidecar.policy import schema
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService
from tests.support.procs import eventually

POLICY = """
tiers: [{name: default, model: gpt-4o}]
defaults:
  limits: {rpm: 100000, tpm: 10000000}
  budget: {tokens: 100000000, period: day}
estimate: {trusted: true}
backend: {kind: redis, url: "%s", timeout_ms: 50, failure_mode: closed}
"""
TENANT = "stalled"
ESTIMATE = 5


def service(url: str) -> DecisionService:
    policy = parse_policy((POLICY % url).encode(), "<test>")
    assert isinstance(policy.backend, schema.RedisBackend)
    return DecisionService(policy, RedisBackend(policy.backend))


def sample(svc: DecisionService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, labels) or 0.0


async def decided(svc: DecisionService) -> str:
    """One admitted request's reservation id (decided with a timeout a busy machine
    meets; the settlement that follows has the policy's 50 ms)."""
    backend = svc.backend
    assert isinstance(backend, RedisBackend)
    short, backend.timeout_s = backend.timeout_s, 5.0
    try:
        d = await svc.decide(Request(headers={"x-tenant-id": TENANT,
                                              "x-kt-estimated-tokens": str(ESTIMATE)}))
    finally:
        backend.timeout_s = short
    assert d.kind is Kind.ALLOW and d.reservation_id
    return d.reservation_id


async def settle_while_stalled(svc: DecisionService, rid: str,
                               tenant: Optional[str] = None) -> BaseException:
    """Usage of 100 + 20 tokens settled (by Envoy's access log) while the store is
    stalled: every send times out."""
    try:
        await svc.settle_usage(rid, tenant, "gpt-4o", 100, 20, "access_log")
    except BackendError as exc:
        return exc
    raise AssertionError("settled while Valkey was stopped")


def books(url: str, svc: DecisionService) -> tuple[int, dict]:
    """(budget spent, durable spend cells) of the tenant, read from Valkey."""
    _, _, budget_key = svc.backend.keys(TENANT)
    r = redis.Redis.from_url(url)
    try:
        spent = int(r.hget(budget_key, "s") or 0)
        spend = {k.decode().split("|", 1)[1]: int(v)
                 for k, v in r.hgetall(svc.backend.spend_key(TENANT)).items()}
    finally:
        r.close()
    return spent, spend


async def expire_everything(svc: DecisionService) -> None:
    """Whatever the book still holds expires now (as ten minutes later), and its spend
    record is written."""
    svc.reservations.ttl_s = -1
    svc.expire_reservations()
    while svc._background:
        await asyncio.sleep(0.02)


def test_a_settlement_valkey_applied_during_a_stall_is_recorded_once(own_valkey):
    # Valkey stopped for longer than every resend: the settlements wait in its socket and
    # are applied when it resumes. Before, each was logged "not settled", its reservation
    # put back in the book and expired later as kept: the request counted twice in the
    # durable spend (n 2 for 1, the estimate's tokens on top) and never as settled.
    svc = service(own_valkey.url)

    async def main():
        await svc.backend.start()
        try:
            rid = await decided(svc)
            own_valkey.pause()
            try:
                error = await settle_while_stalled(svc, rid)
                # a repeat of the same usage meanwhile is not a second charge
                with pytest.raises(BackendError):
                    await svc.settle_usage(rid, TENANT, "gpt-4o", 100, 20, "report")
            finally:
                own_valkey.resume()
            await eventually(lambda: sample(svc, "kt_settlements_total",
                                            source="access_log") == 1,
                             "the lost settlement confirmed from its marker", timeout=30)
            again = await svc.settle_usage(rid, TENANT, "gpt-4o", 100, 20, "report")
            await expire_everything(svc)
            return error, again
        finally:
            await svc.backend.close()

    error, again = asyncio.run(main())
    assert "being read from the store" in str(error)
    assert not again.applied  # settled once; the repeat is recognised
    spent, spend = books(own_valkey.url, svc)
    assert spent == 120  # the usage replaced the estimate of 5, once
    assert spend == {"i|gpt-4o": 100, "o|gpt-4o": 20, "n|gpt-4o": 1}
    assert sample(svc, "kt_reservations_closed_total", outcome="bound_expiry") == 0
    outcomes = {o: sample(svc, "kt_settle_outcomes_total", outcome=o)
                for o in ("applied", "resent", "unknown")}
    assert outcomes["applied"] + outcomes["resent"] == 1 and outcomes["unknown"] == 0


def test_a_settlement_the_store_lost_is_sent_again_once_it_answers(own_valkey):
    # Valkey stopped, then killed and started again (its data gone with it): the
    # settlements in its socket were never applied. The marker is absent: the same
    # settlement is sent again, and counted once.
    svc = service(own_valkey.url)

    async def main():
        await svc.backend.start()
        try:
            rid = await decided(svc)
            own_valkey.pause()
            try:
                await settle_while_stalled(svc, rid)
            finally:
                own_valkey.kill()
            own_valkey.start()
            await eventually(lambda: sample(svc, "kt_settle_outcomes_total",
                                            outcome="resent") == 1,
                             "the lost settlement sent again", timeout=30)
            await expire_everything(svc)
        finally:
            await svc.backend.close()

    asyncio.run(main())
    spent, spend = books(own_valkey.url, svc)
    assert spent == 120 - ESTIMATE  # the correction, applied once to the emptied store
    # the estimate held by the decision went with the store's data: the settlement takes
    # it out of "held" all the same, so settled + held is still what the budget holds
    held = {k: v for k, v in spend.items() if k.isdigit()}  # "h|<period start>"
    assert [*held.values()] == [-ESTIMATE]
    assert {k: v for k, v in spend.items() if k not in held} == {
        "i|gpt-4o": 100, "o|gpt-4o": 20, "n|gpt-4o": 1}
    assert 120 + sum(held.values()) == spent
    assert sample(svc, "kt_settlements_total", source="access_log") == 1
    assert sample(svc, "kt_reservations_closed_total", outcome="bound_expiry") == 0


def test_a_store_that_never_answers_closes_the_reservation_as_kept(own_valkey, monkeypatch):
    # no answer within the resolution's patience (10 minutes; shortened here): the outcome
    # is unknown, counted and logged, and the reservation is closed as kept (its estimate
    # stays charged, as for any reservation whose usage never came), neither re-opened
    # nor left pending
    monkeypatch.setattr("sidecar.settle_outcome.RESOLVE_GIVE_UP_S", 0.5)
    svc = service(own_valkey.url)

    async def main():
        await svc.backend.start()
        try:
            rid = await decided(svc)
            own_valkey.pause()
            try:
                await settle_while_stalled(svc, rid)
                await eventually(lambda: sample(svc, "kt_settle_outcomes_total",
                                                outcome="unknown") == 1,
                                 "the resolution to give up", timeout=30)
            finally:
                own_valkey.resume()
            return rid
        finally:
            await svc.backend.close()

    rid = asyncio.run(main())
    assert sample(svc, "kt_reservations_closed_total", outcome="kept_settle_unknown") == 1
    assert svc.reservations.get(rid) is None and len(svc.settler) == 0


def test_usage_of_a_fail_open_request_settled_during_a_stall_is_recorded(own_valkey):
    # a request the failure mode let through (fail open) has a reservation id the sidecar
    # made but no reservation; its usage, settled while Valkey is stopped and applied when
    # it resumes, is this sidecar's own settlement: recorded (metrics, ledger), not taken
    # for one an earlier report made
    svc = service(own_valkey.url)
    rid = svc.new_reservation_id()  # as _failure makes one for a fail-open answer

    async def main():
        await svc.backend.start()
        try:
            await decided(svc)  # the link is up and warm
            own_valkey.pause()
            try:
                await settle_while_stalled(svc, rid, TENANT)
            finally:
                own_valkey.resume()
            await eventually(lambda: len(svc.settler) == 0, "the outcome resolved", timeout=30)
        finally:
            await svc.backend.close()

    asyncio.run(main())
    assert sample(svc, "kt_settlements_total", source="access_log") == 1
    assert sample(svc, "kt_settle_outcomes_total", outcome="settled_before") == 0
    spend = books(own_valkey.url, svc)[1]
    # the warm-up decision's reservation is still open: its estimate is held (h|<period>)
    held = {k: v for k, v in spend.items() if k.isdigit()}
    assert [*held.values()] == [ESTIMATE]
    assert {k: v for k, v in spend.items() if k not in held} == {
        "i|gpt-4o": 100, "o|gpt-4o": 20, "n|gpt-4o": 1}


def test_a_stop_while_the_outcome_is_unknown_closes_the_reservation_as_kept(own_valkey):
    # the sidecar stops (Sidecar.stop gives the resolutions its drain grace) while Valkey
    # is still stopped: the outcome is unknown, said once, and the reservation closed as
    # kept, not lost without a trace
    svc = service(own_valkey.url)

    async def main():
        await svc.backend.start()
        try:
            rid = await decided(svc)
            own_valkey.pause()
            try:
                await settle_while_stalled(svc, rid)
                assert len(svc.settler) == 1
                await svc.settler.close(0.3)
            finally:
                own_valkey.resume()
        finally:
            await svc.backend.close()

    asyncio.run(main())
    assert len(svc.settler) == 0
    assert sample(svc, "kt_settle_outcomes_total", outcome="unknown") == 1
    assert sample(svc, "kt_reservations_closed_total", outcome="kept_settle_unknown") == 1
