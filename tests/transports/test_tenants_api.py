"""The management API of holders on the admin port (sidecar/tenants_api.py, docs/budgets.md
"Management API"): an overlay over the policy file, checked as the file is, kept beside
the state file (embedded) or in Redis (a fleet), applied at once, audited in the ledger;
freeze refuses a holder on every deciding transport; hostile input changes nothing."""
from __future__ import annotations

import http.client
import io
import json
import time
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from openapi_spec_validator import validate

from sidecar import cli, http_routes
from sidecar.backends.base import BackendError
from sidecar.backends.redis import RedisBackend
from sidecar.ledger.events import AdminEvent
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.writer import EventLog
from sidecar.policy import overlay as ov
from sidecar.policy.load import parse_policy
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_PRICING

ADMIN = "admin-token-for-holders-0123456"
POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 10000000}
tenants:
  acme:
    limits: {rpm: 500}
    budget: {usd: 10, period: month}
"""


def call(sc: RunningSidecar, method: str, path: str, body: Any = None,
         token: Optional[str] = ADMIN, raw: Optional[bytes] = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", sc.sidecar.admin_port, timeout=10)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["content-type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    ctype = resp.getheader("content-type") or ""
    return resp.status, json.loads(payload) if "json" in ctype else payload.decode()


def check(sc: RunningSidecar, tenant: str):
    """A gRPC ext_authz Check of one chat request."""
    req = external_auth_pb2.CheckRequest()
    req.attributes.request.http.headers["x-tenant-id"] = tenant
    req.attributes.request.http.raw_body = json.dumps(
        {"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    with grpc.insecure_channel(sc.grpc_target) as ch:
        return external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def denied_headers(resp) -> dict[str, str]:
    return {o.header.key: o.header.value for o in resp.denied_response.headers}


def rls(sc: RunningSidecar, tenant: str) -> int:
    req = rls_pb2.RateLimitRequest(domain="kt", hits_addend=5)
    d = req.descriptors.add()
    d.entries.add(key="tenant", value=tenant)
    with grpc.insecure_channel(sc.grpc_target) as ch:
        return rls_pb2_grpc.RateLimitServiceStub(ch).ShouldRateLimit(req, timeout=5).overall_code


def fast_path(sc: RunningSidecar, tenant: str) -> tuple[int, dict[str, str]]:
    """One request through the HTTP ext_authz fast path (Envoy's form: the body inline)."""
    body = json.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": []})
    conn = http.client.HTTPConnection("127.0.0.1", sc.sidecar.http_authz_port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"x-tenant-id": tenant, "content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


@pytest.fixture
def setup(tmp_path: Path):
    (tmp_path / "admin").write_text(ADMIN + "\n")
    (tmp_path / "policy.yaml").write_text(POLICY)
    return tmp_path


def running(tmp: Path, ledger: Optional[Ledger] = None, **config) -> RunningSidecar:
    return RunningSidecar(
        (tmp / "policy.yaml").read_text(), state_file=str(tmp / "state" / "spend.json"),
        policy_path=str(tmp / "policy.yaml"), ledger=ledger,
        config={"admin_token_file": str(tmp / "admin"), "http_authz_addr": "127.0.0.1:0",
                **config})


def audit(led: Ledger, directory: Path) -> list[AdminEvent]:
    assert led.events is not None and led.events.flush()
    return [e for e in read_events(event_files(directory)) if isinstance(e, AdminEvent)]


def test_a_holder_set_frozen_and_deleted_through_the_api_is_served_everywhere_and_audited(
        setup):
    events = EventLog(FileSink(setup / "events", fsync=False), SpillFile(setup / "spill.jsonl"),
                      flush_interval_s=0.01)
    led = Ledger(events, instance="admin-test")
    with running(setup, led) as sc:
        # no token: 401, nothing changes
        status, body = call(sc, "PUT", "/v1/tenants/team-search", {"limits": {"rpm": 1}},
                            token=None)
        assert status == 401 and body["error"]["code"] == "unauthorized"
        assert call(sc, "GET", "/v1/tenants/team-search")[1]["source"] == "defaults"

        # set: a new holder, in force at once on gRPC (its rpm of 1: the second is refused)
        status, body = call(sc, "PUT", "/v1/tenants/team-search",
                            {"limits": {"rpm": 1}, "priority": "high"})
        assert status == 200, body
        version = body["overlay_version"]
        assert version == 1
        status, got = call(sc, "GET", "/v1/tenants/team-search")
        assert got["source"] == "overlay" and got["policy"]["limits"]["rpm"] == 1
        assert got["policy"]["priority"] == "high"
        assert got["overlay"]["block"] == {"limits": {"rpm": 1}, "priority": "high"}
        assert got["overlay"]["by"] == "admin-token"
        assert check(sc, "team-search").status.code == 0
        assert check(sc, "team-search").denied_response.status.code == 429

        # freeze: refused with reason frozen on gRPC ext_authz, the fast path and RLS
        status, body = call(sc, "POST", "/v1/tenants/acme/freeze", {"reason": "invoice unpaid"})
        assert status == 200 and body["overlay_version"] == version + 1
        denied = check(sc, "acme")
        assert denied.denied_response.status.code == 403
        assert denied_headers(denied)["x-kt-reason"] == "frozen"
        assert json.loads(denied.denied_response.body)["error"]["code"] == "tenant_frozen"
        status, headers = fast_path(sc, "acme")
        assert status == 403 and headers["x-kt-reason"] == "frozen"
        assert rls(sc, "acme") == rls_pb2.RateLimitResponse.OVER_LIMIT
        assert call(sc, "GET", "/v1/tenants/acme")[1]["frozen"]["reason"] == "invoice unpaid"
        assert check(sc, "globex").status.code == 0  # only the frozen holder
        # freezing again changes nothing (no new version, no event)
        assert call(sc, "POST", "/v1/tenants/acme/freeze")[1]["unchanged"] is True
        assert call(sc, "POST", "/v1/tenants/acme/unfreeze")[0] == 200
        assert check(sc, "acme").status.code == 0
        assert rls(sc, "acme") == rls_pb2.RateLimitResponse.OK

        # delete a holder of the file: hidden (the defaults serve it), until the overlay
        # entry is dropped and the file's entry serves again
        assert call(sc, "GET", "/v1/tenants/acme")[1]["policy"]["limits"]["rpm"] == 500
        assert call(sc, "DELETE", "/v1/tenants/acme")[0] == 200
        got = call(sc, "GET", "/v1/tenants/acme")[1]
        assert got["source"] == "defaults" and got["deleted"] is True
        assert got["policy"]["limits"]["rpm"] == 1000
        assert call(sc, "DELETE", "/v1/tenants/acme?scope=overlay")[0] == 200
        got = call(sc, "GET", "/v1/tenants/acme")[1]
        assert got["source"] == "file" and got["policy"]["limits"]["rpm"] == 500

        trail = audit(led, setup / "events")
        assert [(e.action, e.holder) for e in trail] == [
            ("set", "team-search"), ("freeze", "acme"), ("unfreeze", "acme"),
            ("delete", "acme"), ("delete_overlay", "acme")]
        assert {e.who for e in trail} == {"admin-token"}
        assert trail[0].before == "" and json.loads(trail[0].after)["block"]["limits"] == {
            "rpm": 1}
        assert json.loads(trail[2].before)["reason"] == "invoice unpaid" and trail[2].after == ""
        assert [e.version for e in trail] == list(range(1, 6))


def test_hostile_names_and_bodies_are_400_with_a_reason_and_change_nothing(setup):
    with running(setup) as sc:
        digest = sc.sidecar.policy.digest
        cases = [
            ("PUT", "/v1/tenants/%7Bslot%7D", json.dumps({}).encode(), "invalid_name"),
            ("PUT", "/v1/tenants/" + "a" * 129, b"{}", "invalid_name"),
            ("PUT", "/v1/tenants/%ff%fe", b"{}", "invalid_name"),
            ("PUT", "/v1/tenants/x%00y", b"{}", "invalid_name"),
            ("PUT", "/v1/tenants/new", b"{not json", "invalid_body"),
            ("PUT", "/v1/tenants/new", b"[1, 2]", "invalid_body"),
            ("PUT", "/v1/tenants/new", b'{"limits": {"rpm": 0}}', "invalid_policy"),
            ("PUT", "/v1/tenants/new", b'{"limits": {"rpn": 5}}', "invalid_policy"),
            ("PUT", "/v1/tenants/new", b'{"budget": {"usd": -1}}', "invalid_policy"),
            ("PUT", "/v1/tenants/new", b'{"priority": "urgent"}', "invalid_policy"),
            ("PUT", "/v1/tenants/new", b'{"x": "' + b"a" * 20_000 + b'"}', "invalid_body"),
            ("PUT", "/v1/tenants/new", b"[" * 16_000, "invalid_body"),
            ("PUT", "/v1/tenants/new", b'{"limits":' * 900 + b"1" + b"}" * 900, "invalid_policy"),
            ("POST", "/v1/tenants/acme/freeze", b'{"a":' * 3000 + b"1" + b"}" * 3000,
             "invalid_body"),
            ("POST", "/v1/tenants/acme/freeze", b'{"reason": 5}', "invalid_body"),
            ("POST", "/v1/tenants/acme/freeze", b'{"why": "x"}', "invalid_body"),
            ("DELETE", "/v1/tenants/acme?scope=everything", None, "invalid_query"),
            ("GET", "/v1/tenants?limit=0", None, "invalid_query"),
            ("GET", "/v1/tenants?limit=99999", None, "invalid_query"),
        ]
        for method, path, raw, code in cases:
            status, body = call(sc, method, path, raw=raw)
            assert status == 400, (path, body)
            assert body["error"]["code"] == code, (path, body)
            assert body["error"]["message"]
        # a bad block names the field, as the policy file's errors do
        status, body = call(sc, "PUT", "/v1/tenants/new", raw=b'{"limits": {"rpm": 0}}')
        assert body["error"]["errors"][0].startswith("$.limits.rpm: must be in 1..")
        # beyond the admin port's body limit: refused before it is read
        status, _ = call(sc, "PUT", "/v1/tenants/new", raw=b"{" + b" " * 70_000 + b"}")
        assert status == 413
        assert call(sc, "PATCH", "/v1/tenants/acme", raw=b"{}")[0] == 405
        assert call(sc, "GET", "/v1/tenants/acme/thaw")[0] == 404
        assert sc.sidecar.policy.digest == digest
        assert sc.sidecar.overlay.overlay.version == 0
        assert not (setup / "state" / "spend.overlay.json").exists()


def test_the_overlay_survives_a_restart_and_a_reload_of_the_file(setup):
    with running(setup) as sc:
        assert call(sc, "PUT", "/v1/tenants/team-search", {"limits": {"rpm": 1}})[0] == 200
        assert call(sc, "POST", "/v1/tenants/globex/freeze")[0] == 200
    stored = ov.decode((setup / "state" / "spend.overlay.json").read_bytes())
    assert stored.version == 2 and set(stored.holders) == {"team-search"}
    with running(setup) as sc:
        got = call(sc, "GET", "/v1/tenants/team-search")[1]
        assert got["source"] == "overlay" and got["policy"]["limits"]["rpm"] == 1
        assert check(sc, "globex").denied_response.status.code == 403
        # the file changes: its new holder is served, and the overlay still over it
        (setup / "policy.yaml").write_text(POLICY + "  initech: {limits: {rpm: 7}}\n")
        assert sc.sidecar.reload_if_changed()
        assert sc.sidecar.policy.tenants["initech"].limits.rpm == 7
        assert sc.sidecar.policy.tenants["team-search"].limits.rpm == 1
        assert "globex" in sc.sidecar.policy.frozen
        # a file the overlay does not compile over is refused as a bad file is: the USD
        # budget of the overlay's holder, and the file no longer prices the tiers' models
        assert call(sc, "PUT", "/v1/tenants/team-search", {"budget": {"usd": 5}})[0] == 200
        unpriced = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
defaults:
  limits: {rpm: 1000, tpm: 10000000}
"""
        parse_policy(unpriced.encode(), "<the file alone is good>")
        (setup / "policy.yaml").write_text(unpriced)
        assert not sc.sidecar.reload_if_changed()
        assert sc.sidecar.policy.tenants["initech"].limits.rpm == 7
    # ... and at start that holder is refused (set aside: the file's entry would undo an
    # operator's change), every other holder's change served: no crash loop
    with running(setup) as sc:
        assert "team-search" in sc.sidecar.policy.frozen
        assert "team-search" not in sc.sidecar.policy.tenants
        assert check(sc, "team-search").denied_response.status.code == 403
        assert "globex" in sc.sidecar.policy.frozen  # the rest of the overlay serves
    # an overlay file that is not one stops it too, naming the file
    (setup / "state" / "spend.overlay.json").write_text('{"version": "two"}')
    with pytest.raises(BackendError, match=r"spend\.overlay\.json: not an overlay"):
        with running(setup):
            pass


def test_the_list_is_paged_by_name_and_bounded(setup):
    with running(setup) as sc:
        for i in range(5):
            assert call(sc, "PUT", f"/v1/tenants/t{i}", {"limits": {"tpm": 1000 + i}})[0] == 200
        status, page = call(sc, "GET", "/v1/tenants?limit=4")
        assert status == 200 and page["total"] == 6
        assert [t["name"] for t in page["tenants"]] == ["acme", "t0", "t1", "t2"]
        assert page["tenants"][0]["source"] == "file" and page["tenants"][1]["source"] == "overlay"
        rest = call(sc, "GET", f"/v1/tenants?limit=4&after={page['next']}")[1]
        assert [t["name"] for t in rest["tenants"]] == ["t3", "t4"] and rest["next"] is None


def test_get_reports_the_budget_left_from_the_backend(setup):
    with running(setup) as sc:
        assert check(sc, "acme").status.code == 0
        got = call(sc, "GET", "/v1/tenants/acme")[1]
        budget = got["counters"]["budget"]
        assert budget["unit"] == "usd" and budget["limit"] == 10
        # the admitted request's estimate is held until it settles
        assert budget["held"] > 0 and budget["remaining"] == pytest.approx(10 - budget["held"])
        assert call(sc, "GET", "/v1/tenants/nobody")[1]["source"] == "defaults"
        # the buckets as they stand: one request and its estimate taken, nothing refilled
        # on the manual clock; the budget's spend as the core holds it
        live = got["counters"]["live"]
        assert live["requests"] == {"per_minute": 500, "capacity": 500.0, "level": 499.0}
        assert live["tokens"]["level"] < live["tokens"]["capacity"] == 10_000_000
        assert live["budget"]["spent"] == pytest.approx(budget["held"])
        sc.clock.advance(60)  # a minute later both buckets are full again
        live = call(sc, "GET", "/v1/tenants/acme")[1]["counters"]["live"]
        assert live["requests"]["level"] == 500.0 and live["tokens"]["full_in_us"] == 0
        assert live["tokens"]["level"] == 10_000_000


# --- the OpenAPI document ------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
DOC = json.loads((ROOT / "sidecar" / "openapi.json").read_text())
# every route of the admin port (http_routes.admin_route), with its methods
ADMIN_ROUTES = {
    http_routes.USAGE: {"post"}, http_routes.SPEND: {"get"}, http_routes.STATUS: {"get"},
    http_routes.OPENAPI: {"get"}, "/v1/tenants": {"get"},
    "/v1/tenants/{name}": {"get", "put", "delete"},
    "/v1/tenants/{name}/freeze": {"post"}, "/v1/tenants/{name}/unfreeze": {"post"},
}


def test_the_openapi_document_is_valid_3_1_and_served_by_the_admin_port(setup):
    validate(DOC)
    assert DOC["openapi"].startswith("3.1")
    with running(setup) as sc:
        status, served = call(sc, "GET", "/v1/openapi.json")
        assert status == 200 and served == DOC
        assert call(sc, "GET", "/v1/openapi.json", token=None)[0] == 401


def test_every_admin_route_is_in_the_document_and_every_documented_route_answers(setup):
    documented = {path: {m for m in ops if m in ("get", "put", "post", "delete")}
                  for path, ops in DOC["paths"].items()}
    assert documented == ADMIN_ROUTES
    # every path the admin port routes by (http_routes' names) is documented
    routed = {v for v in vars(http_routes).values() if isinstance(v, str) and v.startswith("/v1/")}
    assert routed and routed <= set(documented)
    with running(setup) as sc:
        for path, methods in documented.items():
            concrete = path.replace("{name}", "acme")
            for method in methods:
                status, body = call(sc, method.upper(), concrete,
                                    raw=b"{}" if method in ("put", "post") else None)
                # answered by the route (never the admin port's "no such route" 404)
                assert body != "not found\n" and "no_such_route" not in json.dumps(body), (
                    method, path, body)
                assert status < 500, (method, path, body)
        assert call(sc, "GET", "/v1/nothing")[1] == "not found\n"
        assert "no_such_route" in json.dumps(call(sc, "GET", "/v1/tenants/a/b/c")[1])


# --- a fleet on one Valkey -------------------------------------------------------------
def test_a_change_on_one_sidecar_is_honoured_by_another_within_a_second(valkey, setup):
    policy = POLICY + f"backend: {{kind: redis, url: '{valkey.url}', key_prefix: kt-admin}}\n"
    (setup / "policy.yaml").write_text(policy)

    def one() -> RunningSidecar:
        compiled = parse_policy(policy.encode(), "<test>")
        return RunningSidecar(policy, backend=RedisBackend(compiled.backend),
                              policy_path=str(setup / "policy.yaml"),
                              config={"admin_token_file": str(setup / "admin")})

    with one() as a, one() as b:
        assert check(b, "acme").status.code == 0
        assert call(a, "POST", "/v1/tenants/acme/freeze")[0] == 200
        assert call(a, "PUT", "/v1/tenants/team-search", {"limits": {"rpm": 3}})[0] == 200
        deadline = time.monotonic() + 1.0
        while True:
            frozen = check(b, "acme").denied_response.status.code == 403
            served = b.sidecar.policy.tenants.get("team-search")
            if frozen and served is not None:
                break
            assert time.monotonic() < deadline, "not honoured by the other sidecar in 1 s"
            time.sleep(0.02)
        assert served.limits.rpm == 3
        assert call(b, "GET", "/v1/tenants/team-search")[1]["source"] == "overlay"
        # live counters read from Valkey's keys: acme's one admitted request is in them
        live = call(a, "GET", "/v1/tenants/acme")[1]["counters"]["live"]
        assert live["budget"]["spent"] > 0 and live["budget"]["unit"] == "usd"
        assert live["requests"]["capacity"] == 500.0 and live["requests"]["level"] <= 500.0
    # a restart of the fleet keeps it: it is in Valkey
    with one() as c:
        assert check(c, "acme").denied_response.status.code == 403


# --- kt tenants ---------------------------------------------------------------------------
def kt(sc: RunningSidecar, setup: Path, *argv: str, token: bool = True) -> int:
    extra = ["--admin", f"127.0.0.1:{sc.sidecar.admin_port}"]
    if token:
        extra += ["--token-file", str(setup / "admin")]
    return cli.main(["tenants", argv[0], *extra, *argv[1:]])


def test_kt_tenants_sets_reads_freezes_and_deletes_with_one_line_errors(setup, capsys,
                                                                          monkeypatch):
    (setup / "block.yaml").write_text("limits: {rpm: 2, tpm: 5000}\nbudget: {usd: 3, period: day}\n")
    with running(setup) as sc:
        assert kt(sc, setup, "set", "team-search", str(setup / "block.yaml")) == 0
        assert "team-search: set (overlay version 1)" in capsys.readouterr().out
        monkeypatch.setattr("sys.stdin", io.StringIO('{"limits": {"rpm": 9}}'))
        assert kt(sc, setup, "set", "team-support") == 0  # the block from stdin, as JSON
        assert sc.sidecar.policy.tenants["team-support"].limits.rpm == 9
        capsys.readouterr()
        assert kt(sc, setup, "get", "team-search", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["source"] == "overlay" and doc["policy"]["budget"]["usd"] == 3
        assert kt(sc, setup, "get", "team-search") == 0
        out = capsys.readouterr().out
        assert "rpm 2, tpm 5000" in out and "left     3 of 3 usd" in out
        assert kt(sc, setup, "list", "--all") == 0
        out = capsys.readouterr().out
        assert [line.split()[0] for line in out.splitlines()[1:]] == [
            "acme", "team-search", "team-support"]
        assert kt(sc, setup, "freeze", "acme", "--reason", "audit") == 0
        assert "acme: frozen" in capsys.readouterr().out
        assert kt(sc, setup, "get", "acme") == 0
        assert "FROZEN   by admin-token: audit" in capsys.readouterr().out
        assert kt(sc, setup, "unfreeze", "acme") == 0
        assert kt(sc, setup, "delete", "team-support") == 0
        assert "team-support" not in sc.sidecar.policy.tenants
        capsys.readouterr()

        # errors: one line each, the 400's reasons shown, nothing changed
        (setup / "bad.yaml").write_text("limits: {rpm: 0}\n")
        assert kt(sc, setup, "set", "x", str(setup / "bad.yaml")) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "HTTP 400" in err and "$.limits.rpm: must be in" in err
        (setup / "list.yaml").write_text("- 1\n")
        assert kt(sc, setup, "set", "x", str(setup / "list.yaml")) == 2
        assert "expected a mapping" in capsys.readouterr().err
        assert kt(sc, setup, "freeze", "acme", token=False) == 1
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "--token-file" in err and err.count("\n") == 1
        assert cli.main(["tenants", "list", "--admin", f"127.0.0.1:{sc.sidecar.http_port}"]) == 1
        err = capsys.readouterr().err
        assert "HTTP 404" in err and "not the sidecar's admin port" in err
        assert "x" not in sc.sidecar.policy.tenants
        assert "acme" not in sc.sidecar.policy.frozen


def test_the_redis_overlay_store_is_one_key_and_changes_atomically_on_a_cluster(valkey_cluster):
    """On a 3-node cluster (the store is one hash: one slot): a change writes its fields and
    the version at once and answers the values before; a reader sees the whole overlay."""
    import asyncio

    from sidecar.backends.overlay_store import RedisOverlayStore
    from sidecar.policy import schema

    async def main() -> None:
        store = RedisOverlayStore(schema.RedisBackend(url=valkey_cluster.url, cluster=True,
                                                      key_prefix="kt-overlay-test"))
        try:
            entry = ov.encode_entry(ov.Entry(block={"limits": {"rpm": 4}}, by="admin-token"))
            mark = ov.encode_frozen(ov.Frozen(reason="x"))
            assert await store.change({"h:a": entry, "f:b": mark}) == (
                1, {"h:a": None, "f:b": None})
            assert await store.version() == 1
            assert await store.change({"f:b": None}) == (2, {"f:b": mark})
            got = await store.load()
            assert got.version == 2 and not got.frozen
            assert got.holders["a"].block == {"limits": {"rpm": 4}}
        finally:
            await store.close()

    asyncio.run(main())


def test_a_freeze_holds_in_shadow_mode_and_is_counted_as_a_refusal(setup):
    (setup / "policy.yaml").write_text(POLICY + "shadow_mode: true\n")
    with running(setup) as sc:
        assert check(sc, "acme").status.code == 0
        assert call(sc, "POST", "/v1/tenants/acme/freeze")[0] == 200
        denied = check(sc, "acme")
        assert denied.denied_response.status.code == 403  # an operator's act: not shadowed
        assert sc.sidecar.metrics.registry.get_sample_value(
            "kt_requests_total", {"decision": "frozen", "transport": "authz"}) == 1


def test_freezing_a_holder_freezes_every_holder_below_it():
    """With holders that name their parent (issue 24's hierarchy): a frozen team's keys
    are frozen with it, whatever the depth; a cycle ends the walk."""
    tenants = {"org": {}, "team-a": {"parent": "org"}, "team-b": {"parent": "org"},
               "key-1": {"parent": "team-a"}, "key-2": {"parent": "team-b"},
               "loner": {}, "x": {"parent": "y"}, "y": {"parent": "x"}}
    assert ov.frozen_with_descendants(tenants, frozenset({"team-a"})) == {"team-a", "key-1"}
    assert ov.frozen_with_descendants(tenants, frozenset({"org"})) == {
        "org", "team-a", "team-b", "key-1", "key-2"}
    assert ov.frozen_with_descendants(tenants, frozenset({"loner"})) == {"loner"}
    assert ov.frozen_with_descendants(tenants, frozenset({"z"})) == {"z"}


def test_a_sidecar_whose_valkey_is_down_starts_on_its_file_and_refuses_changes(setup):
    """Redis down at start: the backend starts on its failure modes, and so does the
    overlay (the file alone until Valkey answers); a change is a 503 that says so."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = POLICY + f"backend: {{kind: redis, url: 'redis://127.0.0.1:{port}/0'}}\n"
    (setup / "policy.yaml").write_text(policy)
    compiled = parse_policy(policy.encode(), "<test>")
    with RunningSidecar(policy, backend=RedisBackend(compiled.backend),
                        policy_path=str(setup / "policy.yaml"),
                        config={"admin_token_file": str(setup / "admin")}) as sc:
        assert sc.sidecar.policy.tenants["acme"].limits.rpm == 500
        status, body = call(sc, "PUT", "/v1/tenants/acme", {"limits": {"rpm": 1}})
        assert status == 503 and body["error"]["code"] == "store_unavailable"
        assert sc.sidecar.policy.tenants["acme"].limits.rpm == 500
        assert sc.sidecar.metrics.registry.get_sample_value(
            "kt_overlay_changes_total", {"result": "error"}) >= 1
