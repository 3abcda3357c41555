"""Attribution below the tenant (issue 24 item 4): an end-user id and tags from headers only
a trusted filter sets, bounded where they enter (dropped and counted, never a 500, never a
metric label), carried by the reservation into every usage event, and into the durable
spend so that `/v1/spend?by=user|tag|tenant|model` answers; the spend per user is bounded
per tenant and day (an `_other` cell, counted)."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from sidecar import attribution, status
from sidecar.attribution import Attribution, AttributionConfig, SpendCap
from sidecar.backends.memory import MemoryBackend
from sidecar.backends.redis import RedisBackend
from sidecar.ledger.events import UsageEvent
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.spend import SpendCell, held_cell, report
from sidecar.ledger.storable import original_text, storable
from sidecar.ledger.writer import EventLog
from sidecar.metrics import Metrics
from sidecar.model import Kind, Request
from sidecar.policy.load import PolicyError, parse_policy
from sidecar.settlement.book import parse_reservation, reservation_record
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_CACHE_PRICING
from tests.support.procs import post_json

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_CACHE_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 10000000}
  budget: {usd: 100, period: month}
%s
"""
TRUSTED = "attribution: {trusted: true}"
TRUSTS = AttributionConfig(trusted=True)


def test_values_are_read_only_from_a_trusted_filter_and_bounded():
    dropped: list[tuple[str, str]] = []
    headers = {"x-kt-end-user": "alice@example.com", "x-kt-tags": "batch, team:search,batch"}
    # the client's own word: ignored, nothing counted
    assert attribution.read(headers, AttributionConfig(), lambda *d: dropped.append(d)) \
        == attribution.NONE and not dropped
    assert attribution.read(headers, TRUSTS) == Attribution(
        "alice@example.com", ("batch", "team:search"))  # trimmed, each tag once
    # the well-formed header's one-match path says the same
    assert attribution.read({"x-kt-end-user": "a.b", "x-kt-tags": "x,y=1,x"}, TRUSTS) \
        == Attribution("a.b", ("x", "y=1"))
    assert attribution.read({"x-kt-end-user": "bad user", "x-kt-tags": "x"}, TRUSTS) \
        == Attribution("", ("x",))
    nine = ",".join(f"t{i}" for i in range(9))
    assert attribution.read({"x-kt-tags": nine}, TRUSTS).tags == tuple(nine.split(",")[:8])
    for user, why in (("u" * 129, "too_long"), ("bob smith", "charset"), ("_other", "charset"),
                      ("~user|x", "charset"), ("a\x00b", "charset"), ("é", "charset")):
        dropped.clear()
        got = attribution.read({"x-kt-end-user": user, "x-kt-tags": "ok"}, TRUSTS,
                               lambda *d: dropped.append(d))
        assert got == Attribution("", ("ok",)) and dropped == [("user", why)], user
    dropped.clear()
    many = ",".join(f"t{i}" for i in range(attribution.TAGS_MAX + 2))
    got = attribution.read({"x-kt-tags": many + ",bad tag," + "x" * 65}, TRUSTS,
                           lambda *d: dropped.append(d))
    assert got.tags == tuple(f"t{i}" for i in range(attribution.TAGS_MAX))
    assert sorted(dropped) == [("tags", "charset"), ("tags", "too_long"),
                               ("tags", "too_many"), ("tags", "too_many")]
    dropped.clear()
    assert attribution.read({"x-kt-tags": "a," * 1000}, TRUSTS,
                            lambda *d: dropped.append(d)) == attribution.NONE
    assert dropped == [("tags", "too_long")]


def test_the_policy_section_is_checked():
    ok = parse_policy((POLICY % "attribution: {user_header: x-user, trusted: true}").encode(),
                      "<t>")
    assert ok.attribution == AttributionConfig(user_header="x-user", trusted=True)
    for section, fragment in (
            ("attribution: {user_header: X_User}", "$.attribution.user_header: must be a "
                                                   "lower-case header name"),
            ("attribution: {tags_header: x-kt-end-user}", "must differ from user_header"),
            ("attribution: {trusted: yes-please}", "$.attribution.trusted"),
            ("attribution: {users: x}", "$.attribution")):
        with pytest.raises(PolicyError, match=fragment.replace("$", r"\$").replace(".", r"\.")):
            parse_policy((POLICY % section).encode(), "<t>")


def test_a_shared_reservation_record_keeps_the_attribution():
    record = reservation_record(1, "gpt-4o|mini", 10, 20, 30, "openai", 5, 7, 0,
                                "alice@example.com", "batch,team:search")
    res = parse_reservation("acme", record)
    assert res is not None
    assert (res.model, res.provider, res.user, res.tags, res.bound_output) == (
        "gpt-4o|mini", "openai", "alice@example.com", "batch,team:search", 7)
    plain = parse_reservation("acme", reservation_record(0, "m", 1, 2, 3))
    assert plain is not None and (plain.user, plain.tags, plain.model) == ("", "", "m")


def test_the_spend_cap_puts_a_flood_of_users_in_one_bounded_other_cell():
    cap = SpendCap(per_tenant_day=3, names_max=5)
    assert [cap.admit("acme", 100, "user", f"u{i}") for i in range(5)] == [
        "u0", "u1", "u2", "_other", "_other"]
    assert cap.admit("acme", 100, "user", "u1") == "u1"  # one already named stays itself
    assert cap.admit("acme", 100, "tag", "t0") == "t0"  # a dimension of its own
    assert cap.admit("beta", 100, "user", "b0") == "b0"
    # the process-wide bound: 5 names held, the next new one is _other whatever its tenant
    assert len(cap) == 5 and cap.admit("gamma", 100, "user", "g0") == "_other"
    assert cap.overflowed == 3
    # two days later the old names are forgotten: memory does not grow with the days
    assert cap.admit("acme", 102, "user", "u9") == "u9" and len(cap) == 1
    assert cap.admit("acme", 100, "user", "late") == "_other"  # a day never written again


def test_grouping_by_each_key_counts_each_request_once():
    day = 20_000
    cells = [
        SpendCell("acme", day, "gpt-4o", (2, 100, 10, 0, 0, 2000)),
        SpendCell("acme", day, "gpt-4o-mini", (1, 50, 5, 0, 0, 100)),
        SpendCell("beta", day + 1, "gpt-4o", (1, 10, 1, 0, 0, 300)),
        # the same requests again under their attribution
        SpendCell("acme", day, attribution.spend_model("user", "alice"), (2, 120, 12, 0, 0, 2050)),
        SpendCell("beta", day + 1, attribution.spend_model("user", "alice"), (1, 10, 1, 0, 0, 300)),
        SpendCell("acme", day, attribution.spend_model("user", "_other"), (1, 30, 3, 0, 0, 50)),
        SpendCell("acme", day, attribution.spend_model("tag", "batch"), (3, 150, 15, 0, 0, 2100)),
        held_cell("acme", 1_700_000_000_000_000, 400),  # what the budget holds: shown beside
    ]

    def groups(by, period="total"):
        doc = report(cells, 0, 10**6, period, "memory", by=by)
        assert "tenants" not in doc and doc["by"] == by
        assert doc["held"]["acme"]["amount"] == 400
        return {g: (v["requests"], v["cost_nano_usd"]) if period == "total" else
                {p: c["cost_nano_usd"] for p, c in v.items()} for g, v in doc["groups"].items()}

    assert groups("tenant") == {"acme": (3, 2100), "beta": (1, 300)}
    assert groups("model") == {"gpt-4o": (3, 2300), "gpt-4o-mini": (1, 100)}
    assert groups("user") == {"alice": (3, 2350), "_other": (1, 50)}
    assert groups("tag") == {"batch": (3, 2100)}
    # one tenant's own: its users only, its held amount only
    beta = report(cells, 0, 10**6, "total", "memory", by="user", tenant="beta")
    assert {u: v["requests"] for u, v in beta["groups"].items()} == {"alice": 1}
    assert beta["held"] == {} and beta["tenant"] == "beta"
    assert groups("user", "day") == {"alice": {"2024-10-04": 2050, "2024-10-05": 300},
                                     "_other": {"2024-10-04": 50}}
    # the usual report (and anything that sums a tenant's spend) never counts them twice
    plain = report(cells, 0, 10**6, "total", "memory")["tenants"]
    assert plain == {"acme": {"gpt-4o": plain["acme"]["gpt-4o"],
                              "gpt-4o-mini": plain["acme"]["gpt-4o-mini"]},
                     "beta": {"gpt-4o": plain["beta"]["gpt-4o"]}}


@pytest.fixture
def ledgered(tmp_path):
    events = EventLog(FileSink(tmp_path / "events", fsync=False),
                      SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    led = Ledger(events, instance="test-1")
    with RunningSidecar(POLICY % TRUSTED, ledger=led) as sc:
        yield sc, led, tmp_path / "events"


def decide(sc, headers: dict[str, str]):
    body = json.dumps({"model": "gpt-4o", "max_tokens": 100,
                       "messages": [{"role": "user", "content": "x" * 396}]}).encode()
    out = sc.run(sc.sidecar.service.decider.decide(
        Request(headers={"x-tenant-id": "acme", **headers}, body=body)))
    assert out.kind is Kind.ALLOW
    return out.reservation_id


def spend(sc, query: str) -> dict:
    with urllib.request.urlopen(f"{sc.admin_base}/v1/spend{query}", timeout=10) as r:
        return json.load(r)


def test_every_outcome_carries_the_attribution_into_its_event_and_the_spend(ledgered):
    sc, led, directory = ledgered
    svc = sc.sidecar.service.settlement
    alice = {"x-kt-end-user": "alice", "x-kt-tags": "batch,eval"}
    settled = decide(sc, alice)
    kept = decide(sc, {"x-kt-end-user": "bob"})
    released = decide(sc, alice)
    hostile = decide(sc, {"x-kt-end-user": "mallory\x00" + "x" * 300, "x-kt-tags": "ok"})
    sc.run(svc.settle_usage(settled, None, "gpt-4o", 1000, 100, "access_log"))
    sc.run(svc.charge_unread(kept, "abandoned"))
    sc.run(svc.release(released, "upstream_error"))
    sc.run(svc.settle_usage(hostile, None, "gpt-4o", 10, 1, "access_log"))
    # usage without a reservation (RLS, Envoy's failure mode): the access log's attribution
    sc.run(svc.settle_usage("no-reservation", "acme", "gpt-4o", 20, 2, "access_log",
                            settle_id="fresh-1", att=Attribution("carol", ("eval",))))
    sc.run(_drain(sc))
    assert led.events is not None and led.events.flush()
    events = {e.request_id: e for e in read_events(event_files(directory))}
    assert (events[settled].user, events[settled].tags) == ("alice", ("batch", "eval"))
    assert (events[kept].outcome, events[kept].user, events[kept].tags) == ("kept", "bob", ())
    assert (events[released].outcome, events[released].user) == ("released", "alice")
    assert (events[hostile].user, events[hostile].tags) == ("", ("ok",))
    assert (events["no-reservation"].user, events["no-reservation"].tags) == ("carol", ("eval",))
    dropped = sc.sidecar.service.metrics.attribution_dropped.labels("user", "too_long")
    assert dropped._value.get() == 1
    # the spend: by user, by tag; a released request cost nothing; each request once by
    # tenant and model
    by_user = spend(sc, "?by=user")["groups"]
    assert set(by_user) == {"alice", "bob", "carol"}
    assert by_user["alice"]["requests"] == 1 and by_user["alice"]["input_tokens"] == 1000
    assert by_user["carol"]["cost_nano_usd"] == events["no-reservation"].cost_nano_usd
    by_tag = spend(sc, "?by=tag")["groups"]
    assert {t: v["requests"] for t, v in by_tag.items()} == {"batch": 1, "eval": 2, "ok": 1}
    by_tenant = spend(sc, "?by=tenant")["groups"]
    assert by_tenant["acme"]["requests"] == 4  # settled, kept, hostile, no-reservation
    assert by_tenant["acme"]["cost_nano_usd"] == sum(
        e.cost_nano_usd for e in events.values() if e.outcome != "released")
    assert spend(sc, "")["tenants"]["acme"]["gpt-4o"]["requests"] == 4
    assert spend(sc, "?by=user&tenant=acme")["groups"].keys() == by_user.keys()
    assert spend(sc, "?by=user&tenant=someone-else")["groups"] == {}
    # no metric has a user or a tag in it
    exposition = urllib.request.urlopen(f"{sc.http_base}/metrics", timeout=5).read().decode()
    assert "alice" not in exposition and "batch" not in exposition


async def _drain(sc) -> None:
    """Write the attribution cells summed so far and wait for the background spend
    writes (a kept estimate's)."""
    await sc.sidecar.service.settlement.attributed.flush()
    background = sc.sidecar.service.settlement._background
    while background:
        await asyncio.gather(*list(background), return_exceptions=True)


def test_a_flood_of_user_ids_is_capped_and_counted(ledgered):
    sc, _, _ = ledgered
    svc = sc.sidecar.service.settlement
    svc.attributed.cap = SpendCap(per_tenant_day=5)
    for i in range(40):
        sc.run(svc.settle_usage(f"f-{i}", "acme", "gpt-4o", 10, 1, "report",
                                att=Attribution(f"user-{i}")))
    sc.run(_drain(sc))
    by_user = spend(sc, "?by=user")["groups"]
    assert len(by_user) == 6 and by_user["_other"]["requests"] == 35
    assert sum(v["requests"] for v in by_user.values()) == 40
    other = sc.sidecar.service.metrics.attribution_spend_other.labels("user")
    assert other._value.get() == 35


def test_a_bad_group_key_is_a_400():
    with RunningSidecar(POLICY % "") as sc:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{sc.admin_base}/v1/spend?by=person", timeout=5)
        assert err.value.code == 400
        assert "by must be one of model, tag, tenant, user" in json.load(err.value)["error"][
            "message"]


def test_a_hostile_tag_in_a_replayed_event_is_made_storable():
    """Values are bounded where they enter, but a spill file replayed is text read back:
    a tag holding NUL is escaped like any text value, never a batch PostgreSQL refuses."""
    ev = UsageEvent(request_id="r", tenant="acme", outcome="settled", settled_by="report",
                    settled_us=1, user="alice", tags=("ok", "bad\x00tag", "y" * 600))
    stored = storable(ev)
    assert stored.tags[0] == "ok" and "\x00" not in stored.tags[1]
    assert original_text(stored.tags[1]) == "bad\x00tag" and len(stored.tags[2]) <= 512
    assert storable(UsageEvent(request_id="r", tenant="acme", outcome="settled",
                               settled_by="report", settled_us=1, tags=("a", "b"))).tags \
        == ("a", "b")


def test_spend_by_user_and_tag_on_redis_from_another_replica(empty_valkey):
    """On Redis the cells live in the tenant's spend hash, written by one replica and read
    by another; a shared reservation carries the attribution to the replica that settles."""
    text = POLICY % (TRUSTED + f'\nbackend: {{kind: redis, url: "{empty_valkey.url}", '
                              'timeout_ms: 500, shared_reservations: true}')
    pol = parse_policy(text.encode(), "<t>")
    with RunningSidecar(text, backend=RedisBackend(pol.backend)) as a, \
            RunningSidecar(text, backend=RedisBackend(pol.backend)) as b:
        rid = decide(a, {"x-kt-end-user": "alice", "x-kt-tags": "batch"})
        # its usage reaches the other replica: the shared record names alice
        assert b.run(b.sidecar.service.settlement.settle_usage(
            rid, "acme", "gpt-4o", 100, 10, "report")).applied
        b.run(_drain(b))
        by_user = spend(a, "?by=user")["groups"]
        by_tag = spend(a, "?by=tag&period=day")["groups"]
        plain = spend(a, "")["tenants"]
    assert list(by_user) == ["alice"] and by_user["alice"]["input_tokens"] == 100
    assert [list(v.values())[0]["requests"] for v in by_tag.values()] == [1]
    assert list(plain["acme"]) == ["gpt-4o"]  # no attribution cell among the models


def test_a_usage_report_may_name_the_user_and_tags_bounded_like_a_header():
    """`POST /v1/usage` (the admin token's holder) attributes usage no reservation did;
    a value past its bounds is dropped and counted, the report still settles."""
    with RunningSidecar(POLICY % "") as sc:
        status, ack = post_json(f"{sc.admin_base}/v1/usage", {
            "request_id": "rep-1", "tenant": "acme", "model": "gpt-4o", "input_tokens": 30,
            "output_tokens": 3, "user": "dave", "tags": ["nightly", "no spaces please"]})
        assert status == 200 and ack["applied"]
        status, ack = post_json(f"{sc.admin_base}/v1/usage", {
            "request_id": "rep-2", "tenant": "acme", "model": "gpt-4o", "input_tokens": 1,
            "output_tokens": 1, "user": "x" * 500})
        assert status == 200 and ack["applied"]
        status, _ = post_json(f"{sc.admin_base}/v1/usage", {
            "request_id": "rep-3", "tenant": "acme", "input_tokens": 1, "output_tokens": 1,
            "tags": "not-a-list"})
        assert status == 400
        sc.run(_drain(sc))
        assert spend(sc, "?by=user")["groups"]["dave"]["input_tokens"] == 30
        assert list(spend(sc, "?by=tag")["groups"]) == ["nightly"]
        metrics = sc.sidecar.service.metrics.attribution_dropped
        assert metrics.labels("tags", "charset")._value.get() == 1
        assert metrics.labels("user", "too_long")._value.get() == 1


def test_the_cells_are_summed_written_at_once_and_a_clean_stop_writes_the_last(tmp_path):
    """Fifty settlements of one user are one write of one cell per user and tag (a store
    call per request and value would outnumber the settlements); a clean stop writes the
    cells still summed, and the embedded backend's state file keeps them."""
    state = str(tmp_path / "spend.json")
    with RunningSidecar(POLICY % TRUSTED, backend=MemoryBackend(state_file=state)) as sc:
        svc = sc.sidecar.service.settlement
        writes: list[str] = []
        record = svc.backend.record_spend

        async def counted(tenant, spend, *args):
            writes.append(spend.model)
            await record(tenant, spend, *args)

        svc.backend.record_spend = counted  # type: ignore[method-assign]
        svc.attributed.interval_s = 3600  # only the stop writes them
        for i in range(50):
            sc.run(svc.settle_usage(f"s-{i}", "acme", "gpt-4o", 10, 1, "report",
                                    att=Attribution("erin", ("nightly",))))
        assert writes == []
    assert sorted(writes) == ["~tag|nightly", "~user|erin"]
    with RunningSidecar(POLICY % TRUSTED, backend=MemoryBackend(state_file=state)) as sc:
        by_user = spend(sc, "?by=user")["groups"]
    assert by_user == {"erin": by_user["erin"]} and by_user["erin"]["requests"] == 50
    assert by_user["erin"]["input_tokens"] == 500


def test_kt_status_counts_a_tenants_spend_once():
    day = 20_000
    cells = [SpendCell("acme", day, "gpt-4o", (2, 100, 10, 0, 0, 2000)),
             SpendCell("acme", day, attribution.spend_model("user", "alice"), (2, 100, 10, 0, 0,
                                                                              2000)),
             SpendCell("acme", day, attribution.spend_model("tag", "batch"), (2, 100, 10, 0, 0,
                                                                             2000))]
    doc = status.document(ready=True, detail="", ledger="", backend="memory", policy_source="",
                          policy_digest="", registry=Metrics().registry, today=day,
                          cells=cells, failure_mode_last_minute=0)
    assert [(t["tenant"], t["requests"], t["usd"]) for t in doc["top_tenants_today"]] == [
        ("acme", 2, 2000 / 1e9)]
