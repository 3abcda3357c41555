"""Providers through Envoy: `kt envoy-config` from a policy with providers (validated by a
real `envoy --mode validate`), and end to end through a real Envoy, the real `kt serve`
and fake providers that answer 429 when their own quota is exceeded."""
from __future__ import annotations

import yaml

from sidecar import contract
from sidecar.cli import main
from tests.support.procs import envoy_validate

PROVIDERS_POLICY = """
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
providers:
  - {id: openai-4o, models: [gpt-4o], host: api.openai.com,
     rate_limits: {requests_per_minute: 500}, reserve: {high: 0.2}}
  - {id: azure-east, models: [gpt-4o], host: kt-east.openai.azure.com, port: 443,
     sni: kt-east.openai.azure.com}
  - {id: local-mini, models: [gpt-4o-mini], host: 127.0.0.1, port: 8001}
queue: {max_wait_ms: 3000}
"""


def _config(tmp_path, capsys, mode: str) -> dict:
    policy = tmp_path / "policy.yaml"
    key = tmp_path / "openai.key"  # a mounted Secret: Envoy reads it, the policy names it
    key.write_text("sk-test-provider-key")
    policy.write_text(PROVIDERS_POLICY.replace(
        "rate_limits: {requests_per_minute: 500}, reserve: {high: 0.2}}",
        f"rate_limits: {{requests_per_minute: 500}}, reserve: {{high: 0.2}}, "
        f"api_key_file: {key}}}"))
    assert main(["envoy-config", "--config", str(policy), "--mode", mode]) == 0
    text = capsys.readouterr().out
    out = tmp_path / f"envoy-{mode}.yaml"
    out.write_text(text)
    envoy_validate(out)
    return yaml.safe_load(text)


def _hcm(doc: dict) -> dict:
    return doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def test_envoy_config_routes_on_the_decisions_provider_and_waits_for_the_queue(tmp_path, capsys):
    for mode in ("authz", "http-authz"):
        doc = _config(tmp_path, capsys, mode)
        clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
        assert {"provider_openai-4o", "provider_azure-east", "provider_local-mini"} <= set(clusters)
        openai = clusters["provider_openai-4o"]
        assert openai["type"] == "LOGICAL_DNS"
        assert openai["transport_socket"]["typed_config"]["sni"] == "api.openai.com"
        assert clusters["provider_local-mini"]["type"] == "STATIC"
        # the provider's key is injected by Envoy from its file, never printed
        injector = openai["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]
        assert injector["name"] == "envoy.filters.http.credential_injector"
        secrets = {x["name"]: x for x in doc["static_resources"]["secrets"]}
        assert secrets["provider_openai-4o_api_key"]["generic_secret"]["secret"][
            "filename"].endswith("openai.key")
        assert "sk-test-provider-key" not in yaml.safe_dump(doc)
        assert "http_filters" not in clusters["provider_azure-east"][
            "typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3."
                                                 "HttpProtocolOptions"]
        assert "transport_socket" not in clusters["provider_local-mini"]
        hcm = _hcm(doc)
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        by_provider = {r["match"]["headers"][0]["string_match"]["exact"]: r["route"]["cluster"]
                       for r in routes if r["match"].get("headers")
                       and r["match"]["headers"][0]["name"] == contract.H_PROVIDER}
        assert by_provider == {"openai-4o": "provider_openai-4o",
                               "azure-east": "provider_azure-east",
                               "local-mini": "provider_local-mini"}
        # a client cannot pick a provider: its own x-kt-provider is removed before any filter
        removed = [m["remove"] for m in hcm["early_header_mutation_extensions"][0][
            "typed_config"]["mutations"] if "remove" in m]
        assert contract.H_PROVIDER in removed and contract.H_REASON in removed
        authz = next(f["typed_config"] for f in hcm["http_filters"]
                     if f["name"] == "envoy.filters.http.ext_authz")
        timeout = (authz["grpc_service"]["timeout"] if mode == "authz"
                   else authz["http_service"]["server_uri"]["timeout"])
        assert timeout == "3.250s"  # the queue's 3 s wait and the answer's way back
        if mode == "http-authz":
            allowed = authz["http_service"]["authorization_response"]
            names = {p.get("exact") for p in allowed["allowed_upstream_headers"]["patterns"]}
            assert {contract.H_PROVIDER, contract.H_REASON} <= names


# --- end to end: real Envoy, real `kt serve`, fake providers with their own quotas ------
import contextlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from sidecar.cli import provider_options  # noqa: E402
from sidecar.envoy_config import EnvoyOptions, TierRoute, render  # noqa: E402
from sidecar.policy.load import parse_policy  # noqa: E402
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port,  # noqa: E402
                                 log_tail, wait_until, workdir)
from tests.support.upstream import FakeUpstream, ProviderQuota  # noqa: E402
from tests.support.valkey import Valkey  # noqa: E402

pytestmark = pytest.mark.envoy

# Each scenario has its own model (a tier) and providers, so one stack serves them all.
# Every fake provider keeps the quota the policy gives it, and answers 429 beyond it.
E2E_POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
  - {name: shared, model: shared-model}
  - {name: prio, model: prio-model}
  - {name: waits, model: wait-model}
  - {name: liar, model: liar-model}
providers:
  - {id: east, models: [gpt-4o], rate_limits: {requests_per_minute: 6, burst: 0.5},
     host: 127.0.0.1, port: %(east)d}
  - {id: west, models: [gpt-4o], rate_limits: {requests_per_minute: 6, burst: 0.5},
     host: 127.0.0.1, port: %(west)d}
  - {id: mini, models: [gpt-4o-mini], rate_limits: {requests_per_minute: 600},
     host: 127.0.0.1, port: %(mini)d}
  - {id: shared, models: [shared-model], rate_limits: {requests_per_minute: 30, burst: 0.2},
     host: 127.0.0.1, port: %(shared)d}
  - {id: prio, models: [prio-model], rate_limits: {requests_per_minute: 10},
     reserve: {high: 0.2}, host: 127.0.0.1, port: %(prio)d}
  - {id: waits, models: [wait-model], rate_limits: {requests_per_minute: 60, burst: 0.05},
     host: 127.0.0.1, port: %(waits)d}
  # configured above what the provider really grants: its own 429s must show
  - {id: liar, models: [liar-model], rate_limits: {requests_per_minute: 600},
     host: 127.0.0.1, port: %(liar)d}
queue: {max_wait_ms: 4000, max_size: 200}
defaults:
  limits: {rpm: 1000}
  spill_to_next_tier: false
tenants:
  # three tenants whose limits add up to three times the shared provider's 30 RPM
  t1: {limits: {rpm: 30}}
  t2: {limits: {rpm: 30}}
  t3: {limits: {rpm: 30}}
  spiller: {spill_to_next_tier: true}
  vip: {priority: high}
  flood: {priority: low}
%(backend)s
"""
# the fake providers' own quotas: the same as the policy's (rpm, burst)
QUOTAS = {"east": (6, 0.5), "west": (6, 0.5), "mini": (600, 1.0), "shared": (30, 0.2),
          "prio": (10, 1.0), "waits": (60, 0.05), "liar": (6, 0.5)}


class ProviderStack:
    def __init__(self, envoys: list[EnvoyProcess], providers: dict[str, FakeUpstream],
                 elsewhere: FakeUpstream, sidecars: list[SidecarProcess]) -> None:
        self.envoys, self.providers, self.elsewhere = envoys, providers, elsewhere
        self.sidecars = sidecars
        self._turn = 0
        self._lock = threading.Lock()

    def post(self, tenant: str, model: str) -> tuple[int, dict, dict]:
        with self._lock:  # spread the requests over every gateway
            envoy = self.envoys[self._turn % len(self.envoys)]
            self._turn += 1
        conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=15)
        try:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5}
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                         headers={"content-type": "application/json", "x-tenant-id": tenant})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, (
                json.loads(data) if data else {})
        finally:
            conn.close()

    def flood(self, tenant: str, model: str, threads: int, seconds: float) -> list[tuple]:
        """Requests from ``threads`` clients back to back for ``seconds``."""
        out: list[tuple] = []
        lock = threading.Lock()
        end = time.monotonic() + seconds

        def client() -> None:
            while time.monotonic() < end:
                r = self.post(tenant, model)
                with lock:
                    out.append(r)

        workers = [threading.Thread(target=client) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return out


@contextlib.contextmanager
def provider_stack(sidecars: int, backend: str) -> Iterator[ProviderStack]:
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(workdir())
        providers = {name: stack.enter_context(FakeUpstream(name, quota=ProviderQuota(rpm, b)))
                     for name, (rpm, b) in QUOTAS.items()}
        elsewhere = stack.enter_context(FakeUpstream("elsewhere"))  # tier routes: unused
        text = E2E_POLICY % dict({n: u.port for n, u in providers.items()}, backend=backend)
        policy_path = d / "policy.yaml"
        policy_path.write_text(text)
        policy = parse_policy(text.encode(), "<e2e>")
        envoys, procs = [], []
        for i in range(sidecars):
            sd = d / f"side-{i}"
            sd.mkdir()
            sidecar = stack.enter_context(SidecarProcess(policy_path, sd))
            procs.append(sidecar)
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"127.0.0.1:{sidecar.grpc_port}",
                                tiers=[TierRoute(t.name, t.model, elsewhere.address)
                                       for t in policy.tiers], **provider_options(policy))
            envoys.append(stack.enter_context(EnvoyProcess(render(opts), sd, admin, listen)))
        s = ProviderStack(envoys, providers, elsewhere, procs)
        try:
            yield s
        except AssertionError as exc:
            exc.args = (f"{exc.args[0] if exc.args else ''}"
                        + "".join(log_tail(e.log, 15) for e in envoys)
                        + "".join(log_tail(p, 15) for p in d.glob("side-*/sidecar.log")),)
            raise


@pytest.fixture(scope="module", params=["one-sidecar-memory",
                pytest.param("two-sidecars-one-valkey", marks=pytest.mark.valkey)])
def stack(request) -> Iterator[ProviderStack]:
    if request.param == "one-sidecar-memory":
        with provider_stack(1, "") as s:
            yield s
        return
    with workdir() as d, Valkey(d) as v:
        with provider_stack(2, f'backend: {{kind: redis, url: "{v.url}", timeout_ms: 500}}') as s:
            yield s


def statuses(results) -> dict[int, int]:
    out: dict[int, int] = {}
    for status, _, _ in results:
        out[status] = out.get(status, 0) + 1
    return out


def test_tenants_adding_up_to_three_times_a_quota_never_push_the_provider_into_429s(stack):
    quota = stack.providers["shared"].quota
    started = time.monotonic()
    results = []
    threads = [threading.Thread(target=lambda t=t: results.extend(
        stack.flood(t, "shared-model", 3, 3.0))) for t in ("t1", "t2", "t3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    admitted = statuses(results).get(200, 0)
    assert quota.refused == 0, statuses(results)  # the provider never had to say no
    assert quota.admitted == admitted
    # the provider's capacity was used, not more: 6 at once, then one every 2 s
    assert 6 <= admitted <= 6 + 0.5 * elapsed + 1, (admitted, elapsed)
    refused = [r for r in results if r[0] != 200]
    assert refused and all(r[0] == 429 and r[1]["x-kt-reason"] == "provider_quota"
                           and int(r[1]["retry-after"]) >= 1 for r in refused)


def test_a_low_priority_flood_leaves_the_high_tenant_its_reserved_share(stack):
    quota = stack.providers["prio"].quota
    flood: list[tuple] = []
    t = threading.Thread(target=lambda: flood.extend(stack.flood("flood", "prio-model", 4, 3.5)))
    t.start()
    time.sleep(1.0)
    vip = [stack.post("vip", "prio-model")]
    time.sleep(1.0)
    vip.append(stack.post("vip", "prio-model"))
    t.join()
    low = statuses(flood).get(200, 0)
    # 10 RPM, 20% kept for high: the flood takes the other 8 (and what refills above the
    # floor: one every 6 s), the high tenant gets the 2 kept for it, while the flood goes on
    assert [v[0] for v in vip] == [200, 200]
    assert all(v[2]["served_by"] == "prio" and v[2]["received_headers"]["x-kt-provider"]
               == "prio" for v in vip)
    assert 8 <= low <= 9, statuses(flood)
    assert quota.refused == 0


def test_a_full_provider_spills_to_the_other_then_to_the_compact_tier(stack):
    got = [stack.post("spiller", "gpt-4o") for _ in range(8)]
    assert [g[0] for g in got] == [200] * 8
    served = [g[2]["served_by"] for g in got]
    # 3 each fit east and west (6 RPM, burst 0.5), then the compact tier's provider
    assert served == ["east"] * 3 + ["west"] * 3 + ["mini"] * 2
    spilled = got[-1][2]
    up = spilled["received_headers"]
    assert (up["x-kt-decision"], up["x-kt-tier"], up["x-kt-provider"], up["x-kt-reason"]) == (
        "downgrade", "compact", "mini", "provider_full")
    assert spilled["model"] == "gpt-4o-mini"  # ext_proc rewrote the body for the lower tier
    assert got[-1][1]["x-kt-reason"] == "provider_full"  # and the client is told why
    assert all(stack.providers[p].quota.refused == 0 for p in ("east", "west", "mini"))


def test_the_queue_absorbs_a_short_burst_and_refuses_a_long_one_with_a_true_retry_after(stack):
    quota = stack.providers["waits"].quota  # 3 at once, then one a second

    def burst(tenant: str, n: int) -> list[tuple]:
        out: list[tuple] = []
        go = threading.Barrier(n)

        def one() -> None:
            go.wait()
            out.append(stack.post(tenant, "wait-model"))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    short = burst("burst-a", 5)
    assert statuses(short) == {200: 5}  # two of them waited for room instead of a 429
    time.sleep(3.5)  # full again
    long = burst("burst-b", 12)
    st = statuses(long)
    # 3 at once, then one a second while the 4 s wait lasts (a refill or two fewer if this
    # shared machine delays the burst's arrival); the rest told when to come back
    assert st.get(200, 0) >= 5 and st.get(429, 0) >= 4 and set(st) <= {200, 429}, st
    assert st.get(200, 0) <= 3 + 5  # never more than the provider's capacity in that time
    refused = [r for r in long if r[0] == 429]
    waits = sorted(int(r[1]["retry-after"]) for r in refused)
    assert all(1 <= w <= 3 for w in waits), waits
    assert all(r[2]["error"]["code"] == "rate_limit_exceeded" for r in refused)
    # truthful: after the retry-after it named, a request is admitted without waiting
    time.sleep(waits[-1])
    assert stack.post("burst-c", "wait-model")[0] == 200
    assert quota.refused == 0


def test_a_providers_own_429s_show_in_the_metrics(stack):
    """A provider configured above what it really grants refuses requests itself: Envoy's
    access log brings the sidecar each answer, counted by provider and status."""
    got = [stack.post(f"liar-{i}", "liar-model")[0] for i in range(5)]
    assert got == [200, 200, 200, 429, 429]  # the provider's bucket holds 3

    def counted() -> int:
        return int(sum(sc.metric("kt_upstream_responses_total", provider="liar", status="429")
                       for sc in stack.sidecars))

    wait_until(lambda: counted() == 2, 15, "the provider's 429s counted")
    assert stack.providers["liar"].quota.refused == 2
    # its answered requests' latency, under the provider's and the model's names (its
    # errors are not latency: counted above, by status)
    for family in ("kt_upstream_latency_seconds_count", "kt_upstream_ttft_seconds_count",
                   "kt_upstream_response_bytes_count"):
        assert sum(sc.metric(family, model="liar-model", provider="liar")
                   for sc in stack.sidecars) == 3, family
