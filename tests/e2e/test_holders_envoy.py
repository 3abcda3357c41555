"""The company example of issue 24 (docs/budgets.md) through a real Envoy, configured as
`kt envoy-config` prints it, beside one `kt serve`: one org, keys of two teams, a per-model
cap on one key, a weekly window of a team in a named time zone (weeks from Monday 00:00 in
Europe/Berlin), and a change through the management API that lets a refused key through.
Budgets in tokens, small enough that each level refuses within a few requests; the fake
upstream bills 10 input and 5 output tokens a request.

What it holds, as a client and an operator would see it:
- the key's own gpt-4o cap refuses gpt-4o with `x-kt-reason: holder:batch-key`, while the
  same key's gpt-4o-mini goes on;
- its team's weekly window then refuses every model of the key, naming the team and never
  its figures, while a key of the other team is served, with its own `x-ratelimit-*`;
- each key's settled spend is the upstream's usage of its admitted requests, no more;
- raising the team's window through `PUT /v1/tenants/team-support` lets the key through."""
from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request

import pytest

from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, workdir
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.envoy

# distinctive figures: a refusal's body must not carry the team's
TEAM_WEEK_TOKENS = 233
KEY_GPT4O_TOKENS = 71
POLICY = """
tenant: {header: x-tenant-id, unknown: deny}
""" + TIERS_AND_PRICING + f"""
tenants:
  acme:
    budget: {{tokens: 1000000, period: month}}
  team-search:
    parent: acme
    budget: {{tokens: 600000, period: month}}
  team-support:
    parent: acme
    budgets:
      - {{tokens: 400000, period: month, start_day: 15, timezone: Europe/Berlin}}
      - {{tokens: {TEAM_WEEK_TOKENS}, period: week, start_weekday: monday, timezone: Europe/Berlin}}
  search-key-1:
    parent: team-search
    limits: {{rpm: 600, tpm: 200000}}
    budget: {{tokens: 100000, period: day}}
  batch-key:
    parent: team-support
    limits: {{rpm: 120}}
    budget: {{tokens: 100000, period: day}}
    models:
      gpt-4o: {{budget: {{tokens: {KEY_GPT4O_TOKENS}, period: day}}}}
ledger: {{flush_interval_s: 0.02}}
"""
USAGE = 15  # tokens the fake upstream bills a request (10 in, 5 out)


def post(envoy: EnvoyProcess, tenant: str, model: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=10)
    try:
        body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", "x-tenant-id": tenant})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def until_refused(envoy: EnvoyProcess, tenant: str, model: str,
                  most: int) -> tuple[int, dict, bytes]:
    """Requests of ``tenant`` for ``model`` until one is refused: (admitted, its answer)."""
    for admitted in range(most):
        status, headers, body = post(envoy, tenant, model)
        if status != 200:
            return admitted, headers | {":status": str(status)}, body
    raise AssertionError(f"{tenant} ({model}) was never refused in {most} requests")


def test_the_company_example_through_envoy():
    with workdir() as d, FakeUpstream("default") as up, FakeUpstream("compact") as compact:
        (d / "policy.yaml").write_text(POLICY)
        with SidecarProcess(d / "policy.yaml", d) as sidecar:
            (d / "envoy").mkdir()
            opts = EnvoyOptions(
                listen_port=free_port(), admin_port=free_port(),
                sidecar_address=f"127.0.0.1:{sidecar.grpc_port}", authz_timeout_s=1.0,
                tiers=[TierRoute("default", "gpt-4o", up.address),
                       TierRoute("compact", "gpt-4o-mini", compact.address)])
            with EnvoyProcess(render(opts), d / "envoy", opts.admin_port,
                              opts.listen_port) as envoy:
                # the key's own gpt-4o cap: refused naming the key's model cell
                gpt4o_ok, refused, body = until_refused(envoy, "batch-key", "gpt-4o", 20)
                assert gpt4o_ok >= 1 and refused[":status"] == "429"
                assert refused["x-kt-reason"] == "holder:batch-key"
                assert "gpt-4o" in json.loads(body)["error"]["message"]
                # gpt-4o-mini of the same key is not under that cap ...
                mini_ok, refused, body = until_refused(envoy, "batch-key", "gpt-4o-mini", 40)
                assert mini_ok >= 1
                # ... until its team's weekly window (Berlin weeks) is spent
                assert refused[":status"] == "429"
                assert refused["x-kt-reason"] == "holder:team-support"
                message = json.loads(body)["error"]["message"]
                assert "team-support" in message and str(TEAM_WEEK_TOKENS) not in message
                assert str(TEAM_WEEK_TOKENS) not in json.dumps(refused)
                # the other team's key is not touched, and sees its own limits
                status, headers, _ = post(envoy, "search-key-1", "gpt-4o")
                assert status == 200 and headers["x-ratelimit-limit-requests"] == "600"
                # finance raises the team's week through the management API: the key's
                # next request goes through at once (this sidecar took the change)
                block = {"parent": "acme", "budgets": [
                    {"tokens": 400000, "period": "month", "start_day": 15,
                     "timezone": "Europe/Berlin"},
                    {"tokens": 100000, "period": "week", "start_weekday": "monday",
                     "timezone": "Europe/Berlin"}]}
                put = urllib.request.Request(
                    f"http://127.0.0.1:{sidecar.admin_port}/v1/tenants/team-support",
                    data=json.dumps(block).encode(), method="PUT",
                    headers={"content-type": "application/json"})
                with urllib.request.urlopen(put, timeout=10) as r:
                    assert r.status == 200
                status, _, _ = post(envoy, "batch-key", "gpt-4o-mini")
                assert status == 200
                sidecar.wait_usage_delivered()
                spend = sidecar.spend()
                cells = {}
                for holder in ("team-support", "acme"):
                    url = f"http://127.0.0.1:{sidecar.admin_port}/v1/tenants/{holder}"
                    try:
                        with urllib.request.urlopen(url, timeout=10) as r:
                            live = json.load(r)["counters"]["live"]
                    except urllib.error.HTTPError as exc:
                        raise AssertionError(exc.read()) from None
                    cells.update({c["cell"]: c["budget"]["spent"] for c in live["cells"]})
    # every admitted request was billed 15 tokens by the upstream, and charged that: the
    # gpt-4o cap held the key's gpt-4o to what fit in 71 tokens, the team to what fit in 233
    def tokens(tenant: str, model: str) -> int:
        cell = spend.get(tenant, {}).get(model, {})
        return cell.get("input_tokens", 0) + cell.get("output_tokens", 0)

    assert tokens("batch-key", "gpt-4o") == gpt4o_ok * USAGE <= KEY_GPT4O_TOKENS
    assert tokens("batch-key", "gpt-4o-mini") == (mini_ok + 1) * USAGE
    assert (gpt4o_ok + mini_ok) * USAGE <= TEAM_WEEK_TOKENS
    assert tokens("search-key-1", "gpt-4o") == USAGE
    # settlement moved every level by the same actual usage: the team's cells by its key's,
    # the org's by both teams' (all settled: nothing held)
    support = (gpt4o_ok + mini_ok + 1) * USAGE
    assert cells["team-support"] == cells["team-support{tokens-week}"] == support
    assert cells["acme"] == support + USAGE
