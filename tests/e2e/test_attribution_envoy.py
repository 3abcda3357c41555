"""Attribution through a real Envoy (issue 24 item 4), configured as `kt envoy-config`
prints it, beside one `kt serve` whose policy trusts the attribution headers:

- Envoy A is printed for a policy that does not trust them (no filter of the operator's
  sets them): a client's own `x-kt-end-user` / `x-kt-tags` are removed at the edge, so
  even a sidecar that trusts them never sees them, nor does the provider;
- Envoy B is printed for a trusting policy, with the operator's filter in front that
  sets them (as one that authenticated the end user would): its values reach the usage
  event and `kt spend --by user`, whatever the client sent."""
from __future__ import annotations

import http.client
import json
import urllib.request

import pytest
import yaml

from sidecar.cli import main as kt
from sidecar.envoy_config import TYPE, EnvoyOptions, TierRoute, render
from sidecar.ledger.sinks import event_files, read_events
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, wait_until, workdir
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.envoy

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 1000000}
  budget: {usd: 5, period: month}
attribution: {trusted: true}
ledger: {flush_interval_s: 0.02}
"""
CLIENTS_OWN = {"x-kt-end-user": "mallory", "x-kt-tags": "free-ride"}

# the operator's filter: sets the end user and tags on every request (overwriting any)
OPERATORS_FILTER = {
    "name": "operator.attribution",
    "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [
            {"append": {"header": {"key": k, "value": v},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
            for k, v in (("x-kt-end-user", "alice@example.com"), ("x-kt-tags", "batch,eval"))]}}}


def post(envoy: EnvoyProcess, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=10)
    try:
        body = {"model": "gpt-4o", "max_tokens": 20,
                "messages": [{"role": "user", "content": "Say hi."}]}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", "x-tenant-id": "acme",
                              **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_a_clients_attribution_is_stripped_and_a_trusted_filters_reaches_the_books(capsys):
    with workdir() as d, FakeUpstream("default") as up, FakeUpstream("compact") as compact:
        (d / "policy.yaml").write_text(POLICY)
        with SidecarProcess(d / "policy.yaml", d) as sidecar:
            def envoy(name: str, trusted: bool) -> EnvoyProcess:
                (d / name).mkdir()
                opts = EnvoyOptions(
                    listen_port=free_port(), admin_port=free_port(),
                    sidecar_address=f"127.0.0.1:{sidecar.grpc_port}", authz_timeout_s=1.0,
                    attribution_trusted=trusted,
                    tiers=[TierRoute("default", "gpt-4o", up.address),
                           TierRoute("compact", "gpt-4o-mini", compact.address)])
                doc = render(opts)
                if trusted:
                    parsed = yaml.safe_load(doc)
                    hcm = parsed["static_resources"]["listeners"][0]["filter_chains"][0][
                        "filters"][0]["typed_config"]
                    hcm["http_filters"].insert(0, OPERATORS_FILTER)
                    doc = yaml.safe_dump(parsed)
                return EnvoyProcess(doc, d / name, opts.admin_port, opts.listen_port)

            with envoy("a", trusted=False) as strict, envoy("b", trusted=True) as trusting:
                assert post(strict, CLIENTS_OWN) == 200
                # the edge removed them: the provider never saw them either
                assert "x-kt-end-user" not in up.requests[-1]["headers"]
                assert post(trusting, CLIENTS_OWN) == 200
                assert up.requests[-1]["headers"]["x-kt-end-user"] == "alice@example.com"
                sidecar.wait_usage_delivered()
                events_dir = d / "kt-state" / "events"

                def usage_events() -> list:
                    return [e for e in read_events(event_files(events_dir))
                            if getattr(e, "outcome", "") == "settled"]

                wait_until(lambda: len(usage_events()) == 2, 10, "both usage events",
                           sidecar.log)
                # the spend of users and tags is written once a second
                # (sidecar/settlement/attributed.py)
                admin = f"http://127.0.0.1:{sidecar.admin_port}/v1/spend?by=user"
                wait_until(lambda: json.load(urllib.request.urlopen(admin, timeout=5))["groups"],
                           10, "the spend by user", sidecar.log)
                assert kt(["spend", "--admin", f"127.0.0.1:{sidecar.admin_port}",
                           "--by", "user", "--json"]) == 0
                by_user = json.loads(capsys.readouterr().out)["groups"]
                assert kt(["spend", "--admin", f"127.0.0.1:{sidecar.admin_port}",
                           "--by", "tag"]) == 0
                tag_table = capsys.readouterr().out
                exposition = sidecar.metrics()
                events = sorted(usage_events(), key=lambda e: e.user)
    # the client's own values were counted to no one; the filter's reached the event
    assert [(e.user, e.tags) for e in events] == [
        ("", ()), ("alice@example.com", ("batch", "eval"))]
    assert list(by_user) == ["alice@example.com"]
    assert by_user["alice@example.com"]["requests"] == 1
    assert by_user["alice@example.com"]["cost_nano_usd"] == events[1].cost_nano_usd > 0
    assert "batch" in tag_table and "eval" in tag_table and "free-ride" not in tag_table
    assert "mallory" not in exposition and "alice" not in exposition
