"""The provider a decision charged is in the ledger's usage event, whatever closes the
reservation: a usage report, Envoy's access log, ext_proc, a release, a kept or an expired
reservation, and a report that reaches another replica (the shared reservation carries
the provider, which that replica also corrects). PostgreSQL's daily roll-up and
`kt events stats` count by provider. With shared reservations, a reservation settled by
another replica is not recorded again when the deciding replica's copy expires.
In process (embedded backend, a real Valkey for the replicas, a real PostgreSQL), and end
to end through a real Envoy and `kt serve` with fake providers."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
import redis
from envoy.data.accesslog.v3 import accesslog_pb2

from sidecar import contract
from sidecar.backends.redis import RedisBackend
from sidecar.cli import main as kt
from sidecar.envoy_config import EnvoyOptions, TierRoute, Upstream, render
from sidecar.ledger.events import UsageEvent
from sidecar.ledger.postgres import PostgresSink
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.stats import from_directory, from_postgres
from sidecar.ledger.writer import EventLog
from sidecar.model import Kind, Request
from sidecar.policy import schema
from sidecar.settlement.reconcile import close_reservation
from sidecar.transports.als import UsageLogReceiver, entry_fields
from sidecar.settlement.usage import Usage
from tests.support.clock import ManualClock
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port, log_tail, wait_until,
                                 workdir)
from tests.support.upstream import FakeUpstream
from tests.support.valkey import Valkey

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """providers:   # east takes the first %(east_rpm)d requests of a minute, west the rest
  - {id: east, models: [gpt-4o], rate_limits: {requests_per_minute: %(east_rpm)d,
     tokens_per_minute: 100000}%(east_at)s}
  - {id: west, models: [gpt-4o], rate_limits: {requests_per_minute: 1000}%(west_at)s}
  - {id: mini, models: [gpt-4o-mini], rate_limits: {requests_per_minute: 1000}%(mini_at)s}
defaults:
  limits: {rpm: 1000, tpm: 1000000}
  budget: {usd: 10, period: month}
%(backend)s
"""


def policy(east_rpm: int = 4, backend: str = "", hosts: dict | None = None) -> str:
    at = {k: f", host: 127.0.0.1, port: {p}" for k, p in (hosts or {}).items()}
    return POLICY % {"east_rpm": east_rpm, "backend": backend, "east_at": at.get("east", ""),
                     "west_at": at.get("west", ""), "mini_at": at.get("mini", "")}


def file_ledger(directory: Path) -> Ledger:
    return Ledger(EventLog(FileSink(directory, fsync=False), SpillFile(directory / "spill.jsonl"),
                           flush_interval_s=0.01), instance=directory.name)


def usage_events(led: Ledger, directory: Path) -> list[UsageEvent]:
    assert led.events is not None and led.events.flush()
    return [e for e in read_events(event_files(directory)) if isinstance(e, UsageEvent)]


def decide(sc: RunningSidecar, tenant: str, max_tokens: int = 100):
    body = json.dumps({"model": "gpt-4o", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    d = sc.run(sc.sidecar.service.decider.decide(Request(headers={"x-tenant-id": tenant}, body=body)))
    assert d.kind is Kind.ALLOW and d.reservation_id, d
    return d


def access_log_entry(rid: str, tenant: str, provider: str, status: int, usage_json: str):
    """One entry as Envoy's gRPC access log sends it (kt envoy-config's fields)."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_headers[contract.H_RESERVATION] = rid
    entry.request.request_headers[contract.H_TENANT] = tenant
    entry.request.request_headers[contract.H_PROVIDER] = provider
    entry.response.response_code.value = status
    if usage_json:
        entry.common_properties.metadata.filter_metadata[
            contract.USAGE_METADATA_NAMESPACE].fields["json"].string_value = usage_json
    return entry



def test_every_outcome_names_the_provider_and_the_roll_up_counts_by_it(tmp_path, pg, capsys):
    directory = tmp_path / "events"
    led = file_ledger(directory)
    # the backend's clock dates the events (the instant that dated the spend): here the
    # wall clock's, since `kt events stats --last 1h` reads back from now
    with RunningSidecar(policy(), ledger=led, clock=ManualClock(time.time_ns() // 1000)) as sc:
        svc = sc.sidecar.service
        decisions = [decide(sc, "acme") for _ in range(7)]
        assert [d.provider for d in decisions] == ["east"] * 4 + ["west"] * 3
        rid = [d.reservation_id for d in decisions]
        # a usage report; the access log (a JSON reply's usage); ext_proc; a failed upstream
        # (released); a client gone (kept); never settled (expired); a report with cache
        # tokens for the spilled-over provider
        assert sc.run(svc.settlement.settle_usage(rid[0], "acme", "gpt-4o", 30, 20, "report")).applied
        sc.run(UsageLogReceiver(svc.settlement)._close_all([entry_fields(access_log_entry(
            rid[1], "acme", "east", 200,
            '{"model":"gpt-4o","usage":{"prompt_tokens":7,"completion_tokens":3}}'))]))
        sc.run(close_reservation(svc.settlement, rid[2], "", None, 200, Usage(11, 4), "gpt-4o", False,
                                 "ext_proc", "ext_proc_json"))
        sc.run(close_reservation(svc.settlement, rid[4], "", None, 503, None, None, False, "ext_proc",
                                 "ext_proc"))
        sc.run(svc.settlement.charge_unread(rid[5], "abandoned"))  # charged at its bound
        assert sc.run(svc.settlement.settle_usage(rid[6], "acme", "gpt-4o", 50, 5, "report",
                                       cached_tokens=40)).applied
        svc.reservations.ttl_s = -1
        assert sc.run(_expire(svc)) == 1  # rid[3]
        events = {e.request_id: e for e in usage_events(led, directory)}
        assert len(events) == 7
        expected = {rid[0]: ("settled", "report"), rid[1]: ("settled", "access_log_json"),
                    rid[2]: ("settled", "ext_proc_json"), rid[3]: ("expired", "expiry"),
                    rid[4]: ("released", "release"), rid[5]: ("kept", "abandoned"),
                    rid[6]: ("settled", "report")}
        for d in decisions:
            e = events[d.reservation_id]
            assert (e.outcome, e.settled_by) == expected[d.reservation_id]
            assert e.provider == d.provider, e  # the decision's provider, every outcome
        # the events still add up to what the budget holds
        assert sum(e.budget_charge for e in events.values()) == sc.backend.states["acme"].spent
    # the PostgreSQL roll-up and `kt events stats` (PostgreSQL and files) count by provider
    evs = list(events.values())
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE kt_usage_events, kt_usage_daily")
        PostgresSink(pg.dsn).write(evs)
        daily = dict(conn.execute("SELECT provider, sum(events) FROM kt_usage_daily "
                                  "GROUP BY provider").fetchall())
    assert daily == {"east": 4, "west": 3}
    now = time.time_ns() // 1000
    by_pg = from_postgres(pg.dsn, now - 3_600_000_000, now + 1)
    by_files = from_directory(str(directory), now - 3_600_000_000, now + 1)
    assert by_pg.usage == by_files.usage
    assert {k[2]: r.events for k, r in by_pg.usage.items()} == {"east": 4, "west": 3}
    assert kt(["events", "stats", "--dsn", pg.dsn, "--last", "1h", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["usage"]
    west = next(r for r in rows if r["provider"] == "west")
    assert (west["events"], west["settled"], west["released"], west["kept"]) == (3, 1, 1, 1)
    assert kt(["events", "stats", "--dir", str(directory), "--last", "1h"]) == 0
    table = capsys.readouterr().out
    assert any(line.split()[:3] == ["acme", "gpt-4o", "east"] for line in table.splitlines())


async def _expire(svc) -> int:
    n = svc.reservations.expire()
    while svc.settlement._background:  # claims of shared records (Redis), kept spend being written
        await asyncio.wait(list(svc.settlement._background))
        await asyncio.sleep(0)  # their done callbacks
    return n


# --- two replicas sharing reservations on one Valkey ---------------------------------------

def _spend_requests(sc: RunningSidecar, tenant: str) -> int:
    with urllib.request.urlopen(f"{sc.admin_base}/v1/spend", timeout=5) as r:
        return json.load(r)["tenants"][tenant]["gpt-4o"]["requests"]


@pytest.mark.valkey
def test_a_report_to_another_replica_names_and_corrects_the_provider(tmp_path):
    with workdir() as d, Valkey(d) as v:
        text = policy(backend=f'backend: {{kind: redis, url: "{v.url}", timeout_ms: 2000, '
                              'shared_reservations: true}')
        leds = {n: file_ledger(tmp_path / n) for n in "ab"}
        backends = {n: RedisBackend(schema.RedisBackend(url=v.url, timeout_ms=2000,
                                                        shared_reservations=True))
                    for n in "ab"}
        r = redis.Redis.from_url(v.url)
        tpm_key = backends["a"].provider_keys("east")[1]

        def east_tokens() -> float:
            return float(r.get(tpm_key).split()[0])

        with RunningSidecar(text, backend=backends["a"], ledger=leds["a"]) as a, \
                RunningSidecar(text, backend=backends["b"], ledger=leds["b"]) as b:
            settled_elsewhere = decide(a, "acme", max_tokens=50_000)  # charges east ~50,000
            never_settled = decide(a, "acme", max_tokens=10)
            assert settled_elsewhere.provider == never_settled.provider == "east"
            before = east_tokens()
            assert before < 60_000
            # the report reaches B, which takes A's shared reservation
            res = b.run(b.sidecar.service.settlement.settle_usage(
                settled_elsewhere.reservation_id, "acme", "gpt-4o", 10, 5, "report"))
            assert res.applied and res.reserved_tokens > 50_000
            # B gave east back what the estimate held beyond the usage (the bucket refills
            # ~1,700 tokens a second besides)
            assert east_tokens() - before > 40_000
            (on_b,) = usage_events(leds["b"], tmp_path / "b")
            assert (on_b.request_id, on_b.provider, on_b.outcome) == (
                settled_elsewhere.reservation_id, "east", "settled")
            # both reservations age out on A: the one B settled is not recorded again, the
            # other is recorded as expired, with its provider
            a.sidecar.service.reservations.ttl_s = -1
            assert a.run(_expire(a.sidecar.service)) == 2
            (on_a,) = usage_events(leds["a"], tmp_path / "a")
            assert (on_a.request_id, on_a.provider, on_a.outcome) == (
                never_settled.reservation_id, "east", "expired")
            # durable spend: two requests, not three
            wait_until(lambda: _spend_requests(a, "acme") == 2, 5, "the kept spend")
            time.sleep(0.2)
            assert _spend_requests(a, "acme") == 2
        r.close()


# --- end to end: a real Envoy routes to the decision's provider ------------------------------

@contextlib.contextmanager
def gateway(usage: str) -> Iterator[tuple]:
    with workdir() as d, FakeUpstream("east") as east, FakeUpstream("west") as west, \
            FakeUpstream("mini") as mini:
        (d / "policy.yaml").write_text(policy(east_rpm=2, hosts={
            "east": east.port, "west": west.port, "mini": mini.port}))
        with SidecarProcess(d / "policy.yaml", d) as sc:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(
                listen_port=listen, admin_port=admin, usage=usage,  # type: ignore[arg-type]
                sidecar_address=f"127.0.0.1:{sc.grpc_port}", authz_timeout_s=1.0,
                tiers=[TierRoute("default", "gpt-4o", east.address),
                       TierRoute("compact", "gpt-4o-mini", mini.address)],
                providers=[Upstream("127.0.0.1", u.port, name=u.name)
                           for u in (east, west, mini)])
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                try:
                    yield d, envoy, {"east": east, "west": west}
                except AssertionError as exc:
                    exc.args = (f"{exc.args[0] if exc.args else ''}{log_tail(envoy.log, 20)}"
                                f"{log_tail(sc.log, 20)}",)
                    raise


@pytest.mark.envoy
@pytest.mark.parametrize("usage", ["als", "ext_proc"])
def test_through_envoy_each_event_names_the_provider_that_served_it(usage):
    with gateway(usage) as (d, envoy, providers):
        statuses = []
        for i in range(5):  # east takes two, west the rest; the last fails upstream
            conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=10)
            conn.request("POST", "/v1/chat/completions", body=json.dumps({
                "model": "gpt-4o", "max_tokens": 20,
                "messages": [{"role": "user", "content": "hi"}]}), headers={
                "x-tenant-id": "acme", "content-type": "application/json",
                "x-fake-usage": f"{10 + i},3", **({"x-fake-status": "503"} if i == 4 else {})})
            resp = conn.getresponse()
            resp.read()  # the whole reply: a client that leaves early keeps its estimate
            statuses.append(resp.status)
            conn.close()
        assert statuses == [200] * 4 + [503]
        served = {r["headers"]["x-kt-reservation"]: name for name, up in providers.items()
                  for r in up.requests}
        assert sorted(served.values()) == ["east", "east", "west", "west", "west"]
        directory = d / "kt-state" / "events"  # kt serve's default file sink, in its cwd

        def events() -> list[UsageEvent]:
            return [e for e in read_events(event_files(directory)) if isinstance(e, UsageEvent)]

        wait_until(lambda: len(events()) == 5, 10, "five usage events")
        for e in events():
            assert e.provider == served[e.request_id], e
            assert e.outcome == ("released" if e.settled_by == "release" else "settled"), e
        assert sum(e.outcome == "released" for e in events()) == 1
