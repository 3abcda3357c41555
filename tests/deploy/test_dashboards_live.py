"""The shipped dashboards and alerts, evaluated by a real Prometheus against a live stack.

A real Prometheus server (Debian's `prometheus` package, beside promtool) scrapes a live
`kt serve` on Valkey behind a real Envoy from `kt envoy-config`, with fake providers that
report usage. The traffic has every kind the panels draw: allowed, downgraded, refused by
a rate limit and by a budget, shadow-mode refusals, streamed, a provider's own 429s and
5xx, a model the policy does not price, cached input tokens, a request that waited in the
admission queue, usage settled by Envoy's access log, budget thresholds crossed.

Then every expression goes through Prometheus's HTTP API:
- every dashboard panel's query returns series (no typo, no metric that does not exist,
  no label value never set);
- every alert expression is accepted, and each metric selector in it (offsets and ranges
  aside) returns series, so the alert watches something that exists. An alert's whole
  expression is quiet on a healthy stack, which is the point: promtool's unit tests
  (tests/test_alerts.py) hold when each one fires.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from sidecar.cli import provider_options
from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from sidecar.policy.load import parse_policy
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port, log_tail,
                                 stop_process, wait_until, workdir)
from tests.support.upstream import FakeUpstream, ProviderQuota
from tests.support.paths import ROOT
from tests.support.valkey import Valkey

# a Prometheus server (a process of its own), Valkey, Envoy
pytestmark = [pytest.mark.envoy, pytest.mark.valkey, pytest.mark.subprocess]

DOCS = ROOT / "docs"
DASHBOARDS = sorted((DOCS / "grafana").glob("*.json"))
RULES = DOCS / "prometheus" / "alerts.yaml"

# Series only one backend kind exports: the stack runs on Valkey (the production shape),
# so the embedded backend's state-file metrics are checked by name in tests/test_alerts.py.
EMBEDDED_ONLY = {"kt_state_write_failures_total", "kt_state_snapshot_seconds"}

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
  - {name: waits, model: wait-model}
  - {name: liar, model: liar-model}
pricing:
  gpt-4o: {input: 0.01, output: 0.03, cached_input: 0.005}
  gpt-4o-mini: {input: 0.005, output: 0.01}
  wait-model: {input: 0.001, output: 0.002}
  liar-model: {input: 0.001, output: 0.002}
unpriced_models: dearest
providers:
  - {id: main, models: [gpt-4o],
     rate_limits: {requests_per_minute: 6000, tokens_per_minute: 10000000},
     host: 127.0.0.1, port: %(main)d}
  - {id: mini, models: [gpt-4o-mini], rate_limits: {requests_per_minute: 6000},
     host: 127.0.0.1, port: %(mini)d}
  # the policy grants more than the provider really does: its own 429s show
  - {id: liar, models: [liar-model], rate_limits: {requests_per_minute: 6000},
     host: 127.0.0.1, port: %(liar)d}
  - {id: waits, models: [wait-model], rate_limits: {requests_per_minute: 60, burst: 0.02},
     host: 127.0.0.1, port: %(waits)d}
queue: {max_wait_ms: 3000}
defaults:
  limits: {rpm: 1000}
  spill_to_next_tier: false
tenants:
  acme: {budget: {usd: 0.002, period: month, low_water: 0.5}}
  tight: {limits: {rpm: 2}}
  watched: {limits: {rpm: 1}, shadow_mode: true}
  tokens: {budget: {tokens: 100000, period: day}}
ledger: {sink: file, fsync: false, thresholds: [0.25, 0.5, 1.0]}
backend: {kind: redis, url: "%(valkey)s", timeout_ms: 500}
# no history needed: each tenant's first tokens flag it (only flagged: the answers stay),
# so the token-rate alert's series exist
anomaly: {factor: 2, min_tokens_per_minute: 1, warmup_minutes: 0}
"""


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("waits for the Prometheus server: apt-get install prometheus "
                    "(.ci/run installs it)")
    return found


@contextlib.contextmanager
def prometheus(d, target: str):
    port = free_port()
    (d / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "kt-sidecar", "static_configs": [
            {"targets": [target]}]}]}))
    log = d / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([prometheus_binary(), f"--config.file={d / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={d / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=d)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: urllib.request.urlopen(base + "/-/ready", timeout=2).status == 200,
                   30, "prometheus", log)
        yield base
    finally:
        stop_process(proc)


def query(base: str, expr: str) -> list:
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 400: the expression does not parse
        raise AssertionError(f"{expr}: {exc.read().decode(errors='replace')}") from None
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]["result"]


def post(port: int, tenant: str, model: str, **headers: str) -> tuple[int, dict, bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    if headers.pop("stream", ""):
        body["stream"] = True
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"content-type": "application/json", "x-tenant-id": tenant,
                              **headers})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def grafana_expr(expr: str) -> str:
    """A panel's query as Grafana sends it, for a 5-minute range."""
    return expr.replace("$__rate_interval", "30s").replace("$__range", "5m")


def selectors(expr: str) -> set[str]:
    """Each metric selector of an expression (name and matchers), ranges and offsets off."""
    return {name + (matchers or "") for name, matchers in
            re.findall(r"\b(kt_[a-z_]+)(\{[^}]*\})?", expr)}


@pytest.fixture(scope="module")
def live():
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(workdir("kt-dash-"))
        valkey = stack.enter_context(Valkey(d))
        main = stack.enter_context(FakeUpstream("main"))
        mini = stack.enter_context(FakeUpstream("mini"))
        liar = stack.enter_context(FakeUpstream("liar", quota=ProviderQuota(1, 1.0)))
        waits = stack.enter_context(FakeUpstream("waits"))
        main.release_stream.set()  # streams answer whole, at once
        text = POLICY % {"main": main.port, "mini": mini.port, "waits": waits.port,
                         "liar": liar.port,
                         "valkey": valkey.url}
        (d / "policy.yaml").write_text(text)
        policy = parse_policy(text.encode(), "<dashboards>")
        sidecar = stack.enter_context(SidecarProcess(d / "policy.yaml", d))
        admin, listen = free_port(), free_port()
        opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                            sidecar_address=f"127.0.0.1:{sidecar.grpc_port}",
                            tiers=[TierRoute(t.name, t.model, main.address)
                                   for t in policy.tiers], **provider_options(policy))
        envoy = stack.enter_context(EnvoyProcess(render(opts), d, admin, listen))
        prom = stack.enter_context(prometheus(d, f"127.0.0.1:{sidecar.http_port}"))
        seen = traffic(listen)
        sidecar.wait_usage_delivered()
        # every series scraped at least three times after the traffic (rate() needs two)
        settled = sidecar.metric("kt_usage_log_entries_total")
        wait_until(lambda: query(prom, f"min_over_time(kt_usage_log_entries_total[2s]) >= "
                                       f"{settled}") and query(
            prom, "count_over_time(kt_usage_log_entries_total[1m]) >= 3"),
            30, "prometheus to scrape the traffic", d / "prometheus.log")
        try:
            yield prom, seen
        except AssertionError as exc:
            exc.args = (f"{exc.args[0] if exc.args else ''}" + log_tail(sidecar.log, 20)
                        + log_tail(envoy.log, 10),)
            raise


def traffic(port: int) -> dict[str, int]:
    """Requests of every kind; returns how many answers of each kind came back."""
    seen: dict[str, int] = {}

    def note(kind: str) -> None:
        seen[kind] = seen.get(kind, 0) + 1

    # acme's small USD budget: allowed, downgraded below half, then refused
    for _ in range(40):
        status, _, body = post(port, "acme", "gpt-4o", **{"x-fake-cached": "4"})
        if status == 200:  # the fake provider echoes the decision Envoy passed it
            note(json.loads(body)["received_headers"].get("x-kt-decision", "?"))
        elif status == 429:
            note(json.loads(body)["error"]["code"])  # insufficient_quota: the budget
            break
    for _ in range(4):  # a rate limit of 2 a minute
        status, h, _ = post(port, "tight", "gpt-4o")
        note("allow" if status == 200 else f"refused_{status}")
    for _ in range(3):  # shadow mode: over its limit, let through and counted
        status, _, _ = post(port, "watched", "gpt-4o")
        note("shadow_allowed" if status == 200 else f"shadow_{status}")
    for _ in range(3):  # a token budget, streamed replies
        status, _, _ = post(port, "tokens", "gpt-4o", stream="1")
        note("stream" if status == 200 else f"stream_{status}")
    status, _, _ = post(port, "other", "o1-pro")  # not priced: charged at the dearest price
    note("unpriced" if status == 200 else f"unpriced_{status}")
    status, _, _ = post(port, "other", "gpt-4o", **{"x-fake-status": "503"})
    note(f"provider_{status}")
    for _ in range(3):  # the provider grants one a minute, though the policy says 6,000
        status, _, _ = post(port, "other", "liar-model")
        note(f"liar_{status}")
    for _ in range(2):  # the second waits in the admission queue for the provider's quota
        status, _, _ = post(port, "other", "wait-model")
        note(f"waits_{status}")
    return seen


def test_the_traffic_has_every_kind_the_panels_draw(live):
    _, seen = live
    assert seen.get("allow", 0) >= 2 and seen.get("downgrade", 0) >= 1, seen
    assert seen.get("insufficient_quota") == 1, seen
    assert seen.get("refused_429", 0) >= 1, seen  # tight's rate limit
    assert seen.get("shadow_allowed") == 3 and seen.get("stream") == 3, seen
    assert seen.get("provider_503") == 1 and seen.get("liar_429", 0) >= 1, seen
    assert seen.get("waits_200") == 2 and seen.get("unpriced") == 1, seen


@pytest.mark.parametrize("board", [b.name for b in DASHBOARDS])
def test_every_panel_of_the_dashboard_returns_series(live, board):
    prom, _ = live
    doc = json.loads((DOCS / "grafana" / board).read_text())
    empty = []
    checked = 0
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            if not query(prom, grafana_expr(target["expr"])):
                empty.append(f"{panel['title']} / {target['refId']}: {target['expr']}")
            checked += 1
    assert checked >= 10
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_alert_expression_is_valid_and_watches_series_that_exist(live):
    prom, _ = live
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    missing = []
    for rule in rules:
        query(prom, rule["expr"])  # accepted by Prometheus itself (raises with its error)
        for sel in selectors(rule["expr"]):
            if sel.split("{")[0] in EMBEDDED_ONLY:
                continue
            if not query(prom, sel):
                missing.append(f"{rule['alert']}: {sel}")
    assert len(rules) >= 26
    assert not missing, "alert selectors matching no series:\n" + "\n".join(missing)
