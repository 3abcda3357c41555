"""A small fake OpenAI-compatible upstream (the one part that cannot be real here).

POST /v1/chat/completions answers a chat.completion whose `model` echoes the
request body's model, with a `usage` block, and echoes the request headers it
received and its own name (`served_by`). Test controls, as request headers:
- `x-fake-usage: IN,OUT`  the usage to report (default 10,5);
- `x-fake-status: 503`    answer that status with an error body and no usage;
- `FakeUpstream(name, status=429)` answers that status to every request (a provider
  out of quota), `ssl_context=` serves HTTPS (a trustme certificate: a provider on TLS);
- `FakeUpstream(name, quota=ProviderQuota(rpm, burst))` keeps its own request quota, as
  real providers do, and answers 429 (with retry-after) to a request beyond it;
- `x-fake-format: anthropic`  answer in Anthropic's messages format (JSON, or the
  `message_start` / `message_delta` SSE events), IN split into uncached input and
  `x-fake-cached: N` cache-read tokens (OpenAI: `prompt_tokens_details.cached_tokens`);
- `Accept-Encoding: gzip` a JSON answer is gzip-compressed (as providers do);
- `x-fake-output-bytes: N` the answer's text is N bytes of words, different each time;
- `x-fake-format: responses` with `"stream": true`: OpenAI responses events, the last
  (`response.completed`) carrying the whole output and the usage (with `x-fake-hold`,
  the events after the first once `release_stream` is set);
- GET, PUT, PATCH, DELETE (files, batches, models...): recorded and answered 200 `{}`;
- body `"stream": true`   answer SSE: a first chunk at once, the rest (with the
  usage chunk if `stream_options.include_usage`) once `release_stream` is set,
  so a test can see the first chunk arrive before the upstream finishes.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class ProviderQuota:
    """A provider's own request quota: a bucket of rpm x burst requests refilling at rpm per
    minute, on this host's clock, counted when a request arrives. ``tolerance_s``: a request
    may arrive a little earlier, relative to the others, than the sidecar decided it (the
    network between them does not keep the spacing exactly); the provider tolerates that
    much refill, no more (the sidecar's own quota is exact: tests/core/test_provider_invariants.py)."""

    def __init__(self, rpm: int, burst: float = 1.0, tolerance_s: float = 0.1) -> None:
        self.cap = rpm * burst
        self.rate = rpm / 60.0
        self.tolerance = tolerance_s * self.rate
        self.level = self.cap
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.admitted = 0
        self.refused = 0

    def take(self) -> float:
        """0 when admitted, else the seconds until it would be."""
        with self.lock:
            now = time.monotonic()
            self.level = min(self.cap, self.level + (now - self.last) * self.rate)
            self.last = now
            if self.level >= 1 - self.tolerance:
                self.level -= 1
                self.admitted += 1
                return 0.0
            self.refused += 1
            return (1 - self.level) / self.rate


class FakeUpstream:
    def __init__(self, name: str, status: int = 200,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 quota: Optional[ProviderQuota] = None, port: int = 0) -> None:
        self.name = name
        self.listen_port = port  # 0: an ephemeral one
        self.status = status
        self.ssl_context = ssl_context
        self.quota = quota
        self.requests: list[dict] = []  # {"headers", "body"} of every request served
        self.release_stream = threading.Event()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeUpstream":
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle on, a kept-alive
            # connection waits ~40 ms for the peer's delayed ACK before the body
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 (stdlib name)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                # a header sent twice shows as "a, b", so an appended (not overwritten)
                # x-kt-* header fails the tests that read it
                headers: dict[str, str] = {}
                for k, v in self.headers.items():
                    k = k.lower()
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
                try:
                    body = json.loads(raw) if raw else {}
                except (ValueError, RecursionError):  # a hostile body reaches it too
                    body = {"_unparsed": raw.decode(errors="replace")}
                upstream.requests.append({"headers": headers, "body": body,
                                          "method": self.command, "path": self.path})
                if self.command != "POST":
                    self._send(200, {})
                    return
                # a provider slow to answer (its headers come after this many ms)
                time.sleep(int(headers.get("x-fake-delay-ms", "0")) / 1000)
                status = int(headers.get("x-fake-status", upstream.status))
                usage_in, usage_out = (int(x) for x in headers.get("x-fake-usage", "10,5").split(","))
                model = body.get("model", "unknown")
                wait = upstream.quota.take() if upstream.quota is not None else 0.0
                text = _words(int(headers.get("x-fake-output-bytes", "0"))) or "ok"
                if wait:
                    data = json.dumps({"error": {"type": "rate_limit_exceeded", "code":
                                                 "rate_limit_exceeded", "message":
                                                 f"{upstream.name}: quota exceeded"}}).encode()
                    self.send_response(429)
                    self.send_header("content-type", "application/json")
                    self.send_header("retry-after", str(max(1, math.ceil(wait))))
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif status == 200 and headers.get("x-fake-format") == "responses" \
                        and body.get("stream"):
                    self._responses(model, usage_in, usage_out, text,
                                    hold="x-fake-hold" in headers)
                elif status == 200 and headers.get("x-fake-format") == "anthropic":
                    self._anthropic(model, usage_in, usage_out,
                                    int(headers.get("x-fake-cached", "0")),
                                    bool(body.get("stream")))
                elif status != 200:
                    self._send(status, {"error": {"type": "server_error", "message": "fake failure"}})
                elif body.get("stream"):
                    self._stream(model, usage_in, usage_out,
                                 bool((body.get("stream_options") or {}).get("include_usage")))
                else:
                    self._send(200, {
                        "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                        "served_by": upstream.name, "received_headers": headers,
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out,
                                  "total_tokens": usage_in + usage_out,
                                  "prompt_tokens_details": {
                                      "cached_tokens": int(headers.get("x-fake-cached", "0"))}}})

            do_GET = do_PUT = do_PATCH = do_DELETE = do_POST  # noqa: N815 (stdlib names)

            def _anthropic(self, model: str, usage_in: int, usage_out: int, cached: int,
                           stream: bool) -> None:
                usage = {"input_tokens": usage_in - cached, "output_tokens": usage_out,
                         "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}
                if not stream:
                    self._send(200, {"id": "msg_fake", "type": "message", "role": "assistant",
                                     "model": model, "served_by": upstream.name,
                                     "content": [{"type": "text", "text": "ok"}],
                                     "usage": usage})
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                events = [
                    ("message_start", {"type": "message_start", "message": {
                        "id": "msg_fake", "model": model, "served_by": upstream.name,
                        "usage": {**usage, "output_tokens": 1}}}),
                    ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": "ok"}}),
                    ("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "end_turn"},
                                       "usage": {"output_tokens": usage_out}}),
                    ("message_stop", {"type": "message_stop"})]
                for name, doc in events:
                    self._chunk(f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode())
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _responses(self, model: str, usage_in: int, usage_out: int, text: str,
                           hold: bool = False) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                events = [
                    ("response.created", {"type": "response.created", "response": {
                        "model": model, "status": "in_progress", "usage": None}}),
                    ("response.output_text.delta", {"type": "response.output_text.delta",
                                                    "delta": text}),
                    ("response.completed", {"type": "response.completed", "response": {
                        "model": model, "status": "completed", "output": [{
                            "type": "message", "content": [{"type": "output_text",
                                                            "text": text}]}],
                        "usage": {"input_tokens": usage_in, "output_tokens": usage_out,
                                  "input_tokens_details": {"cached_tokens": 0}}}})]
                for i, (name, doc) in enumerate(events):
                    self._chunk(f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode())
                    if i == 0 and hold:
                        upstream.release_stream.wait(10)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _send(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                if "gzip" in (self.headers.get("accept-encoding") or ""):
                    data = gzip.compress(data)
                    self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _stream(self, model: str, usage_in: int, usage_out: int, usage: bool) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                first = {"model": model, "served_by": upstream.name,
                         "choices": [{"index": 0, "delta": {"content": "first"}}]}
                self._chunk(f"data: {json.dumps(first)}\n\n".encode())
                upstream.release_stream.wait(10)
                rest = {"model": model, "choices": [{"index": 0, "delta": {"content": " rest"}}]}
                self._chunk(f"data: {json.dumps(rest)}\n\n".encode())
                if usage:
                    u = {"model": model, "choices": [], "usage": {
                        "prompt_tokens": usage_in, "completion_tokens": usage_out}}
                    self._chunk(f"data: {json.dumps(u)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", self.listen_port), Handler)
        self._server.daemon_threads = True
        if self.ssl_context is not None:
            ctx = self.ssl_context

            def get_request():  # TLS per connection, in the handler's thread (no stall)
                sock, addr = self._server.socket.accept()  # type: ignore[union-attr]
                return ctx.wrap_socket(sock, server_side=True,
                                       do_handshake_on_connect=False), addr
            self._server.get_request = get_request  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release_stream.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _words(n: int) -> str:
    """n bytes of text, different at each call (Lua interns equal strings in Envoy: equal
    replies would hide what each one costs)."""
    return os.urandom((n + 1) // 2).hex()[:n] if n > 0 else ""


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m tests.support.upstream NAME=PORT...`: stand-in OpenAI-compatible upstreams
    on loopback until interrupted (the README's quick start: default=8000 compact=8001).
    Each answers a chat completion with a usage block; streams run to their end."""
    import signal
    import sys

    specs = argv if argv is not None else sys.argv[1:]
    if not specs or any("=" not in s or not s.partition("=")[2].isdigit() for s in specs):
        print("usage: python -m tests.support.upstream NAME=PORT [NAME=PORT...]",
              file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        for spec in specs:
            name, _, port = spec.partition("=")
            try:
                up = stack.enter_context(FakeUpstream(name, port=int(port)))
            except OSError as exc:
                print(f"upstream {name}: cannot listen on 127.0.0.1:{port}: {exc.strerror}",
                      file=sys.stderr)
                return 4
            up.release_stream.set()  # no test holds streams back here
            print(f"upstream {name} on {up.address}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
