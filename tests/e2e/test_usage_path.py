"""Usage from the response, through a real Envoy: the Lua filter + access log (the default)
and ext_proc per request must read the same usage from the same bytes, to the token, and
close reservations by the same rules (docs/usage.md), however the reply is shaped: keys in
any order, decoys inside strings and nested objects, SSE lines split across chunks, CRLF,
`"usage": null` chunks, streams without usage, an upstream that resets mid-stream, 5xx."""
from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator, Optional

import pytest

from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from tests.support.policies import TIERS_AND_PRICING
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port, metric_value,
                                 wait_until, workdir)

pytestmark = pytest.mark.envoy

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 1000, tpm: 10000000}
  budget: {tokens: 1000000, period: day}
tenants:
""" + "".join(f"  {t}: {{}}\n" for t in (
    "json-plain", "json-order_and_blanks", "json-decoys", "json-anthropic", "json-responses",
    "sse-split", "sse-anthropic", "sse-responses", "sse-none", "sse-reset", "five",
    "sse-responses-large", "sse-anthropic-large", "json-large", "json-many",
    "json-cuts", "sli-json", "sli-sse"))  # named: spend is recorded per named tenant (others fold into _other)


def metric_model(model: str) -> str:
    """The model label spend is recorded under: a model outside the policy's tiers and
    pricing is one `_other` series (bounded labels, docs/security.md)."""
    return model if model in ("gpt-4o", "gpt-4o-mini") else "_other"


class Reply:
    """What the raw upstream answers: status, content type, the body in pieces (each
    written and flushed on its own, so Envoy sees separate chunks), and whether to reset
    the connection after the pieces instead of ending the body."""

    def __init__(self, pieces: list[bytes], status: int = 200,
                 content_type: str = "application/json", reset: bool = False,
                 headers: Optional[dict[str, str]] = None) -> None:
        self.pieces, self.status, self.content_type, self.reset = pieces, status, content_type, reset
        self.headers = headers or {}  # more response headers (content-encoding, ...)


class RawUpstream:
    """An upstream that answers each request with the Reply registered under its
    `x-raw-case` header, byte for byte (chunked transfer encoding)."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self._server: Optional[ThreadingHTTPServer] = None

    def __enter__(self) -> "RawUpstream":
        replies = self.replies

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle on, a kept-alive
            # connection waits ~40 ms for the peer's delayed ACK before the body
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length") or 0))
                reply = replies[self.headers["x-raw-case"]]
                self.send_response(reply.status)
                self.send_header("content-type", reply.content_type)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for piece in reply.pieces:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    time.sleep(0.02)
                if reply.reset:  # RST: linger 0, and every reference to the socket closed
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.wfile.close()
                    self.rfile.close()
                    self.connection.close()
                    return
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class Path:
    def __init__(self, sidecar: SidecarProcess, envoy: EnvoyProcess, upstream: RawUpstream,
                 usage: str) -> None:
        self.sidecar, self.envoy, self.upstream, self.usage = sidecar, envoy, upstream, usage

    def metric(self, name: str, **labels: str) -> float:
        return self.sidecar.metric(name, **labels)

    def settled(self) -> None:
        if self.usage == "als":
            self.sidecar.wait_usage_delivered(("allow", "downgrade"))

    def send(self, tenant: str, case: str, reply: Reply) -> int:
        """One request answered by `reply`; the status the client saw (0: cut off)."""
        self.upstream.replies[case] = reply
        body = json.dumps({"model": "gpt-4o", "max_tokens": 500,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy.listen_port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={
                "content-type": "application/json", "x-tenant-id": tenant, "x-raw-case": case})
            resp = conn.getresponse()
            try:
                resp.read()
            except (http.client.IncompleteRead, ConnectionError):
                return 0
            return resp.status
        finally:
            conn.close()
            self.settled()

    def spend(self, tenant: str) -> dict:
        return self.sidecar.spend().get(tenant, {})


@contextlib.contextmanager
def usage_path(usage: str) -> Iterator[Path]:
    with workdir() as d, RawUpstream() as up:
        policy = d / "policy.yaml"
        policy.write_text(POLICY)
        with SidecarProcess(policy, d) as sidecar:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin, mode="authz",
                                sidecar_address=f"127.0.0.1:{sidecar.grpc_port}",
                                usage=usage,  # type: ignore[arg-type]
                                # not Envoy's 200 ms: a loaded CI machine is not what is tested
                                authz_timeout_s=1.0,
                                tiers=[TierRoute("default", "gpt-4o", up.address),
                                       TierRoute("compact", "gpt-4o-mini", up.address)])
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                yield Path(sidecar, envoy, up, usage)


@pytest.fixture(scope="module", params=["als", "ext_proc"])
def path(request) -> Iterator[Path]:
    with usage_path(request.param) as p:
        yield p


def sse(*docs: object, crlf: bool = False) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    out = b""
    for doc in docs:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        out += b"data: " + data + nl + nl
    return out


def split(data: bytes, *at: int) -> list[bytes]:
    cuts = [0, *at, len(data)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


JSON_CASES = {
    # the usual shape
    "plain": (json.dumps({"id": "x", "model": "gpt-4o", "choices": [],
                          "usage": {"prompt_tokens": 123, "completion_tokens": 45}}), "gpt-4o",
              (123, 45)),
    # usage before model, pretty-printed, the compact model named: priced as it
    "order_and_blanks": ('{\n  "usage" : {\n    "completion_tokens" : 7,\n    "prompt_tokens" : 8\n'
                         '  },\n  "model" : "gpt-4o-mini"\n}\n', "gpt-4o-mini", (8, 7)),
    # decoys: "usage" inside the generated text (escaped quotes) and in a nested object;
    # only the top-level usage counts
    "decoys": (json.dumps({
        "model": "gpt-4o",
        "choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 999999} {[}]\\'},
                     "usage": {"prompt_tokens": 888888, "completion_tokens": 1}}],
        "metadata": {"usage": {"prompt_tokens": 777777, "completion_tokens": 2}},
        "usage": {"prompt_tokens": 31, "completion_tokens": 5,
                  "prompt_tokens_details": {"cached_tokens": 0}}}), "gpt-4o", (31, 5)),
    # Anthropic messages: input_tokens is the uncached part, cache reads and writes add to it
    "anthropic": (json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4",
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 300,
                  "cache_creation_input_tokens": 50}}), "claude-sonnet-4", (370, 9)),
    # OpenAI responses API
    "responses": (json.dumps({"object": "response", "model": "gpt-4o", "output": [],
                              "usage": {"input_tokens": 900, "output_tokens": 80,
                                        "input_tokens_details": {"cached_tokens": 512}}}),
                  "gpt-4o", (900, 80)),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_json_reply_usage_is_read_to_the_token(path, case):
    text, model, (inp, out) = JSON_CASES[case]
    tenant = f"json-{case}"
    body = text.encode()
    assert path.send(tenant, tenant, Reply(split(body, len(body) // 3, len(body) // 2))) == 200
    rec = path.spend(tenant)[metric_model(model)]
    assert (rec["input_tokens"], rec["output_tokens"]) == (inp, out)


def test_sse_usage_split_across_chunks_with_crlf_and_null_usage_chunks(path):
    stream = sse({"model": "gpt-4o", "choices": [{"delta": {"content": "a"}}], "usage": None},
                 {"model": "gpt-4o", "choices": [{"delta": {"content": '"usage": 5'}}],
                  "usage": None},
                 {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 61,
                                                             "completion_tokens": 29}},
                 b"[DONE]", crlf=True)
    at = stream.index(b'"prompt_tokens"') + 5  # the usage line cut in two
    key = stream.index(b'"usage": {') + 3  # and its key too, in another chunk
    reply = Reply(split(stream, 10, key, at), content_type="text/event-stream; charset=utf-8")
    assert path.send("sse-split", "sse-split", reply) == 200
    rec = path.spend("sse-split")["gpt-4o"]
    assert (rec["input_tokens"], rec["output_tokens"]) == (61, 29)


def events(*pairs: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode() for name, doc in pairs)


STREAM_CASES = {
    # message_start carries the input, each message_delta the cumulative output; a field
    # seen in an earlier delta and absent from the last one still counts
    "sse-anthropic": (events(
        ("message_start", {"type": "message_start", "message": {
            "id": "m", "model": "claude-sonnet-4", "usage": {
                "input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 4000}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": '"usage": 3'}}),
        ("message_delta", {"type": "message_delta", "delta": {},
                           "usage": {"output_tokens": 40, "cache_creation_input_tokens": 7}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 97}}),
        ("message_stop", {"type": "message_stop"})), "claude-sonnet-4", (4032, 97)),
    "sse-responses": (events(
        ("response.created", {"type": "response.created", "response": {
            "model": "gpt-4o", "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
        ("response.completed", {"type": "response.completed", "response": {
            "model": "gpt-4o", "usage": {"input_tokens": 30, "output_tokens": 7}}})),
        "gpt-4o", (30, 7)),
}


def _big_text(n: int) -> str:
    """Generated text of about n bytes, with what a decoy would try: usage in quotes
    (escaped in JSON), braces, backslashes, newlines."""
    unit = 'lorem "usage": {"input_tokens": 1} \\ {[}] line\n '
    return (unit * (n // len(unit) + 1))[:n]


# a tool's JSON schema is echoed in the responses API's final event, before its usage: a
# nested "usage" object there must not be taken for the response's own
_DECOY_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {
    "usage": {"input_tokens": 1, "output_tokens": 1}}}}

# final events far over the filter's 16 KiB line: read whatever their size
LARGE_STREAM_CASES = {
    "sse-responses-large": (events(
        ("response.created", {"type": "response.created", "response": {
            "model": "gpt-4o", "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi"}),
        ("response.completed", {"type": "response.completed", "sequence_number": 9,
                                "response": {
            "id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4o",
            "output": [{"type": "message", "content": [
                {"type": "output_text", "text": _big_text(300_000)}]}],
            "tools": [_DECOY_TOOL],
            "usage": {"input_tokens": 4321, "output_tokens": 65432,
                      "input_tokens_details": {"cached_tokens": 0}},
            "metadata": {"note": '"usage": {"input_tokens": 9}'}}})),
        "gpt-4o", (4321, 65432)),
    "sse-anthropic-large": (events(
        ("message_start", {"type": "message_start", "message": {
            "id": "m", "model": "claude-sonnet-4", "content": [],
            "system_echo": _big_text(40_000),
            "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 97}}),
        ("message_stop", {"type": "message_stop"})), "claude-sonnet-4", (25, 97)),
}


@pytest.mark.parametrize("case", sorted(LARGE_STREAM_CASES))
@pytest.mark.parametrize("piece", [1000, 7001, 1 << 20])
def test_a_final_event_over_the_line_limit_is_read_to_the_token(path, case, piece):
    stream, model, (inp, out) = LARGE_STREAM_CASES[case]
    before = path.spend(case).get(metric_model(model), {"input_tokens": 0, "output_tokens": 0})
    reply = Reply(split(stream, *range(piece, len(stream), piece)),
                  content_type="text/event-stream")
    assert path.send(case, case, reply) == 200
    rec = path.spend(case)[metric_model(model)]
    assert (rec["input_tokens"] - before["input_tokens"],
            rec["output_tokens"] - before["output_tokens"]) == (inp, out)


# ext_proc buffers at most sidecar.settlement.usage.MAX_JSON_BYTES of a JSON reply: the access log only
@pytest.mark.parametrize("path", ["als"], indirect=True)
def test_a_json_reply_of_any_size_is_read_to_the_token(path):
    # over 4 MiB (a size no filter should hold), with the decoys of the stream cases
    body = json.dumps({"id": "x", "model": "gpt-4o", "choices": [{"message": {
        "content": _big_text(5 * 1024 * 1024)}}], "tools": [_DECOY_TOOL],
        "usage": {"prompt_tokens": 777, "completion_tokens": 1_500_000}}).encode()
    assert path.send("json-large", "json-large", Reply(split(body, *range(
        65536, len(body), 65536)))) == 200
    rec = path.spend("json-large")["gpt-4o"]
    assert (rec["input_tokens"], rec["output_tokens"]) == (777, 1_500_000)


def test_a_json_reply_cut_anywhere_is_read_to_the_token(path):
    """Chunk boundaries inside backslash runs, escaped quotes, keys and values: the
    filter's selector carries its state from one chunk to the next."""
    body = json.dumps({"model": "gpt-4o", "choices": [{"message": {
        "content": 'a\\\\"usage": {"prompt_tokens": 9}\\\\\\'}}],
        "x": {"usage": {"prompt_tokens": 8}}, "usage": {"prompt_tokens": 3,
                                                        "completion_tokens": 4}}).encode()
    start = body.index(b"content")
    before = path.spend("json-cuts").get("gpt-4o", {"input_tokens": 0, "output_tokens": 0})
    cuts = range(start, len(body) - 1, 3)
    for at in cuts:
        assert path.send("json-cuts", "json-cuts", Reply(split(body, at, at + 1))) == 200
    rec = path.spend("json-cuts")["gpt-4o"]
    assert (rec["input_tokens"] - before["input_tokens"],
            rec["output_tokens"] - before["output_tokens"]) == (3 * len(cuts), 4 * len(cuts))


def envoy_peak_rss_mb(envoy: EnvoyProcess) -> float:
    """Envoy's peak resident memory so far (VmHWM), in MB."""
    assert envoy.proc is not None
    for line in open(f"/proc/{envoy.proc.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("path", ["als"], indirect=True)  # the Lua filter: --usage als
def test_the_usage_filter_never_holds_a_whole_reply(path):
    """Many large replies at once: Envoy's memory grows by what it forwards, not by a copy
    of each reply held for its usage."""
    # replies under 4 MiB (what a buffering filter would hold whole), each its own text
    # (Lua interns strings: identical replies would share one copy)
    n, size = 24, int(3.9 * 1024 * 1024)
    replies = []
    for i in range(n + 1):
        rnd = random.Random(i)
        text = " ".join(f"w{rnd.randrange(10**6)}" for _ in range(size // 8))[:size]
        body = json.dumps({"id": "x", "model": "gpt-4o", "choices": [{"message": {
            "content": text}}], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}).encode()
        replies.append(Reply(split(body, *range(65536, len(body), 65536))))
    path.send("json-many", "json-many-warm", replies[n])  # Envoy's pools and Lua state exist
    before = envoy_peak_rss_mb(path.envoy)
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda i=i: statuses.append(
        path.send("json-many", f"json-many-{i}", replies[i]))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * n
    grown = envoy_peak_rss_mb(path.envoy) - before
    # holding each reply (in parts, then joined) takes over 150 MB more; streaming
    # takes the chunks in flight and Lua's garbage between collections (4 MB measured; on
    # a slow machine at most Envoy's flow-control buffers, 2 x 1 MiB a request, on top)
    assert grown < 72, f"Envoy's peak memory grew {grown:.0f} MB for {n} concurrent replies"
    rec = path.spend("json-many")["gpt-4o"]
    assert (rec["input_tokens"], rec["output_tokens"]) == (5 * (n + 1), 7 * (n + 1))


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_other_stream_formats_are_read_to_the_token(path, case):
    stream, model, (inp, out) = STREAM_CASES[case]
    reply = Reply(split(stream, len(stream) // 2), content_type="text/event-stream")
    assert path.send(case, case, reply) == 200
    rec = path.spend(case)[metric_model(model)]
    assert (rec["input_tokens"], rec["output_tokens"]) == (inp, out)


# what Path.send asks for: its body's bytes / 4 as input, max_tokens 500 as output (the
# estimate and, with usage unreadable, the bound: sidecar/settlement/bound.py)
SENT_INPUT = -(-len(json.dumps({"model": "gpt-4o", "max_tokens": 500, "messages": [
    {"role": "user", "content": "hi"}]}).encode()) // 4)


def test_a_stream_without_usage_is_charged_at_its_bound(path):
    before = path.metric("kt_reservations_closed_total", outcome="bound_no_usage")
    stream = sse({"model": "gpt-4o", "choices": [{"delta": {"content": "a"}}]}, b"[DONE]")
    assert path.send("sse-none", "sse-none", Reply([stream], content_type="text/event-stream")) == 200
    assert path.metric("kt_reservations_closed_total", outcome="bound_no_usage") == before + 1
    # no usage could be read: charged at what the provider could have billed, recorded
    # with its tokens in the durable spend (docs/usage.md)
    rec = path.spend("sse-none")["gpt-4o"]
    assert (rec["input_tokens"], rec["output_tokens"]) == (SENT_INPUT, 500)


def test_an_upstream_reset_mid_stream_is_charged_at_its_bound(path):
    before = path.metric("kt_reservations_closed_total", outcome="bound_abandoned")
    first = sse({"model": "gpt-4o", "choices": [{"delta": {"content": "a"}}], "usage": None})
    assert path.send("sse-reset", "sse-reset",
                     Reply([first], content_type="text/event-stream", reset=True)) in (0, 200)
    wait_until(lambda: path.metric("kt_reservations_closed_total", outcome="bound_abandoned")
               == before + 1, 10, "reservation charged at its bound as abandoned")
    wait_until(lambda: path.spend("sse-reset").get("gpt-4o", {}).get("output_tokens") == 500,
               10, "the bound in the durable spend")
    assert path.spend("sse-reset")["gpt-4o"]["input_tokens"] == SENT_INPUT


# 504: the provider's own (its gateway timed out), not Envoy's route timeout, which is
# charged at the bound (test_redteam_findings.py): by ext_proc they differ only by the
# header Envoy's router sets on an upstream's answer
@pytest.mark.parametrize("status", [503, 504])
def test_a_5xx_without_usage_releases_the_reservation(path, status):
    before = path.metric("kt_reservations_closed_total", outcome="released_upstream_error")
    reply = Reply([b'{"error": {"message": "overloaded"}}'], status=status)
    assert path.send(f"five{status}", f"five{status}", reply) == status
    assert path.metric("kt_reservations_closed_total",
                       outcome="released_upstream_error") == before + 1


def test_upstream_slis_per_provider_and_model_and_in_each_event(path):
    """The provider's answer, as the access log's timings (or ext_proc's stream) tell it:
    the histograms per provider and model (none configured here: "none"; a model the
    reply names outside the policy takes the model the decision routed to, never a label
    of its own), and the usage event's status, upstream latency, time to first byte and
    endpoint (the route's name, not the client's path with its query string)."""
    labels = {"model": "gpt-4o", "provider": "none"}  # as the exposition orders them
    before = path.sidecar.metrics()
    text = json.dumps({"model": "my-finetune-7", "choices": [],
                       "usage": {"prompt_tokens": 12, "completion_tokens": 34}}).encode()
    stream = sse(*({"model": "gpt-4o", "choices": [{"delta": {"content": "x" * 50}}]}
                   for _ in range(4)),
                 {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 5,
                                                              "completion_tokens": 40}},
                 b"[DONE]")
    pieces = split(stream, *range(100, len(stream), 100))  # 20 ms apart (RawUpstream)
    assert path.send("sli-json", "sli-json", Reply(split(text, 20))) == 200
    assert path.send("sli-sse", "sli-sse", Reply(pieces, content_type="text/event-stream")) \
        == 200
    after = path.sidecar.metrics()

    def delta(name: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    for family in ("latency_seconds", "ttft_seconds", "request_bytes", "response_bytes"):
        assert delta(f"kt_upstream_{family}_count") == 2, family
    assert delta("kt_upstream_output_tokens_per_second_count") == 1  # the stream only
    assert 0 < delta("kt_upstream_ttft_seconds_sum") < delta("kt_upstream_latency_seconds_sum")
    # the stream's generation took at least the upstream's pauses between its pieces
    assert delta("kt_upstream_output_tokens_per_second_sum") <= 40 / (0.02 * (len(pieces) - 1))
    assert delta("kt_upstream_response_bytes_sum") == len(text) + len(stream)
    request = len(json.dumps({"model": "gpt-4o", "max_tokens": 500,
                              "messages": [{"role": "user", "content": "hi"}]}))
    assert delta("kt_upstream_request_bytes_sum") == 2 * request
    assert "my-finetune-7" not in after  # no label from a value the upstream chose

    def events() -> dict:
        out = {}
        for f in (path.sidecar.workdir / "kt-state" / "events").glob("*.jsonl"):
            for line in f.read_text().splitlines():
                ev = json.loads(line)
                if ev.get("tenant", "").startswith("sli-"):
                    out[ev["tenant"]] = ev
        return out

    wait_until(lambda: len(events()) == 2, 10, "both events written")
    got = events()
    for tenant in ("sli-json", "sli-sse"):
        ev = got[tenant]
        assert (ev["status"], ev["endpoint"]) == (200, "POST /v1/chat/completions"), ev
        assert 0 < ev["ttft_us"] <= ev["upstream_us"], ev
    sse_ev = got["sli-sse"]
    assert sse_ev["upstream_us"] - sse_ev["ttft_us"] >= 20_000 * (len(pieces) - 1), sse_ev
