"""Red-team findings, through a real Envoy from `kt envoy-config`'s renderer: each test
states what a correct gateway must charge and FAILED on the code it was found on. Those not
fixed yet are marked xfail(strict=True), with what they wait for, so the suite stays green
until the fix; then the xfail turns into an XPASS failure and the marker must be removed.
All fixed: the partial usage (both paths), Envoy's own 504 (both paths), the fields of a
body beyond the part Envoy passes to the decision (both paths).

- A stream cut short after a *partial* usage (Anthropic's message_start carries the input
  and 1 output token; the real output comes in message_delta) is settled at that partial
  usage instead of at its bound: a client that leaves (or a provider that resets) right
  after message_start pays its input and one output token. By the access log (the
  default usage path); ext_proc charges the bound.
- A body larger than the part Envoy passes to the decision (64 KiB) is not parsed, so its
  `n` is never seen (wherever it is written) and a stream left before its usage chunk is
  charged at one choice's bound while the provider bills every choice; so are its
  `max_tokens` and a Responses `previous_response_id` (the stored conversation billed as
  input). The usage filter now reports them from the whole body.
- A reply slower than Envoy's route timeout is answered 504 by Envoy itself and its
  reservation released in full (a provider's failure), though the provider got the
  request and goes on generating and billing it (by ext_proc too: told from a provider's
  own 504 by the header Envoy's router sets on upstream answers).
"""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
from typing import Iterator

import pytest

from sidecar.envoy_config import EnvoyOptions, TierRoute, render
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, wait_until, workdir
from tests.support.upstream import FakeUpstream
from tests.e2e.test_usage_path import Reply, RawUpstream, events

pytestmark = pytest.mark.envoy

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01, max_output_tokens: 16384, max_input_tokens: 128000}
defaults:
  limits: {rpm: 1000, tpm: 10000000}
  budget: {tokens: 10000000, period: day}
tenants:
  anthropic-cut: {}
  slow-reply: {}
  big-n: {}
"""
BODY = {"model": "gpt-4o", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}
MAX_TOKENS = BODY["max_tokens"]


@contextlib.contextmanager
def gateway(upstream_address: str, upstream_timeout_s: float = 300.0,
            usage: str = "als") -> Iterator[tuple[SidecarProcess, EnvoyProcess]]:
    with workdir() as d:
        (d / "policy.yaml").write_text(POLICY)
        with SidecarProcess(d / "policy.yaml", d) as sidecar:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"127.0.0.1:{sidecar.grpc_port}",
                                usage=usage,  # type: ignore[arg-type]
                                authz_timeout_s=1.0, upstream_timeout_s=upstream_timeout_s,
                                tiers=[TierRoute("default", "gpt-4o", upstream_address)])
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                yield sidecar, envoy


def post(envoy: EnvoyProcess, tenant: str, headers: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", envoy.listen_port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(BODY).encode(),
                     {"content-type": "application/json", "x-tenant-id": tenant, **headers})
        resp = conn.getresponse()
        try:
            resp.read()
        except (http.client.IncompleteRead, ConnectionError):
            return 0
        return resp.status
    finally:
        conn.close()


def spend(sidecar: SidecarProcess, tenant: str) -> dict:
    return sidecar.spend().get(tenant, {}).get("gpt-4o", {})


@pytest.mark.parametrize("usage", ["als", "ext_proc"])  # both charge the bound
def test_a_stream_cut_after_a_partial_usage_is_charged_at_its_bound(usage):
    start = events(("message_start", {"type": "message_start", "message": {
        "id": "m", "model": "gpt-4o", "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Once upon"}}))
    with RawUpstream() as up, gateway(up.address, usage=usage) as (sidecar, envoy):
        up.replies["cut"] = Reply([start], content_type="text/event-stream", reset=True)
        assert post(envoy, "anthropic-cut", {"x-raw-case": "cut"}) in (0, 200)
        wait_until(lambda: spend(sidecar, "anthropic-cut").get("output_tokens") is not None,
                   15, "the request in the durable spend")
        # the provider generated past message_start (its text came), and how much is
        # unknown: what it could have billed, as for any stream cut before its usage
        assert spend(sidecar, "anthropic-cut")["output_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("usage", ["als", "ext_proc"])
def test_a_reply_slower_than_the_route_timeout_is_charged_at_its_bound(usage):
    with FakeUpstream("slow") as up, gateway(up.address, upstream_timeout_s=0.5,
                                             usage=usage) as (sidecar, envoy):
        status = post(envoy, "slow-reply", {"x-fake-delay-ms": "2000",
                                            "x-fake-usage": "300,500"})
        assert status == 504  # Envoy gave up on the provider, which still generates
        assert len(up.requests) == 1  # it reached the provider, which bills what it generates
        if usage == "als":
            sidecar.wait_usage_delivered(("allow",))  # Envoy's entry for the 504 is handled
        wait_until(lambda: spend(sidecar, "slow-reply").get("output_tokens") == MAX_TOKENS,
                   15, "the request charged at its bound in the durable spend")


PROMPT = "Tell me a long story. " * 3300  # ~72 KB: over the 64 KiB the decision reads
CHOICES, OUTPUT = 8, 3000  # the provider bills 24,000 output tokens; one choice's bound is
MOST = 16384  # the model's max_output_tokens
CONTEXT = 128000  # and its max_input_tokens


def _chat(tail: str, head: str = "") -> bytes:
    """A streamed chat body of PROMPT with ``head`` and ``tail`` members (raw JSON text:
    a key twice, a key spelled with escapes)."""
    body = json.dumps({"model": "gpt-4o", "stream": True,
                       "messages": [{"role": "user", "content": PROMPT}]})
    return ("{" + head + body[1:-1] + tail + "}").encode()


def _at_the_edge(tail: str) -> bytes:
    """A streamed chat body 10 bytes under the part the decision reads whole, which the
    usage filter's include_usage takes over it."""
    short = ("{" + json.dumps({"model": "gpt-4o", "stream": True, "messages": [
        {"role": "user", "content": ""}]})[1:-1] + tail + "}").encode()
    pad = 65536 - 10 - len(short)
    return short.replace(b'"content": ""', b'"content": "' + b"x" * pad + b'"')


# tenant: (path, body, usage the provider bills, the bound: (input or None, output))
LARGE_BODIES = {
    # under 64 KiB as sent, over it once asked for its usage (Envoy 1.40's ext_authz
    # passes it whole, as the Lua filter hands it on in one piece; the filter reports it
    # too, in case a version cuts it at max_request_bytes: the two views agree)
    "n-at-the-edge": ("/v1/chat/completions", _at_the_edge(', "n": 8'),
                      (0, CHOICES * OUTPUT), (None, CHOICES * MOST)),
    # a truncated body is not parsed at all: n is unseen wherever it is written
    "n-first": ("/v1/chat/completions", _chat("", '"n": 8, '), (0, CHOICES * OUTPUT),
                (None, CHOICES * MOST)),
    # written twice, the provider takes the last
    "n-twice": ("/v1/chat/completions", _chat(', "n": 8', '"n": 1, '), (0, CHOICES * OUTPUT),
                (None, CHOICES * MOST)),
    "n-escaped": ("/v1/chat/completions", _chat(', "\\u006e": 8'), (0, CHOICES * OUTPUT),
                  (None, CHOICES * MOST)),
    # blanks around a value are JSON's: never too long to be read
    "n-padded": ("/v1/chat/completions", _chat(', "n":' + " " * 4000 + "8"),
                 (0, CHOICES * OUTPUT), (None, CHOICES * MOST)),
    # every key spelled with escapes, a key of 300 KB (never held) before them
    "escaped": ("/v1/responses", (json.dumps({"model": "gpt-4o", "stream": True,
                                              "input": PROMPT, "x" * 300_000: 1})[:-1]
                                  + ', "' + "".join(f"\\u{ord(c):04x}" for c in
                                                    "previous_response_id")
                                  + '": "resp_1", "'
                                  + "".join(f"\\u{ord(c):04x}" for c in "max_output_tokens")
                                  + '": 2000}').encode(), (100000, 1500), (CONTEXT, 2000)),
    # a max_tokens the decision did not see bounds each choice as for a small body
    "max-last": ("/v1/chat/completions", _chat(', "max_tokens": 3000, "n": 8'),
                 (0, CHOICES * OUTPUT), (None, CHOICES * OUTPUT)),
    # the Responses API (read as it passes, not buffered): the stored conversation is
    # billed as input: its bound is the model's context window
    "stored": ("/v1/responses", json.dumps({
        "model": "gpt-4o", "stream": True, "input": PROMPT, "max_output_tokens": 2000,
        "previous_response_id": "resp_1"}).encode(), (100000, 1500), (CONTEXT, 2000)),
}


@pytest.mark.parametrize("usage", ["als", "ext_proc"])
def test_a_large_body_counts_whole_in_the_bound_of_a_stream_left_early(usage):
    """n, max_tokens and previous_response_id beyond the part of a body the decision reads
    reach the bound of a stream the client leaves before its usage (the usage filter reads
    the whole body; sidecar/bound.py)."""
    with FakeUpstream("llm") as up, gateway(up.address, usage=usage) as (sidecar, envoy):
        for tenant, (path, body, (inp, out), (bound_in, bound_out)) in LARGE_BODIES.items():
            assert len(body) > 65536 or tenant == "n-at-the-edge"
            up.release_stream.clear()
            head = (b"POST %s HTTP/1.1\r\nhost: llm\r\nx-tenant-id: %s\r\n"
                    b"x-fake-usage: %d,%d\r\nx-fake-format: responses\r\nx-fake-hold: 1\r\n"
                    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                    % (path.encode(), tenant.encode(), inp or len(body) // 4, out, len(body)))
            try:
                with socket.create_connection(("127.0.0.1", envoy.listen_port),
                                              timeout=30) as sock:
                    sock.sendall(head + body)
                    received = b""
                    # the first chunk or event: then the client leaves
                    while b'"first"' not in received and b"response.created" not in received:
                        chunk = sock.recv(65536)
                        assert chunk, received
                        received += chunk
            finally:
                up.release_stream.set()  # the provider finishes (and bills) every choice
            assert received.startswith(b"HTTP/1.1 200"), received[:200]
            wait_until(lambda t=tenant: spend(sidecar, t).get("output_tokens") is not None, 15,
                       f"request of {tenant} in the durable spend")
            rec = spend(sidecar, tenant)
            assert rec["output_tokens"] == bound_out >= out, tenant
            if bound_in is not None:
                assert rec["input_tokens"] == bound_in >= inp, tenant
        # a client that leaves before any reply (the provider still answering in 1 s)
        body = _chat(', "n": 8')
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nx-tenant-id: gone\r\n"
                b"x-fake-delay-ms: 1000\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body))
        with socket.create_connection(("127.0.0.1", envoy.listen_port), timeout=30) as sock:
            sock.sendall(head + body)
            wait_until(lambda: len(up.requests) == len(LARGE_BODIES) + 1, 10,
                       "the request at the provider")
        wait_until(lambda: spend(sidecar, "gone").get("output_tokens") is not None, 15,
                   "request of gone in the durable spend")
        assert spend(sidecar, "gone")["output_tokens"] == CHOICES * MOST
