"""Reservation and reconciliation: usage parsing, the report endpoints (HTTP and
gRPC), and the ext_proc stream driven through a real gRPC channel."""
from __future__ import annotations

import json
import urllib.request

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from sidecar._proto import usage_pb2
from sidecar.cli import main as kt
from sidecar.transports.ext_proc import rewrite_model
from sidecar.settlement.usage import UsageScanner, usage_from_json
from tests.support.inproc import RunningSidecar
from tests.support.clock import T0_US, utc_day
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import post_json

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 1000000}
  budget: {tokens: 100000, period: day, low_water: 0.2}
tenants:
  acme:
    limits: {rpm: 1000, tpm: 1000000}
    budget: {usd: 10, period: month, low_water: 0.2}
"""


# --- parsing ---------------------------------------------------------------
def test_usage_from_a_buffered_json_reply():
    body = json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 12, "completion_tokens": 30,
                                                    "total_tokens": 42}}).encode()
    model, usage = usage_from_json(body)
    assert model == "gpt-4o" and (usage.prompt_tokens, usage.completion_tokens) == (12, 30)
    assert usage_from_json(b"not json") == (None, None)
    assert usage_from_json(b'{"usage": {"prompt_tokens": -1}}')[1] is None


def test_usage_from_an_sse_stream_split_at_awkward_places():
    chunks = [
        'data: {"model":"gpt-4o-mini","choices":[{"delta":{"content":"Hel"}}],"usage":null}\n\n',
        'data: {"choices":[{"delta":{"content":"lo"}}]}\r\n\r\n',
        'data: {"choices":[],"usage":{"prompt_tokens":7,"comp',
        'letion_tokens":2}}\n\ndata: [DONE]\n\n',
    ]
    sc = UsageScanner(streamed=True)
    for c in chunks:
        sc.feed(c.encode())
    sc.finish()
    assert sc.model == "gpt-4o-mini"
    assert (sc.usage.prompt_tokens, sc.usage.completion_tokens) == (7, 2)


def test_a_stream_without_a_usage_chunk_has_no_usage():
    sc = UsageScanner(streamed=True)
    sc.feed(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n')
    sc.finish()
    assert sc.usage is None


# what the access log's reader gets at once must read as the same text fed in chunks:
# OpenAI chat and responses, Anthropic's overlay (cut before its message_delta too), CRLF,
# decoys, an unfinished last line, nothing at all, and JSON documents
WHOLE_TEXTS = [
    (True, 'data: {"model":"gpt-4o","choices":[]}\n\ndata: {"choices":[],"usage":'
           '{"prompt_tokens":7,"completion_tokens":2,"prompt_tokens_details":'
           '{"cached_tokens":3}}}\n\n'),
    (True, 'data: {"type":"response.completed","response":{"model":"o3","usage":'
           '{"input_tokens":9,"output_tokens":4,"input_tokens_details":{"cached_tokens":1}}}}'
           '\r\n\r\n'),
    (True, 'data: {"type":"message_start","message":{"model":"claude","usage":{"input_tokens":'
           '5,"cache_read_input_tokens":2,"output_tokens":1}}}\n\ndata: {"type":"message_delta",'
           '"usage":{"output_tokens":40}}\n\n'),
    (True, 'data: {"type":"message_start","message":{"model":"claude","usage":{"input_tokens":'
           '5,"output_tokens":1}}}\n\n'),
    (True, 'event: x\ndata: "usage"\ndata: {"usage":{"prompt_tokens":1}}\ndata: [DONE]\n'
           'data: {"usage":{"prompt_tokens":8,"completion_tokens":1}}'),
    (True, ''),
    (False, '{"usage":{"prompt_tokens":12,"completion_tokens":30},"model":"gpt-4o"}'),
    (False, '{"usage":{"prompt_tokens":-1},"model":"gpt-4o"}'),
    (False, ''),
]


@pytest.mark.parametrize("streamed,text", WHOLE_TEXTS)
def test_a_text_read_whole_reads_as_the_same_text_fed_in_chunks(streamed, text):
    fed = UsageScanner(streamed=streamed)
    for i in range(0, len(text), 7):
        fed.feed(text[i:i + 7].encode())
    fed.finish()
    whole = UsageScanner(streamed=streamed)
    whole.read_whole(text.encode())
    assert (whole.model, whole.usage) == (fed.model, fed.usage)


def test_rewrite_model_keeps_the_rest_of_the_body():
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "é"}],
                       "stream": True}).encode()
    new = json.loads(rewrite_model(body, "gpt-4o-mini"))
    assert new == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "é"}],
                   "stream": True}
    assert rewrite_model(b"[1, 2]", "x") is None
    assert rewrite_model(b"{bad", "x") is None


# --- through the running sidecar -------------------------------------------
ADMIN_TOKEN = "usage-test-admin-token-0123456789"


@pytest.fixture
def sidecar(tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    with RunningSidecar(POLICY, config={"admin_token_file": str(token_file)}) as sc:
        yield sc


def admit(sc, tenant, request_id="", max_tokens=1000, model="gpt-4o"):
    """An admitted Check; returns the reservation id the sidecar made for it."""
    with grpc.insecure_channel(sc.grpc_target) as ch:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.headers.update({"x-tenant-id": tenant, "x-request-id": request_id or "any"})
        http.body = json.dumps({"model": model, "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": "x" * 396}]})
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)
    assert resp.status.code == 0
    return {o.header.key: o.header.value for o in resp.ok_response.headers}["x-kt-reservation"]


def spent(sc, tenant):
    return sc.backend.states[tenant].spent


def post_usage(sc, doc, token=ADMIN_TOKEN):
    return post_json(sc.admin_base + "/v1/usage", doc, token)


def test_report_replaces_the_estimate_with_actual_usage_once(sidecar):
    rid = admit(sidecar, "acme", "req-a")  # ~100 prompt tokens + 1000 max_tokens reserved
    reserved = spent(sidecar, "acme")
    assert reserved > 10_000_000  # nano-USD of the estimate at gpt-4o prices
    status, ack = post_usage(sidecar, {"request_id": rid, "model": "gpt-4o",
                                       "input_tokens": 100, "output_tokens": 20})
    assert status == 200 and ack["applied"] is True
    actual = 100 * 2500 + 20 * 10000  # nano-USD
    assert spent(sidecar, "acme") == actual
    assert ack["cost_usd"] == pytest.approx(actual / 1e9)
    status, again = post_usage(sidecar, {"request_id": rid, "model": "gpt-4o",
                                         "input_tokens": 100, "output_tokens": 20})
    assert status == 200 and again["applied"] is False
    assert spent(sidecar, "acme") == actual


def test_report_without_reservation_charges_the_tenant_in_full(sidecar):
    with grpc.insecure_channel(sidecar.grpc_target) as ch:
        report = ch.unary_unary("/kt.v1.Usage/Report",
                                request_serializer=usage_pb2.UsageReport.SerializeToString,
                                response_deserializer=usage_pb2.UsageAck.FromString)
        ack = report(usage_pb2.UsageReport(request_id="elsewhere-1", tenant="acme",
                                           model="gpt-4o-mini", input_tokens=1000,
                                           output_tokens=1000), timeout=5)
        assert ack.applied and ack.reserved_tokens == 0 and ack.delta_tokens == 2000
        assert spent(sidecar, "acme") == 1000 * 150 + 1000 * 600
        with pytest.raises(grpc.RpcError) as info:
            report(usage_pb2.UsageReport(request_id="x", tenant="", input_tokens=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unpriced_model_is_never_free(sidecar):
    status, ack = post_usage(sidecar, {"request_id": "u-1", "tenant": "acme",
                                       "model": "mystery-model", "input_tokens": 10,
                                       "output_tokens": 10})
    assert status == 200 and ack["unpriced"] is True
    assert spent(sidecar, "acme") == 10 * 2500 + 10 * 10000  # the dearest listed price
    text = urllib.request.urlopen(sidecar.http_base + "/metrics", timeout=5).read().decode()
    # a model the policy does not name is one label value, whatever the report says
    assert 'kt_unpriced_tokens_total{model="_other"} 20.0' in text
    assert "mystery-model" not in text


@pytest.mark.parametrize("doc,fragment", [
    ({"request_id": "r", "input_tokens": "ten", "output_tokens": 1}, "Expected `int`"),
    ({"request_id": "r", "input_tokens": -1, "output_tokens": 1, "tenant": "acme"}, "0..1e9"),
    ({"request_id": "r", "input_tokens": 1, "output_tokens": 1}, "no valid tenant"),
    ({"request_id": "r", "input_tokens": 1, "output_tokens": 1, "extra": 1}, "unknown field"),
])
def test_malformed_reports_get_a_400_and_change_nothing(sidecar, doc, fragment):
    status, body = post_usage(sidecar, doc)
    assert status == 400 and fragment in body["error"]["message"]
    assert "acme" not in sidecar.backend.states


def test_spend_is_readable_through_the_cli(sidecar, capsys):
    post_usage(sidecar, {"request_id": "s-1", "tenant": "acme", "model": "gpt-4o",
                         "input_tokens": 1000, "output_tokens": 100})
    token_file = sidecar.sidecar.cfg.admin_token_file
    assert kt(["spend", "--admin", sidecar.admin_base.removeprefix("http://"), "--json"]) == 1
    assert "HTTP 401" in capsys.readouterr().err  # the books need the token
    assert kt(["spend", "--admin", sidecar.admin_base.removeprefix("http://"), "--json",
               "--token-file", token_file]) == 0
    doc = json.loads(capsys.readouterr().out)
    rec = doc["tenants"]["acme"]["gpt-4o"]
    nano = 1000 * 2500 + 100 * 10000
    assert rec == {"requests": 1, "input_tokens": 1000, "output_tokens": 100, "cached_tokens": 0,
                   "cache_write_tokens": 0, "cost_nano_usd": nano, "usd": nano / 1e9}
    # by day, for the fake clock's day; a range without it is empty
    base = ["--admin", sidecar.admin_base.removeprefix("http://"), "--token-file", token_file]
    day = utc_day(T0_US)
    assert kt(["spend", *base, "--json", "--period", "day", "--since", day,
               "--until", day]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tenants"]["acme"][day]["gpt-4o"]["cost_nano_usd"] == nano
    assert kt(["spend", *base, "--json", "--since", utc_day(T0_US, 1)]) == 0
    assert json.loads(capsys.readouterr().out)["tenants"] == {}
    assert kt(["spend", *base, "--since", "yesterday"]) == 1
    assert "expected a date YYYY-MM-DD" in capsys.readouterr().err


def _hdrs(pairs):
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]))


def _process(sc, messages):
    with grpc.insecure_channel(sc.grpc_target) as ch:
        stub = external_processor_pb2_grpc.ExternalProcessorStub(ch)
        return list(stub.Process(iter(messages), timeout=5))


def test_ext_proc_settles_a_streamed_reply_and_rewrites_a_downgrade(sidecar):
    rid = admit(sidecar, "t-stream", "rid-1", max_tokens=500)
    before = spent(sidecar, "t-stream")
    msgs = [
        pb.ProcessingRequest(request_headers=_hdrs([
            (":path", "/v1/chat/completions"), ("x-request-id", "rid-1"),
            ("x-kt-reservation", rid),
            ("x-kt-decision", "downgrade"), ("x-kt-model", "gpt-4o-mini"),
            ("x-kt-tenant", "t-stream")])),
        pb.ProcessingRequest(request_body=pb.HttpBody(
            body=b'{"model":"gpt-4o","stream":true}', end_of_stream=True)),
        pb.ProcessingRequest(response_headers=_hdrs([(":status", "200"),
                                                     ("content-type", "text/event-stream")])),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b'data: {"choices":[]}\n\n')),
        pb.ProcessingRequest(response_body=pb.HttpBody(
            body=b'data: {"usage":{"prompt_tokens":40,"completion_tokens":8}}\n\ndata: [DONE]\n\n',
            end_of_stream=True)),
    ]
    replies = _process(sidecar, msgs)
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers", "request_body", "response_headers", "response_body", "response_body"]
    body_mut = replies[1].request_body.response
    assert json.loads(body_mut.body_mutation.body)["model"] == "gpt-4o-mini"
    cl = body_mut.header_mutation.set_headers[0].header
    assert cl.key == "content-length" and int(cl.raw_value) == len(body_mut.body_mutation.body)
    assert before > 48
    assert spent(sidecar, "t-stream") == 48  # tokens budget: the actual usage, not the estimate


def test_ext_proc_refunds_an_upstream_error_and_keeps_an_abandoned_stream(sidecar):
    rid = admit(sidecar, "t-err", "rid-err", max_tokens=300)
    _process(sidecar, [
        pb.ProcessingRequest(request_headers=_hdrs([("x-kt-reservation", rid),
                                                    ("x-kt-tenant", "t-err")])),
        pb.ProcessingRequest(response_headers=_hdrs([(":status", "503")])),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"upstream down", end_of_stream=True)),
    ])
    assert spent(sidecar, "t-err") == 0
    rid = admit(sidecar, "t-gone", "rid-gone", max_tokens=300)
    reserved = spent(sidecar, "t-gone")
    _process(sidecar, [  # the stream ends before the response does: the client left
        pb.ProcessingRequest(request_headers=_hdrs([("x-kt-reservation", rid),
                                                    ("x-kt-tenant", "t-gone")])),
        pb.ProcessingRequest(response_headers=_hdrs([(":status", "200"),
                                                     ("content-type", "text/event-stream")])),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b'data: {"choices":[]}\n\n')),
    ])
    assert spent(sidecar, "t-gone") == reserved
    assert len(sidecar.sidecar.service.reservations) == 0  # nothing left behind


def test_the_reservation_book_is_bounded_in_size_and_age():
    from sidecar.settlement.book import ReservationBook

    now = [1000.0]
    book = ReservationBook(ttl_s=60, max_entries=3, clock=lambda: now[0])
    for i in range(5):
        book.put(f"r{i}", "t", 0, "m", 10, 10, 0, now[0])
    assert len(book) == 3 and book.get("r0") is None and book.get("r4").charged_tokens == 10
    now[0] += 61
    book.put("fresh", "t", 0, "m", 1, 1, 0, now[0])
    assert len(book) == 1 and book.pop("fresh").tenant == "t"
    assert book.expired == 5
