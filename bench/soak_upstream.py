"""The soak's fake LLM provider: an OpenAI-compatible chat endpoint that keeps its own
log of what it served, the provider's side of the books.

What each reply looks like is chosen by the soak's client, in request headers that
Envoy passes through (the provider of a real deployment decides these itself):
- `x-soak-usage: IN,OUT,CACHED`  the usage to report (CACHED is part of IN);
- `x-soak-fail: 1`               answer 503 with an error body and no usage (a provider error);
- `x-soak-leave: 1`              (streams) send the first chunk, then wait until the client
                                 has gone (Envoy resets the connection) before the rest, so
                                 the usage chunk can never reach the gateway;
- body `"stream": true` with `stream_options.include_usage`: SSE, the usage chunk last.

Every request is logged with the headers the gateway added (`x-kt-reservation`, the id the
sidecar's books use; `x-kt-tenant`, `x-kt-decision`, `x-kt-model`), its arrival time on
this host's clock, the usage it reported and whether the reply was written to its end.
"""
from __future__ import annotations

import json
import select
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

LEAVE_WAIT_S = 15.0  # how long a held stream waits for its client to go


@dataclass
class Served:
    """One request as the provider saw it."""
    at: float  # arrival, time.time()
    seq: int  # the client's number for the request (x-soak-seq), -1 when absent
    reservation: str
    tenant: str
    decision: str
    model: str
    gateway: str
    stream: bool
    status: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    leave: bool  # the client asked to leave mid-stream
    completed: bool = False  # every byte of the reply written (for a stream: usage chunk too)


@dataclass
class ProviderLog:
    served: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, s: Served) -> None:
        with self.lock:
            self.served.append(s)

    def snapshot(self) -> list[Served]:
        with self.lock:
            return list(self.served)


class SoakProvider:
    """A threaded HTTP/1.1 server on loopback; ``with SoakProvider(name) as p: p.port``."""

    def __init__(self, name: str, log: ProviderLog) -> None:
        self.name = name
        self.log = log
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def __enter__(self) -> "SoakProvider":
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle on, a kept-alive
            # connection waits ~40 ms for the peer's delayed ACK before the body
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 (stdlib name)
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                h = {k.lower(): v for k, v in self.headers.items()}
                try:
                    inp, out, cached = (int(x) for x in h.get("x-soak-usage", "10,5,0").split(","))
                except ValueError:
                    inp, out, cached = 10, 5, 0
                stream = bool(body.get("stream"))
                rec = Served(
                    at=time.time(), seq=int(h.get("x-soak-seq", "-1") or -1),
                    reservation=h.get("x-kt-reservation", ""),
                    tenant=h.get("x-kt-tenant", ""), decision=h.get("x-kt-decision", ""),
                    model=str(body.get("model", "")), gateway=h.get("x-soak-gateway", ""),
                    stream=stream, status=503 if h.get("x-soak-fail") else 200,
                    input_tokens=inp, output_tokens=out, cached_tokens=cached,
                    leave=bool(h.get("x-soak-leave")) and stream)
                provider.log.add(rec)
                try:
                    if rec.status != 200:
                        self._send(rec.status, {"error": {"type": "server_error",
                                                          "message": "provider failure"}})
                    elif stream:
                        self._stream(rec)
                    else:
                        self._send(200, {
                            "id": "chatcmpl-soak", "object": "chat.completion",
                            "model": rec.model,
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": "ok"}}],
                            "usage": {"prompt_tokens": inp, "completion_tokens": out,
                                      "total_tokens": inp + out,
                                      "prompt_tokens_details": {"cached_tokens": cached}}})
                    rec.completed = True
                except OSError:  # the gateway went (client left, Envoy restarted)
                    self.close_connection = True

            def _send(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _wait_client_gone(self) -> None:
                """Block until the gateway closes this connection (the client left)."""
                deadline = time.monotonic() + LEAVE_WAIT_S
                sock = self.connection
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([sock], [], [], 0.1)
                    if ready:
                        try:
                            if not sock.recv(1024):
                                return
                        except OSError:
                            return

            def _stream(self, rec: Served) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                first = {"model": rec.model, "choices": [{"index": 0,
                                                          "delta": {"content": "first"}}]}
                self._chunk(f"data: {json.dumps(first)}\n\n".encode())
                if rec.leave:
                    self._wait_client_gone()
                    self.close_connection = True
                rest = {"model": rec.model, "choices": [{"index": 0,
                                                         "delta": {"content": " rest"}}]}
                self._chunk(f"data: {json.dumps(rest)}\n\n".encode())
                u = {"model": rec.model, "choices": [], "usage": {
                    "prompt_tokens": rec.input_tokens, "completion_tokens": rec.output_tokens,
                    "total_tokens": rec.input_tokens + rec.output_tokens,
                    "prompt_tokens_details": {"cached_tokens": rec.cached_tokens}}}
                self._chunk(f"data: {json.dumps(u)}\n\n".encode())
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
