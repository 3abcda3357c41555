"""Red team of the management API (sidecar/tenants_api.py, sidecar/overlay_sync.py): a web
page on the operator's machine, names no request can carry, a fleet whose sidecars do not
all compile the same overlay."""
from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Optional


from sidecar.backends.redis import RedisBackend
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile
from sidecar.ledger.spend import SpendRecord
from sidecar.ledger.writer import EventLog
from sidecar.model import Kind, Request
from sidecar.policy.load import parse_policy
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_PRICING
from tests.transports.test_tenants_api import POLICY, audit, call, check


def raw_call(sc: RunningSidecar, method: str, path: str, body: bytes,
             headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", sc.sidecar.admin_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_web_page_cannot_use_a_tokenless_admin_port(tmp_path: Path):
    """Finding 1 (fixed here): without an admin token the port trusts loopback, and a
    browser is on loopback. A page of any site could POST freeze/unfreeze (and usage
    reports) as a "simple" cross-origin request, no preflight; a page whose host name was
    rebound to 127.0.0.1 could read the spend. Both are 403 now; kt's clients are not."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    with RunningSidecar(POLICY, state_file=str(tmp_path / "state" / "spend.json"),
                        policy_path=str(tmp_path / "policy.yaml")) as sc:
        page = {"origin": "https://evil.example", "content-type": "text/plain"}
        status, body = raw_call(sc, "POST", "/v1/tenants/acme/freeze", b'{"reason": "x"}',
                                page)
        assert status == 403 and b"browser_request" in body
        status, _ = raw_call(sc, "POST", "/v1/usage", b'{"request_id": "r", "tenant": '
                             b'"acme", "input_tokens": 1000000000, "output_tokens": 0}', page)
        assert status == 403
        status, body = raw_call(sc, "GET", "/v1/spend", b"", {"host": "evil.example:9091"})
        assert status == 403 and b"not a loopback address" in body
        assert sc.sidecar.policy.frozen == frozenset()
        assert check(sc, "acme").status.code == 0  # not frozen, not charged a billion
        # the operator's own clients: loopback names, no Origin
        for host in ("127.0.0.1:9091", "localhost", "LocalHost:9091", "[::1]:9091"):
            assert raw_call(sc, "GET", "/v1/tenants", b"", {"host": host})[0] == 200
        assert call(sc, "POST", "/v1/tenants/acme/freeze", token=None)[0] == 200
        assert check(sc, "acme").denied_response.status.code == 403


def test_a_holder_named_with_outer_spaces_is_refused_not_set_to_no_effect(tmp_path: Path):
    """Finding 4 (fixed here): a request's tenant is read with its spaces stripped, so a
    holder "acme " could never be one: freezing it answered 200 and refused nothing."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    with RunningSidecar(POLICY, state_file=str(tmp_path / "state" / "spend.json"),
                        policy_path=str(tmp_path / "policy.yaml")) as sc:
        for path in ("/v1/tenants/acme%20/freeze", "/v1/tenants/%20acme/freeze"):
            status, body = call(sc, "POST", path, token=None)
            assert status == 400 and body["error"]["code"] == "invalid_name", body
        status, body = call(sc, "PUT", "/v1/tenants/%20acme", {"limits": {"rpm": 1}},
                            token=None)
        assert status == 400 and "space" in body["error"]["message"]
        assert sc.sidecar.policy.frozen == frozenset()
        assert " acme" not in sc.sidecar.policy.tenants


def test_a_raw_non_ascii_path_is_a_400_not_another_holder(tmp_path: Path):
    """Finding 7 (fixed here): the admin port reads the request line as Latin-1, so a raw
    UTF-8 name (curl sends `acmé` as it is) froze "acmÃ©", a holder no request names, and
    answered 200; the --workers supervisor failed to forward it (503, a traceback)."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    with RunningSidecar(POLICY, state_file=str(tmp_path / "state" / "spend.json"),
                        policy_path=str(tmp_path / "policy.yaml")) as sc:
        with socket.create_connection(("127.0.0.1", sc.sidecar.admin_port), timeout=10) as s:
            s.sendall("POST /v1/tenants/acmé/freeze HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                      "content-length: 0\r\nconnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 ") and b"invalid_path" in answer
        assert sc.sidecar.policy.frozen == frozenset()
        # percent-encoded, as `kt tenants` sends it: the holder a request names
        assert call(sc, "POST", "/v1/tenants/acm%C3%A9/freeze", token=None)[0] == 200
        assert sc.sidecar.policy.frozen == frozenset({"acmé"})


# a second policy file of the same fleet (a ConfigMap mid-rollout): a tier whose model has
# no price, so no holder may have a USD budget here, which the first file allows
OTHER_FILE = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
  - {name: local, model: local-llama}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
defaults:
  limits: {rpm: 1000, tpm: 10000000}
tenants:
  acme:
    limits: {rpm: 500}
    budget: {tokens: 1000000, period: month}
"""


def _on_redis(policy: str, url: str, prefix: str) -> str:
    return policy + f"backend: {{kind: redis, url: '{url}', key_prefix: {prefix}}}\n"


def _sidecar(policy: str, path: Path, ledger: Optional[Ledger] = None) -> RunningSidecar:
    path.write_text(policy)
    compiled = parse_policy(policy.encode(), "<test>")
    return RunningSidecar(policy, backend=RedisBackend(compiled.backend),
                          policy_path=str(path), ledger=ledger)


def test_a_freeze_reaches_a_sidecar_that_cannot_compile_another_holders_block(
        empty_valkey, tmp_path: Path):
    """Finding 3 (the freezes fixed here): the overlay is checked over the file of the
    sidecar that takes the change; another sidecar's file may differ (a ConfigMap
    mid-rollout) and refuse a block. That sidecar then applied no later version at all:
    a freeze made in an incident never reached it."""
    a_policy = _on_redis(POLICY, empty_valkey.url, "kt-rt3")
    b_policy = _on_redis(OTHER_FILE, empty_valkey.url, "kt-rt3")
    with _sidecar(a_policy, tmp_path / "a.yaml") as a, \
            _sidecar(b_policy, tmp_path / "b.yaml") as b:
        assert check(b, "acme").status.code == 0
        # valid over a's file; over b's, a USD budget with an unpriced tier
        assert call(a, "PUT", "/v1/tenants/newco", {"budget": {"usd": 5}}, token=None)[0] == 200
        # the incident: acme must stop now, on every sidecar
        assert call(a, "POST", "/v1/tenants/acme/freeze", token=None)[0] == 200
        errors = b.sidecar.metrics.overlay_applied.labels("error")._value.get()
        assert b.run(b.sidecar.overlay.refresh())  # what b's poll does every 250 ms
        assert check(b, "acme").denied_response.status.code == 403
        # the block b cannot compile is not served there: newco is refused (set aside,
        # never the defaults), counted as an overlay error so the alert fires
        assert "newco" not in b.sidecar.policy.tenants and "newco" in b.sidecar.policy.frozen
        assert check(b, "newco").denied_response.status.code == 403
        assert b.sidecar.metrics.overlay_applied.labels("error")._value.get() > errors
        assert b.sidecar.metrics.overlay_set_aside._value.get() == 1  # until the files agree
        # another holder's change reaches b all the same (finding 3 (b))
        assert call(a, "PUT", "/v1/tenants/initech", {"limits": {"rpm": 9}}, token=None)[0] == 200
        assert b.run(b.sidecar.overlay.refresh())
        assert b.sidecar.policy.tenants["initech"].limits.rpm == 9
        # and an unfreeze reaches it the same way
        assert call(a, "POST", "/v1/tenants/acme/unfreeze", token=None)[0] == 200
        assert b.run(b.sidecar.overlay.refresh())
        assert check(b, "acme").status.code == 0


def test_a_change_the_store_took_is_audited_even_where_the_overlay_does_not_compile(
        empty_valkey, tmp_path: Path):
    """Finding 3 (c), fixed here: a change through a sidecar whose file does not compile
    another sidecar's block was written, confirmed, then answered 503 "the store did not
    confirm" with no audit event, while every other sidecar served it."""
    events = EventLog(FileSink(tmp_path / "events", fsync=False),
                      SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    led = Ledger(events, instance="b")
    a_policy = _on_redis(POLICY, empty_valkey.url, "kt-rt3c")
    b_policy = _on_redis(OTHER_FILE, empty_valkey.url, "kt-rt3c")
    with _sidecar(a_policy, tmp_path / "a.yaml") as a, \
            _sidecar(b_policy, tmp_path / "b.yaml", led) as b:
        assert call(a, "PUT", "/v1/tenants/newco", {"budget": {"usd": 5}}, token=None)[0] == 200
        status, body = call(b, "POST", "/v1/tenants/acme/freeze", token=None)
        assert status == 200, body
        assert body["overlay_version"] == 2 and "does not serve" in body["warning"]
        assert check(b, "acme").denied_response.status.code == 403  # its marks serve
        b.run(b.sidecar.overlay.refresh())
        a.run(a.sidecar.overlay.refresh())  # a serves it too, once polled
        assert check(a, "acme").denied_response.status.code == 403
        got = [(e.action, e.holder, e.version) for e in audit(led, tmp_path / "events")]
        assert got == [("freeze", "acme", 2)]


def test_reading_one_holder_reads_only_that_holders_spend(tmp_path: Path):
    """Finding 9 (fixed here): GET /v1/tenants/{name} read every tenant's spend of the
    budget period (the embedded backend built it on the decisions' event loop: 0.5 s for
    100,000 tenants and one day) to report one holder's."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    with RunningSidecar(POLICY, policy_path=str(tmp_path / "policy.yaml")) as sc:
        backend = sc.sidecar.backend

        async def spent_by_many():
            for t in range(2_000):  # a fleet's other tenants, one cell each today
                await backend.record_spend(f"t{t}", SpendRecord("gpt-4o", 1, 10, 10, 0, 0, 100))
            await backend.record_spend("acme", SpendRecord("gpt-4o", 1, 10, 10, 0, 0, 100))

        sc.run(spent_by_many())
        read: list[int] = []
        cells_of = backend.spend_cells

        async def counted(*args, **kwargs):
            cells = await cells_of(*args, **kwargs)
            read.append(len(cells))
            return cells

        backend.spend_cells = counted  # type: ignore[method-assign]
        status, got = call(sc, "GET", "/v1/tenants/acme", token=None)
        assert status == 200 and got["counters"]["spend"]["models"]["gpt-4o"]["requests"] == 1
        # acme's one cell, not the 2,001 of every tenant (x 30 days x models on a real
        # fleet: a `kt tenants get` stalled every decision of the sidecar for seconds)
        assert sum(read) <= 10, read


def test_one_holders_counters_on_redis_are_its_own_hash(empty_valkey, tmp_path: Path):
    """Finding 9 on Redis: the counters read from the holder's one spend hash (not a SCAN of
    every tenant's) are its own spend and what its budget holds."""
    policy = _on_redis(POLICY, empty_valkey.url, "kt-rt9")
    with _sidecar(policy, tmp_path / "policy.yaml") as sc:
        backend = sc.sidecar.backend
        # a budget of all time: Redis dates the spend by its own clock, and no month's
        # end between the write and the read can move it out of the period
        assert call(sc, "PUT", "/v1/tenants/acme", {"budget": {"usd": 10, "period": "total"}},
                    token=None)[0] == 200

        async def spent():
            await backend.record_spend("acme", SpendRecord("gpt-4o", 2, 10, 10, 0, 0, 700))
            await backend.record_spend("other", SpendRecord("gpt-4o", 5, 10, 10, 0, 0, 900))

        sc.run(spent())
        assert check(sc, "acme").status.code == 0  # its estimate is held by the budget
        status, got = call(sc, "GET", "/v1/tenants/acme", token=None)
        assert status == 200, got
        counters = got["counters"]
        assert counters["spend"]["models"] == {"gpt-4o": {
            "requests": 2, "input_tokens": 10, "output_tokens": 10, "cost_nano_usd": 700}}
        assert counters["budget"]["held"] > 0 and counters["budget"]["settled"] == 700 / 1e9


UNIT_POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
defaults:
  limits: {rpm: 1000, tpm: 10000000}
tenants:
  acme:
    budget: {tokens: 100000, period: month}
"""


def test_a_budget_unit_change_does_not_forget_the_periods_spend(tmp_path: Path):
    (tmp_path / "policy.yaml").write_text(UNIT_POLICY)
    body = json.dumps({"model": "gpt-4o", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with RunningSidecar(UNIT_POLICY, state_file=str(tmp_path / "state" / "spend.json"),
                        policy_path=str(tmp_path / "policy.yaml")) as sc:
        flows = sc.sidecar.service

        async def spend_most_of_the_month():
            d = await flows.decider.decide(Request(headers={"x-tenant-id": "acme"}, body=body))
            assert d.kind is Kind.ALLOW
            await flows.settlement.settle_usage(d.reservation_id, "acme", "gpt-4o", 95_000, 0,
                                                "report")

        sc.run(spend_most_of_the_month())
        live = call(sc, "GET", "/v1/tenants/acme", token=None)[1]["counters"]["live"]
        assert live["budget"]["remaining"] == 5_000  # 95% of the month's tokens spent
        # the holder's plan moves to USD (a self-serve plan change calls this very PUT)
        status, _ = call(sc, "PUT", "/v1/tenants/acme", {"budget": {"usd": 1, "period": "month"}},
                         token=None)
        live = call(sc, "GET", "/v1/tenants/acme", token=None)[1]["counters"]["live"]
        # either the change is refused while the period holds spend in the old unit, or the
        # spend goes on counting: 95,000 input tokens of gpt-4o cost $0.2375 of the $1
        assert status == 409 or live["budget"]["remaining"] <= 1 - 0.2375, live
        assert status == 409 and live["budget"]["remaining"] == 5_000  # nothing changed
        # the operator may start the window's count again on purpose (audited)
        status, _ = call(sc, "PUT", "/v1/tenants/acme?force=true",
                         {"budget": {"usd": 1, "period": "month"}}, token=None)
        assert status == 200
        # a change that keeps the unit is no conflict
        assert call(sc, "PUT", "/v1/tenants/acme", {"budget": {"usd": 2, "period": "month"}},
                    token=None)[0] == 200


TREE_POLICY = """
tenant: {header: x-tenant-id, unknown: deny}
""" + TIERS_AND_PRICING + """
tenants:
  org: {budget: {tokens: 100000, period: month}}
  team: {budget: {tokens: 50000, period: month}}
  key: {parent: team, budget: {tokens: 1000, period: day}}
"""


def test_a_change_that_moves_holders_to_another_tree_is_refused_on_redis(
        empty_valkey, tmp_path: Path):
    """Red team round 2, finding 4: on Redis a tree's cells are kept under its root's hash
    tag, so putting an org above a team (or a flat holder into a tree) gave the team and
    every key below it new, empty keys: a free period for the whole subtree. The API now
    refuses it (409 tree_change) unless forced; a change inside one tree is no move."""
    policy = _on_redis(TREE_POLICY, empty_valkey.url, "kt-rt-tree")
    with _sidecar(policy, tmp_path / "policy.yaml") as sc:
        # a change that would break another holder (the key names the team as its parent)
        # is refused, not served with that holder set aside
        status, body = call(sc, "DELETE", "/v1/tenants/team", token=None)
        assert status == 400 and body["error"]["code"] == "invalid_policy", body
        assert "team" in sc.sidecar.policy.tenants and not sc.sidecar.policy.frozen
        status, body = call(sc, "PUT", "/v1/tenants/team",
                            {"parent": "org", "budget": {"tokens": 50000, "period": "month"}},
                            token=None)
        assert status == 409 and body["error"]["code"] == "tree_change", body
        # the org too: a flat holder until now, its cells would be new keys as well
        assert body["error"]["holders"] == ["key", "org", "team"]
        assert sc.sidecar.policy.rule_for("team").path.root == "team"  # nothing changed
        # the same root: the key's own limits change, its cells stay where they are
        assert call(sc, "PUT", "/v1/tenants/key",
                    {"parent": "team", "budget": {"tokens": 2000, "period": "day"}},
                    token=None)[0] == 200
        status, _ = call(sc, "PUT", "/v1/tenants/team?force=true",
                         {"parent": "org", "budget": {"tokens": 50000, "period": "month"}},
                         token=None)
        assert status == 200 and sc.sidecar.policy.rule_for("key").path.root == "org"
