"""What a hostile client tries on the charge, through a real Envoy from `kt envoy-config`
(usage by the access log, the default): a prompt sent in chunks beyond what Envoy passes
to the decision is refused 411 and never reaches the upstream; streamed replies whose
usage cannot be read are charged at the bound, `n` choices included."""
from __future__ import annotations

import gzip
import http.client
import json
import socket

import pytest

from tests.support.procs import wait_until
from tests.e2e.test_usage_path import Reply, events, sse, usage_path

pytestmark = pytest.mark.envoy


def chunked_request(port: int, tenant: str, body: bytes, piece: int = 16384) -> tuple[int, bytes]:
    """POST ``body`` with transfer-encoding: chunked (no content-length); (status, body)."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nconnection: close\r\n"
            b"x-tenant-id: %s\r\nx-raw-case: chunked\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n" % tenant.encode())
    data = head + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                           for i in range(0, len(body), piece)) + b"0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    head_end = received.index(b"\r\n\r\n")
    return int(received.split(b" ", 2)[1]), received[head_end + 4:]


def test_a_chunked_prompt_beyond_envoys_buffer_is_refused_411_and_a_small_one_counted():
    with usage_path("als") as path:
        reply = json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 1,
                                                         "completion_tokens": 1}}).encode()
        path.upstream.replies["chunked"] = Reply([reply])
        big = json.dumps({"model": "gpt-4o", "messages": [
            {"role": "user", "content": "w" * 1_000_000}], "max_tokens": 10}).encode()
        status, body = chunked_request(path.envoy.listen_port, "json-plain", big)
        err = json.loads(body)["error"]
        assert status == 411 and err["code"] == "length_required", body
        assert "content-length" in err["message"]
        # a chunked body within what Envoy passes is read whole: admitted
        small = json.dumps({"model": "gpt-4o", "max_tokens": 10,
                            "messages": [{"role": "user", "content": "hi"}]}).encode()
        status, body = chunked_request(path.envoy.listen_port, "json-plain", small)
        assert status == 200, body


def test_a_stream_of_n_choices_without_usage_is_charged_for_every_choice():
    with usage_path("als") as path:
        path.upstream.replies["n8"] = Reply(
            [sse({"model": "gpt-4o", "choices": [{"index": i, "delta": {"content": "a"}}
                                                 for i in range(8)]}, b"[DONE]")],
            content_type="text/event-stream")
        body = json.dumps({"model": "gpt-4o", "stream": True, "n": 8, "max_tokens": 300,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", path.envoy.listen_port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={
                "content-type": "application/json", "x-tenant-id": "sse-none",
                "x-raw-case": "n8"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        finally:
            conn.close()
        path.settled()
        wait_until(lambda: "gpt-4o" in path.spend("sse-none"), 10, "the bound in the spend")
        rec = path.spend("sse-none")["gpt-4o"]
        # 8 choices of at most 300 tokens each could have been billed; the input is the
        # body the sidecar saw (the gateway adds stream_options.include_usage to it)
        assert rec["output_tokens"] == 8 * 300
        assert rec["input_tokens"] >= -(-len(body) // 4)


def post(path, tenant: str, case: str, body: bytes, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", path.envoy.listen_port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={
            "content-type": "application/json", "x-tenant-id": tenant, "x-raw-case": case,
            **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
        path.settled()


def unreadable_replies() -> dict[str, Reply]:
    usage = {"prompt_tokens": 9, "completion_tokens": 7}
    # a compressed reply from an upstream that compresses unasked (the gateway removes the
    # client's Accept-Encoding): the usage filter sees compressed bytes
    compressed = gzip.compress(json.dumps({"model": "gpt-4o", "usage": usage}).encode())
    # a stream whose provider ignored stream_options.include_usage: no usage at all
    no_usage = sse({"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": "a"}}]},
                   b"[DONE]")
    return {"json-plain": Reply([compressed], headers={"content-encoding": "gzip"}),
            "sse-no-usage": Reply([no_usage], content_type="text/event-stream")}


def test_a_final_event_over_the_line_limit_is_read_not_bounded():
    """A Responses stream whose response.completed line is over 16 KiB: the usage filter
    reads lines of any size, so it settles with the usage it reports."""
    long_line = events(("response.completed", {"type": "response.completed", "response": {
        "model": "gpt-4o", "output": [{"content": "o" * 26_000}],
        "usage": {"input_tokens": 9, "output_tokens": 7}}}))
    with usage_path("als") as path:
        path.upstream.replies["long-line"] = Reply([long_line],
                                                   content_type="text/event-stream")
        body = json.dumps({"model": "gpt-4o", "max_tokens": 2000,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        assert post(path, "long-line", "long-line", body) == 200
        wait_until(lambda: "gpt-4o" in path.spend("long-line"), 10, "the usage in the spend")
        rec = path.spend("long-line")["gpt-4o"]
        assert (rec["input_tokens"], rec["output_tokens"]) == (9, 7)


@pytest.mark.parametrize("tenant", sorted(unreadable_replies()))
def test_a_reply_the_filter_cannot_read_is_charged_at_the_bound(tenant):
    with usage_path("als") as path:
        path.upstream.replies[tenant] = unreadable_replies()[tenant]
        body = json.dumps({"model": "gpt-4o", "max_tokens": 2000,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        before = path.metric("kt_reservations_closed_total", outcome="bound_no_usage")
        assert post(path, tenant, tenant, body, {"accept-encoding": "gzip"}) == 200
        wait_until(lambda: path.metric("kt_reservations_closed_total",
                                       outcome="bound_no_usage") == before + 1,
                   10, "charged at the bound")
        rec = path.spend(tenant)["gpt-4o"]
        # not the 9 + 7 the reply says (unread), nor nothing: what it could have billed
        assert (rec["input_tokens"], rec["output_tokens"]) == (-(-len(body) // 4), 2000)
