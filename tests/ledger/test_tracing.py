"""Traces (`kt serve --otlp-endpoint`, sidecar/tracing.py): each request whose reservation
closes becomes one span in OpenTelemetry's GenAI conventions, sent in batches by the real
OTLP/HTTP exporter (JSON encoding) to a receiver this test runs on loopback (a small HTTP
server decoding the export request, as a collector does). A bad endpoint is one line."""
from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sidecar.cli import main as kt
from sidecar.ledger.events import UsageEvent
from sidecar.model import Kind, Request
from sidecar.tracing import RequestSpans, TracingError, traces_url
from tests.support.inproc import RunningSidecar

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}, {name: compact, model: gpt-4o-mini}]
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
tenants:
  acme: {budget: {usd: 1, period: month, low_water: 0.2}}
"""


class Span:
    """One span of an OTLP/JSON export request, read as a collector reads it."""
    SPAN_KIND_CLIENT = 3

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.name = doc["name"]
        self.kind = doc["kind"]
        assert len(doc["traceId"]) == 32 and len(doc["spanId"]) == 16
        self.start_time_unix_nano = int(doc["startTimeUnixNano"])
        self.end_time_unix_nano = int(doc["endTimeUnixNano"])
        self.attributes = doc["attributes"]
        self.status_code = doc.get("status", {}).get("code", 0)


class Receiver:
    """An OTLP/HTTP traces receiver: POST /v1/traces, OTLP/JSON in, every span kept."""

    def __init__(self) -> None:
        self.spans: list = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 (stdlib name)
                body = self.rfile.read(int(self.headers["content-length"]))
                assert self.path == "/v1/traces"
                assert self.headers["content-type"] == "application/json"
                req = json.loads(body)
                for rs in req["resourceSpans"]:
                    service = {a["key"]: a["value"]["stringValue"]
                               for a in rs["resource"]["attributes"]}
                    for ss in rs["scopeSpans"]:
                        receiver.spans += [(service, Span(s)) for s in ss["spans"]]
                receiver.requests += 1
                data = b"{}"
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(span: Span) -> dict:
    out = {}
    for a in span.attributes:
        v = a["value"]
        out[a["key"]] = (v["stringValue"] if "stringValue" in v else int(v["intValue"])
                         if "intValue" in v else v["doubleValue"])
    return out


def test_each_closed_request_is_one_genai_span_sent_in_a_batch():
    body = json.dumps({"model": "gpt-4o", "max_tokens": 50,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with Receiver() as receiver:
        # the server's wiring: kt serve --otlp-endpoint, no ledger sink (the spans still go)
        with RunningSidecar(POLICY, config={"otlp_endpoint": receiver.url}) as sc:
            flows = sc.sidecar.service

            async def main():
                ids = []
                for _ in range(3):
                    d = await flows.decider.decide(
                        Request(headers={"x-tenant-id": "acme"}, body=body))
                    assert d.kind is Kind.ALLOW and d.reservation_id
                    ids.append(d.reservation_id)
                for n, rid in enumerate(ids):
                    await flows.settlement.settle_usage(rid, "acme", "gpt-4o", 100 + n, 40,
                                                        "report")

            sc.run(main())
            instance = sc.sidecar.ledger.instance
        # stopping sent what was queued (the batch processor waits up to a second)
    assert len(receiver.spans) == 3 and receiver.requests <= 3  # batched, not one by one
    service, span = receiver.spans[0]
    assert (service["service.name"], service["service.instance.id"]) == ("kt-sidecar", instance)
    assert span.name == "chat gpt-4o" and span.kind == span.SPAN_KIND_CLIENT
    assert span.start_time_unix_nano <= span.end_time_unix_nano
    got = attributes(span)
    cost = (100 * 2500 + 40 * 10_000) / 1e9
    assert got == {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o", "gen_ai.provider.name": "unknown",
        "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 40,
        "kt.tenant": "acme", "kt.request_id": got["kt.request_id"], "kt.decision": "allow",
        "kt.tier": "default", "kt.outcome": "settled", "kt.settled_by": "report",
        "kt.usage.cached_tokens": 0, "kt.cost.usd": pytest.approx(cost),
        "kt.budget.remaining": got["kt.budget.remaining"], "kt.budget.unit": "usd"}
    # the budget left after each settlement, as the store holds it (the others' estimates
    # still reserved): after the last, the month's 1 USD less exactly what the three cost
    left = [attributes(s)["kt.budget.remaining"] for _, s in receiver.spans]
    spent = [(100 + n) * 2500 + 40 * 10_000 for n in range(3)]
    assert left[2] == pytest.approx(1 - sum(spent) / 1e9, abs=1e-12)
    assert left[0] > left[1] > left[2]  # each used more than its estimate held


def test_an_endpoint_is_a_collectors_url_and_a_bad_one_is_one_line(capsys):
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://otel.example/") == "https://otel.example/v1/traces"
    assert traces_url("http://c:4318/custom/traces") == "http://c:4318/custom/traces"
    for bad in ("127.0.0.1:4318", "grpc://c:4317", "http://"):
        with pytest.raises(TracingError, match="expected http"):
            traces_url(bad)
    assert kt(["serve", "--otlp-endpoint", "collector:4318"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kt serve: --otlp-endpoint 'collector:4318'") and err.count("\n") == 1
    for ratio in ("0", "1.5", "nan"):
        assert kt(["serve", "--otlp-endpoint", "http://127.0.0.1:4318",
                   "--otlp-sample-ratio", ratio]) == 2
        err = capsys.readouterr().err
        assert "expected a share in (0, 1]" in err and err.count("\n") == 1


def test_a_sample_ratio_keeps_about_that_share_and_costs_nothing_for_the_rest():
    with Receiver() as receiver:
        spans = RequestSpans(receiver.url, sample_ratio=0.25, schedule_delay_ms=50)
        made = []
        spans._tracer = _Counting(spans._tracer, made)
        event = UsageEvent(request_id="r", tenant="t", outcome="settled",
                           settled_by="report", settled_us=1_800_000_000_000_000)
        random.seed(7)  # the draw is the only chance here: seeded, the count is fixed
        for _ in range(2000):
            spans.request(event, None)
        assert spans.flush()
        spans.close()
    assert 400 <= len(made) <= 600 and len(receiver.spans) == len(made)


class _Counting:
    """The tracer, counting the spans it is asked to start."""

    def __init__(self, tracer, made: list) -> None:
        self.tracer, self.made = tracer, made

    def start_span(self, *args, **kw):
        self.made.append(1)
        return self.tracer.start_span(*args, **kw)
