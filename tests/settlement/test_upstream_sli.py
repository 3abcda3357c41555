"""The upstream SLIs' histograms as Prometheus reads them (cumulative buckets, +Inf equal to
the count, sums in seconds and bytes), and their labels bounded to the policy's names
whatever the reply or a header says. Through a real Envoy: tests/e2e/test_usage_path.py."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.ledger.recorder import Ledger
from sidecar.metrics import Metrics
from sidecar.policy.load import parse_policy
from sidecar.upstream_sli import OTHER, Upstream, current

POLICY = parse_policy(b"""
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
  claude-sonnet-4: {input: 0.003, output: 0.015}
defaults:
  limits: {rpm: 10}
""", "<test>")


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("kt_upstream_")}


def test_buckets_are_cumulative_and_sums_in_seconds_and_bytes():
    m = Metrics()
    slis = m.upstream_slis
    labels = slis.labels(POLICY, "", "gpt-4o", "gpt-4o")
    assert labels == ("none", "gpt-4o")
    # 300 ms to first byte, 2.5 s in all, 40 tokens over 2.2 s of stream
    slis.observe(labels, 2_500_000, 300_000, 2_200_000, 40, 900, 5000)
    slis.observe(labels, 150_000_000, 100_000, 0, 0, 300, 0)  # beyond 120 s; no stream
    got = samples(m)
    lab = (("model", "gpt-4o"), ("provider", "none"))

    def bucket(name: str, le: str) -> float:
        return got[(name + "_bucket", (("le", le),) + lab)]

    lat = "kt_upstream_latency_seconds"
    assert (bucket(lat, "2.0"), bucket(lat, "3.0"), bucket(lat, "120.0"),
            bucket(lat, "+Inf")) == (0, 1, 1, 2)
    assert got[(lat + "_count", lab)] == 2 and got[(lat + "_sum", lab)] == 152.5
    ttft = "kt_upstream_ttft_seconds"
    assert (bucket(ttft, "0.1"), bucket(ttft, "0.25"), bucket(ttft, "0.5")) == (1, 1, 2)
    tps = "kt_upstream_output_tokens_per_second"
    assert got[(tps + "_count", lab)] == 1  # the stream only
    assert abs(got[(tps + "_sum", lab)] - 40 / 2.2) < 1e-9
    assert (bucket(tps, "10.0"), bucket(tps, "20.0")) == (0, 1)
    assert got[("kt_upstream_request_bytes_sum", lab)] == 1200
    assert (bucket("kt_upstream_request_bytes", "256.0"),
            bucket("kt_upstream_request_bytes", "1024.0")) == (0, 2)
    assert bucket("kt_upstream_response_bytes", "256.0") == 1  # an empty body: 0 bytes


def test_labels_are_the_policys_names_only():
    slis = Metrics().upstream_slis
    # the model the reply names, when the policy names it (the cost metrics' rule)
    assert slis.labels(POLICY, "", "claude-sonnet-4", "gpt-4o") == ("none", "claude-sonnet-4")
    # a name the upstream made up: the model the decision routed to
    assert slis.labels(POLICY, "", "my-finetune-7", "gpt-4o-mini") == ("none", "gpt-4o-mini")
    # neither known (a header the decision did not set): one series
    assert slis.labels(POLICY, "", None, "x" * 300) == ("none", OTHER)
    # no providers in this policy: any provider id is one series
    assert slis.labels(POLICY, "openai-east", "gpt-4o", None) == (OTHER, "gpt-4o")
    m = Metrics()
    for i in range(50):
        m.upstream_slis.observe(m.upstream_slis.labels(POLICY, f"p{i}", f"m{i}", f"r{i}"),
                                1, 1, 1, 1, 1, 1)
    assert {dict(k[1]).get("model") for k in samples(m)} == {OTHER}


def test_the_event_takes_the_answer_of_its_own_request_only():
    """The answer rides in a context variable beside the reservation's key: an event the
    closing records for another request (an expiry it triggers) does not take it."""
    emitted = []

    class Events:
        def emit(self, event) -> None:
            emitted.append(event)

    ledger = Ledger(Events(), instance="t")  # type: ignore[arg-type]
    up = Upstream(200, 1_500_000, 400_000, "POST /v1/chat/completions")
    token = current.set(("res-1", up))
    try:
        ledger.closed(request_id="res-1", tenant="a", outcome="settled", settled_by="x")
        ledger.closed(request_id="res-2", tenant="a", outcome="expired", settled_by="expiry")
    finally:
        current.reset(token)
    ledger.closed(request_id="res-1", tenant="a", outcome="kept", settled_by="expiry")
    assert [(e.status, e.upstream_us, e.ttft_us, e.endpoint) for e in emitted] == [
        (200, 1_500_000, 400_000, "POST /v1/chat/completions"), (0, 0, 0, ""), (0, 0, 0, "")]
