"""A request whose usage cannot be read is charged at what the provider could have billed
(sidecar/settlement/bound.py, docs/usage.md): input from the whole body, output the request's own
maximum (else the served model's `max_output_tokens`) times its choices; in the budget,
the token bucket, the ledger and the durable spend, whatever the budget's unit. In
process, embedded backend, fake clock; tests/e2e/test_usage_path.py holds the same through a
real Envoy."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
import redis

from sidecar.settlement import bound
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.spend import HELD_DAY
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.writer import EventLog
from sidecar.model import Kind, Request
from sidecar.settlement.reconcile import close_reservation
from tests.support.inproc import RunningSidecar

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01, max_output_tokens: 4096, max_input_tokens: 100000}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
defaults:
  limits: {rpm: 1000, tpm: 10000000}
tenants:
  usd:
    budget: {usd: 1000, period: month}
  tokens:
    budget: {tokens: 100000000, period: month}
  free: {}
"""


@pytest.fixture
def charged(tmp_path):
    events = EventLog(FileSink(tmp_path / "events", fsync=False),
                      SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    led = Ledger(events, instance="test-1")
    with RunningSidecar(POLICY, ledger=led) as sc:
        yield sc, led, tmp_path / "events"


def body_of(**fields) -> bytes:
    doc = {"model": "gpt-4o", "stream": True,
           "messages": [{"role": "user", "content": "y" * 400}]}
    doc.update(fields)
    return json.dumps(doc).encode()


def decide(sc, tenant: str, body: bytes):
    d = sc.run(sc.sidecar.service.decider.decide(Request(headers={"x-tenant-id": tenant}, body=body)))
    assert d.kind is Kind.ALLOW and d.reservation_id
    return d


def close_unread(sc, tenant: str, rid: str, cut_short: bool = False,
                 body_seen=None) -> None:
    """What the access log does with a 2xx entry that carries no usage (``body_seen``: what
    the usage filter read in a body larger than the decision reads)."""
    sc.run(close_reservation(sc.sidecar.service.settlement, rid, "", tenant, 200, None, None, cut_short,
                             "access_log", "access_log", body_seen=body_seen))


def spend(sc, tenant: str) -> tuple[int, ...]:
    """The tenant's durable spend (requests, input, output, cached, cache writes, nano-USD)."""
    cells = sc.run(sc.backend.spend_cells())
    rows = [c.counts for c in cells if c.tenant == tenant and c.day != HELD_DAY]
    return tuple(map(sum, zip(*rows, strict=True))) if rows else (0,) * 6


def closed(sc, outcome: str) -> float:
    return sc.sidecar.service.metrics.reservations_closed.labels(outcome)._value.get()


def usage_events(led, directory) -> list:
    assert led.events is not None and led.events.flush()
    return [e for e in read_events(event_files(directory))
            if e.__class__.__name__ == "UsageEvent"]


def test_a_stream_without_usage_nor_max_tokens_is_charged_the_models_max_output_per_choice(
        charged):
    sc, led, directory = charged
    body = body_of(n=3)
    d = decide(sc, "tokens", body)
    inp = math.ceil(len(body) / 4)
    before = closed(sc, "bound_no_usage")
    close_unread(sc, "tokens", d.reservation_id)
    # gpt-4o's max_output_tokens 4096, three choices; before: the 256-token default, once
    assert sc.backend.states["tokens"].spent == inp + 3 * 4096
    assert spend(sc, "tokens") == (1, inp, 3 * 4096, 0, 0, inp * 2500 + 3 * 4096 * 10_000)
    assert closed(sc, "bound_no_usage") == before + 1
    (ev,) = usage_events(led, directory)
    assert (ev.outcome, ev.settled_by, ev.input_tokens, ev.output_tokens) == (
        "kept", "no_usage", inp, 3 * 4096)
    assert ev.budget_charge == inp + 3 * 4096 and ev.budget_unit == "tokens"
    assert ev.cost_nano_usd == inp * 2500 + 3 * 4096 * 10_000


def test_the_requests_own_maximum_bounds_each_choice_and_the_model_bounds_it(charged):
    sc, _, _ = charged
    cases = [(body_of(max_completion_tokens=700, n=2), 2 * 700),
             (body_of(max_tokens=100, max_completion_tokens=300), 300),
             (body_of(max_tokens=50_000), 4096)]  # beyond the model's: the model's
    spent = 0
    for body, out in cases:
        d = decide(sc, "usd", body)
        close_unread(sc, "usd", d.reservation_id, cut_short=True)  # the client left
        spent += math.ceil(len(body) / 4) * 2500 + out * 10_000
        assert sc.backend.states["usd"].spent == spent


def test_a_model_without_max_output_tokens_is_bounded_by_the_default(charged):
    sc, _, _ = charged
    body = body_of(model="gpt-4o-mini")
    d = decide(sc, "tokens", body)
    close_unread(sc, "tokens", d.reservation_id)
    assert sc.backend.states["tokens"].spent == (math.ceil(len(body) / 4)
                                                 + bound.DEFAULT_MAX_OUTPUT_TOKENS)


def test_a_huge_n_without_max_tokens_is_charged_the_most_a_settlement_takes(charged):
    sc, _, _ = charged
    body = body_of(n=1_000_000)  # its default output trimmed to fit the bucket: admitted
    d = decide(sc, "tokens", body)
    close_unread(sc, "tokens", d.reservation_id)
    # 4096 x 1e6 is beyond what one settlement takes: charged that much, never the estimate
    assert sc.backend.states["tokens"].spent == math.ceil(len(body) / 4) + bound.MAX_BOUND_TOKENS


def test_a_tenant_without_budget_has_the_bound_in_its_durable_spend(charged):
    sc, led, directory = charged
    body = body_of(max_tokens=1000)
    d = decide(sc, "free", body)
    close_unread(sc, "free", d.reservation_id)
    inp = math.ceil(len(body) / 4)
    # before: one request, 0 tokens, $0
    assert spend(sc, "free") == (1, inp, 1000, 0, 0, inp * 2500 + 1000 * 10_000)
    (ev,) = usage_events(led, directory)
    assert ev.cost_nano_usd == inp * 2500 + 1000 * 10_000 and ev.budget_charge == 0


def test_the_token_bucket_moves_to_the_bound(charged):
    sc, _, _ = charged
    svc = sc.sidecar.service
    body = body_of()  # no max_tokens: reserved with the 256-token default
    d = decide(sc, "usd", body)
    close_unread(sc, "usd", d.reservation_id)
    small = body_of(max_tokens=1)
    nxt = decide(sc, "usd", small)
    # what the next decision sees left: the first request counts at its bound (the fake
    # clock stands still: nothing refilled)
    used = math.ceil(len(body) / 4) + 4096 + math.ceil(len(small) / 4) + 1
    assert nxt.outcome.remaining_tokens == 10_000_000 - used
    assert svc.reservations.get(d.reservation_id) is None


def test_an_expired_reservation_is_charged_at_its_bound(charged):
    sc, led, directory = charged
    svc = sc.sidecar.service
    body = body_of(n=2)
    decide(sc, "tokens", body)
    before = closed(sc, "bound_expiry")

    async def expire_and_wait() -> None:
        svc.reservations.ttl_s = -1
        svc.reservations.expire()
        while svc.settlement._background:  # the charge runs in the background
            await asyncio.sleep(0.01)

    sc.run(expire_and_wait())
    inp = math.ceil(len(body) / 4)
    assert sc.backend.states["tokens"].spent == inp + 2 * 4096
    assert closed(sc, "bound_expiry") == before + 1
    (ev,) = usage_events(led, directory)
    assert (ev.outcome, ev.settled_by, ev.output_tokens) == ("expired", "expiry", 2 * 4096)


def test_a_later_report_for_a_request_charged_at_its_bound_changes_nothing(charged):
    sc, _, _ = charged
    d = decide(sc, "tokens", body_of(max_tokens=500))
    close_unread(sc, "tokens", d.reservation_id)
    spent = sc.backend.states["tokens"].spent
    res = sc.run(sc.sidecar.service.settlement.settle_usage(d.reservation_id, "tokens", "gpt-4o", 1, 1))
    assert not res.applied and sc.backend.states["tokens"].spent == spent


# --- on Redis: another replica, and a store that cannot take the charge -------------
REDIS_POLICY = POLICY.rstrip() + """
backend: {kind: redis, url: "%s", timeout_ms: 500, shared_reservations: %s}
"""


def redis_service(url: str, shared: bool = True, ledger=None):
    from sidecar.backends.redis import RedisBackend
    from sidecar.policy.load import parse_policy
    from sidecar.flows import Flows

    policy = parse_policy((REDIS_POLICY % (url, str(shared).lower())).encode(), "<test>")
    return Flows(policy, RedisBackend(policy.backend), ledger=ledger)


def test_an_unreadable_reply_on_another_replica_is_charged_once_at_the_bound(valkey):
    # the access-log entry reaches replica B, the decision was A's: B charges the bound
    # from A's shared reservation, and A's expiry later finds it taken and charges nothing
    a, b = redis_service(valkey.url), redis_service(valkey.url)
    body = body_of(n=2)
    inp = math.ceil(len(body) / 4)

    async def main():
        await a.backend.start()
        await b.backend.start()
        try:
            d = await a.decider.decide(Request(headers={"x-tenant-id": "tokens"}, body=body))
            assert d.kind is Kind.ALLOW
            # A shares it without waiting; a real reply takes longer than that write
            shared = a.backend.keyspace.reservation("tokens", d.reservation_id)
            r = redis.Redis.from_url(valkey.url)
            try:
                for _ in range(500):
                    if r.exists(shared):
                        break
                    await asyncio.sleep(0.01)
            finally:
                r.close()
            await close_reservation(b.settlement, d.reservation_id, "", "tokens", 200, None, None, False,
                                    "access_log", "access_log")
            a.reservations.ttl_s = -1
            a.reservations.expire()
            a.reservations.ttl_s = 600  # the probe's own reservation stays open
            while a.settlement._background:
                await asyncio.sleep(0.01)
            probe = await a.decider.decide(Request(headers={"x-tenant-id": "tokens"},
                                           body=b'{"max_tokens": 1}'))
            return probe.outcome, await b.backend.spend_cells()
        finally:
            await a.backend.close()
            await b.backend.close()

    probe, cells = asyncio.run(main())
    probe_tokens = math.ceil(len(b'{"max_tokens": 1}') / 4) + 1
    assert probe.budget_limit - probe.budget_remaining == inp + 2 * 4096 + probe_tokens
    (cell,) = [c for c in cells if c.tenant == "tokens" and c.day != HELD_DAY]
    assert cell.counts[:3] == (1, inp, 2 * 4096)  # one request, at its bound, once
    assert b.metrics.reservations_closed.labels("bound_no_usage")._value.get() == 1


def test_when_the_store_cannot_take_the_bound_the_estimate_stays_recorded_with_its_tokens(
        valkey, tmp_path):
    # Valkey gone before the charge: its outcome is read from the store once it answers
    # (sidecar/settlement/resend.py); a stop first leaves it unknown, and the estimate stays
    # charged, recorded with its tokens and their price (not 0 tokens, $0)
    events = EventLog(FileSink(tmp_path / "events", fsync=False),
                      SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    svc = redis_service(valkey.url, shared=False, ledger=Ledger(events, instance="test-1"))
    svc.ledger.start()
    body = body_of(max_tokens=300)
    inp = math.ceil(len(body) / 4)

    async def main():
        await svc.backend.start()
        try:
            d = await svc.decider.decide(Request(headers={"x-tenant-id": "free"}, body=body))
            assert d.kind is Kind.ALLOW
            valkey.stop()
            await close_reservation(svc.settlement, d.reservation_id, "", "free", 200, None, None, False,
                                    "access_log", "access_log")
            await svc.settlement.settler.close(0.3)
            while svc.settlement._background:
                await asyncio.sleep(0.01)
        finally:
            await svc.backend.close()

    try:
        asyncio.run(main())
        assert svc.metrics.reservations_closed.labels("kept_settle_unknown")._value.get() == 1
        (ev,) = usage_events(svc.ledger, tmp_path / "events")
        assert (ev.outcome, ev.settled_by, ev.input_tokens, ev.output_tokens) == (
            "kept", "settle_unknown", inp, 300)
        assert ev.cost_nano_usd == inp * 2500 + 300 * 10_000 and ev.budget_charge == 0
    finally:
        svc.ledger.close()


def test_a_request_without_body_is_bounded_by_its_estimate(charged):
    # a GET of the model list carries no prompt: no provider generates from it, so its
    # reply without usage costs what its estimate charged, not a model's whole output
    sc, _, _ = charged
    d = sc.run(sc.sidecar.service.decider.decide(Request(headers={"x-tenant-id": "tokens"})))
    assert d.kind is Kind.ALLOW
    close_unread(sc, "tokens", d.reservation_id)
    assert sc.backend.states["tokens"].spent == d.outcome.charged_tokens == 512


def test_a_reservation_held_from_a_late_decision_reply_stays_at_its_charge(charged):
    # Redis applied a decision after its timeout and Envoy's failure mode answered: the
    # charge is held as the request's reservation (docs/redis.md), though the request may
    # never have reached a provider; without usage it stays at what it charged
    sc, _, _ = charged
    svc = sc.sidecar.service
    body = body_of(max_tokens=100)
    d = decide(sc, "usd", body)
    svc.reservations.pop(d.reservation_id)  # its charge is now the late reply's
    sc.run(_on_loop(svc.decider._late_outcome, Kind.UNAVAILABLE, "usd", svc.policy.rule_for("usd"),
                    "x-request-id:late-1", d.outcome, input_tokens=math.ceil(len(body) / 4)))
    sc.run(close_reservation(svc.settlement, "", "late-1", "usd", 200, None, None, False,
                             "access_log", "access_log"))
    assert sc.backend.states["usd"].spent == d.outcome.charged_cost
    inp = math.ceil(len(body) / 4)
    assert spend(sc, "usd") == (1, inp, 100, 0, 0, d.outcome.charged_cost)


async def _on_loop(fn, *args, **kwargs):
    fn(*args, **kwargs)


def test_a_stored_conversation_is_bounded_by_the_models_context_window(charged):
    """A Responses request with previous_response_id (or a conversation) is billed the
    stored conversation as input, which its body does not show: its input bound is the
    served model's max_input_tokens (else the default), never less than the body's."""
    sc, _, _ = charged
    cases = [(body_of(previous_response_id="resp_1", max_output_tokens=100), 100_000),
             (body_of(conversation={"id": "conv_1"}, max_output_tokens=100), 100_000),
             (body_of(model="gpt-4o-mini", previous_response_id="resp_1",
                      max_output_tokens=100), bound.DEFAULT_MAX_INPUT_TOKENS),
             # null is the API's own "none": the body's input
             (body_of(previous_response_id=None, max_output_tokens=100), None)]
    spent = 0
    for body, inp in cases:
        d = decide(sc, "tokens", body)
        # the estimate (what admission charged) is the body's: a context window would
        # refuse every turn of a conversation against a small TPM
        assert d.outcome.charged_tokens == math.ceil(len(body) / 4) + 100
        close_unread(sc, "tokens", d.reservation_id, cut_short=True)
        spent += (inp or math.ceil(len(body) / 4)) + 100
        assert sc.backend.states["tokens"].spent == spent


def test_the_usage_filters_view_of_a_large_body_bounds_it(charged):
    """The decision saw only the first part of a large body (truncated: no n, no
    max_tokens); the usage filter's report of the whole body sets the bound: its choices
    and maximum, a stored conversation; a value it could not read at its most."""
    sc, _, _ = charged
    part = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "'
    length = str(len(part) * 1000)
    inp = math.ceil(int(length) / 4)
    cases = [(None, inp, 4096),  # no report: one choice of the model's most
             ('{"n":8}', inp, 8 * 4096),
             ('{"n":8,"max_tokens":300}', inp, 8 * 300),
             ('{"n":"8","max_tokens":299.5}', inp, 8 * 300),  # as a lax parser reads them
             ('{"max_tokens":300,"max_completion_tokens":"?"}', inp, 4096),
             ('{"previous_response_id":true,"max_output_tokens":10}', 100_000, 10),
             ('{"n":-1,"max_tokens":-5}', inp, bound.MAX_BOUND_TOKENS),
             # a report that cannot be read (a body with NaN, which some parsers take)
             ('{"n":NaN}', 100_000, bound.MAX_BOUND_TOKENS),
             ('{"n":"?"}', inp, bound.MAX_BOUND_TOKENS)]
    for i, (report, bound_in, bound_out) in enumerate(cases):
        tenant = f"large-{i}"  # its own bucket: a billion tokens empties one
        d = sc.run(sc.sidecar.service.decider.decide(Request(
            headers={"x-tenant-id": tenant, "content-length": length}, body=part,
            body_truncated=True)))
        assert d.kind is Kind.ALLOW
        close_unread(sc, tenant, d.reservation_id, cut_short=True, body_seen=report)
        assert spend(sc, tenant)[1:3] == (bound_in, bound_out), report


def test_a_shared_reservation_keeps_its_stored_input_bound():
    from sidecar.settlement.book import parse_reservation, reservation_record
    for stored in (0, 128000):
        record = reservation_record(1, "gpt-4o", 900, 5, 7, "p1", 400, 500, stored)
        res = parse_reservation("t", record)
        assert res is not None
        assert (res.model, res.provider, res.bound_input, res.bound_output,
                res.stored_input) == ("gpt-4o", "p1", 400, 500, stored)
        assert bound.tokens(res) == (max(400, stored), 500)
