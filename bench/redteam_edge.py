"""Red-team probes of the edge: what a client can make Envoy do with the provider's bill.

  PYTHONPATH=. python bench/redteam_edge.py [--only NAME,...] [--upstream-timeout 300]

A real `kt serve` (embedded backend) and a real Envoy from `kt envoy-config`'s renderer
(default options: authz mode, usage by the access log, failure mode deny), in front of a
billing upstream: a fake LLM that bills every request it finishes generating (the tokens
in its `x-fake-usage`), after `x-fake-delay-ms`, whether or not anyone still reads the
answer (a non-streamed completion runs to its end at the provider). Each probe prints
the client's statuses, how many requests the upstream billed, the bill priced by the
policy, and the tenant's spend from GET /v1/spend (3 requests per probe, each its own
tenant). The probes (PROBES):
- rq_timeout_header*, retry_on_200, per_try_timeout_retries: forged x-envoy-* timeouts and
  retry policies (with no, an internal and an external X-Forwarded-For);
- rq_timeout_header with --upstream-timeout 0.3: a reply slower than Envoy's route timeout;
- anthropic_leave_after_start / anthropic_full_stream: an Anthropic stream the client
  leaves after message_start (whose usage says 1 output token) / reads to its end;
- responses_previous_id_leave: a Responses stream continuing a stored conversation
  (previous_response_id; the provider bills its context as input), left after
  response.created;
- leave_before_headers: a non-streamed request left before the answer begins;
- baseline: an ordinary request.
"""
from __future__ import annotations

import argparse
import http.client
import json
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.envoy_config import EnvoyOptions, TierRoute, Upstream, render  # noqa: E402
from tests.support.procs import EnvoyProcess, SidecarProcess, free_port, workdir  # noqa: E402

LOOP = "127.0.0.1"
POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01, max_output_tokens: 16384}
defaults:
  limits: {rpm: 100000, tpm: 100000000}
  budget: {usd: 1000, period: month}
backend: {kind: memory, state_file: ""}
"""
P_IN, P_OUT = 2500, 10_000  # nano-USD per token
USAGE = (1000, 4000)  # what each finished generation bills


class BillingUpstream:
    """The provider: bills each request it finishes, answers JSON with its usage."""

    def __init__(self) -> None:
        self.billed: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __enter__(self) -> "BillingUpstream":
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in separate writes: with Nagle on, a kept-alive
            # connection waits ~40 ms for the peer's delayed ACK before the body
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                inp, out = (int(x) for x in self.headers.get(
                    "x-fake-usage", "%d,%d" % USAGE).split(","))
                if self.headers.get("x-fake-format") == "anthropic":
                    self._anthropic_stream(inp, out)
                    return
                if self.headers.get("x-fake-format") == "responses":
                    self._responses_stream(inp, out)
                    return
                time.sleep(int(self.headers.get("x-fake-delay-ms", "0")) / 1000)
                with up.lock:  # generated: billed, whoever is still listening
                    up.billed.append((inp, out))
                doc = {"id": "c", "object": "chat.completion", "model": "gpt-4o",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "ok"}}],
                       "usage": {"prompt_tokens": inp, "completion_tokens": out,
                                 "total_tokens": inp + out}, "len": len(raw)}
                data = json.dumps(doc).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def _anthropic_stream(self, inp: int, out: int) -> None:
                """message_start (its usage: the input and 1 output token), the text
                after x-fake-delay-ms, then message_delta with the whole output."""
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

                def event(name: str, doc: dict) -> None:
                    data = f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                try:
                    event("message_start", {"type": "message_start", "message": {
                        "id": "msg", "model": "gpt-4o", "usage": {
                            "input_tokens": inp, "output_tokens": 1}}})
                except OSError:
                    return
                time.sleep(int(self.headers.get("x-fake-delay-ms", "0")) / 1000)
                with up.lock:  # generated: billed, whoever is still listening
                    up.billed.append((inp, out))
                try:
                    event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta",
                                                            "text": "long text"}})
                    event("message_delta", {"type": "message_delta", "delta": {
                        "stop_reason": "end_turn"}, "usage": {"output_tokens": out}})
                    event("message_stop", {"type": "message_stop"})
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass

            def _responses_stream(self, inp: int, out: int) -> None:
                """response.created (usage null), the rest after x-fake-delay-ms: the
                input billed is x-fake-usage's, e.g. a previous_response_id's context."""
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

                def event(name: str, doc: dict) -> None:
                    data = f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                try:
                    event("response.created", {"type": "response.created", "response": {
                        "model": "gpt-4o", "status": "in_progress", "usage": None}})
                except OSError:
                    return
                time.sleep(int(self.headers.get("x-fake-delay-ms", "0")) / 1000)
                with up.lock:
                    up.billed.append((inp, out))
                try:
                    event("response.completed", {"type": "response.completed", "response": {
                        "model": "gpt-4o", "status": "completed", "usage": {
                            "input_tokens": inp, "output_tokens": out}}})
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass

        self.server = ThreadingHTTPServer((LOOP, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def __exit__(self, *exc) -> None:
        self.server.shutdown()

    def bill_nano(self) -> int:
        with self.lock:
            return sum(i * P_IN + o * P_OUT for i, o in self.billed)


def post(port: int, headers: dict, body: Optional[dict] = None, timeout: float = 20):
    data = json.dumps(body or {"model": "gpt-4o", "max_tokens": 4000, "messages": [
        {"role": "user", "content": "Write a long essay."}]}).encode()
    conn = http.client.HTTPConnection(LOOP, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", data,
                     {"content-type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def leave_after(port: int, headers: dict, marker: bytes, path: str = "/v1/messages",
                doc: Optional[dict] = None) -> int:
    """Send a streamed request, read until ``marker`` arrives, then leave: the status."""
    body = json.dumps(doc or {"model": "gpt-4o", "max_tokens": 4000, "stream": True,
                              "messages": [{"role": "user",
                                            "content": "Write a long essay."}]}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    req = (f"POST {path} HTTP/1.1\r\nhost: llm\r\ncontent-type: application/json\r\n"
           f"{head}content-length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((LOOP, port), timeout=10) as sock:
        sock.sendall(req)
        got = b""
        while marker not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return int(got.split(b" ", 2)[1]) if got else 0


def spend_nano(sc: SidecarProcess, tenant: str) -> int:
    sc.wait_usage_delivered()
    time.sleep(0.5)
    models = sc.spend().get(tenant, {})
    return sum(m.get("cost_nano_usd", round(m.get("usd", 0) * 1e9)) for m in models.values())


PROBES: dict[str, dict] = {
    # a forged per-request upstream timeout: Envoy answers 504 while the provider finishes
    "rq_timeout_header": {"x-fake-delay-ms": "600", "x-envoy-upstream-rq-timeout-ms": "100"},
    "rq_timeout_header_xff_internal": {"x-fake-delay-ms": "600",
                                       "x-envoy-upstream-rq-timeout-ms": "100",
                                       "x-forwarded-for": "10.1.2.3"},
    "rq_timeout_header_xff_external": {"x-fake-delay-ms": "600",
                                       "x-envoy-upstream-rq-timeout-ms": "100",
                                       "x-forwarded-for": "203.0.113.9"},
    # a forged retry policy: a 200 retried, each try generated and billed
    "retry_on_200": {"x-envoy-retry-on": "retriable-status-codes",
                     "x-envoy-retriable-status-codes": "200", "x-envoy-max-retries": "4"},
    # a forged per-try timeout with retries: every try billed, the client gets a 504
    "per_try_timeout_retries": {"x-fake-delay-ms": "400",
                                "x-envoy-upstream-rq-per-try-timeout-ms": "100",
                                "x-envoy-retry-on": "5xx,reset",
                                "x-envoy-max-retries": "4"},
    # an Anthropic stream left after message_start, whose usage says 1 output token
    "anthropic_leave_after_start": {"x-fake-format": "anthropic", "x-fake-delay-ms": "500"},
    "anthropic_full_stream": {"x-fake-format": "anthropic"},
    # a Responses stream continuing a stored conversation (the provider bills its 50,000
    # tokens of context as input), left after response.created
    "responses_previous_id_leave": {"x-fake-format": "responses", "x-fake-delay-ms": "500",
                                    "x-fake-usage": "50000,200"},
    # a non-streamed request the client leaves before the provider's answer begins
    "leave_before_headers": {"x-fake-delay-ms": "600"},
    "baseline": {},
}
# probes whose client leaves once the reply holds these bytes
LEAVING = {"anthropic_leave_after_start": b"message_start",
           "responses_previous_id_leave": b"response.created",
           "anthropic_full_stream": b"0\r\n\r\n"}


def run(names: list[str], upstream_timeout_s: float) -> dict:
    out: dict = {}
    with workdir("kt-redteam-") as d, BillingUpstream() as up:
        (d / "policy.yaml").write_text(POLICY)
        with SidecarProcess(d / "policy.yaml", d) as sc:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"{LOOP}:{sc.grpc_port}",
                                upstream_timeout_s=upstream_timeout_s,
                                tiers=[TierRoute("default", "gpt-4o",
                                                 [Upstream(LOOP, up.port)])])
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                for name in names:
                    tenant = f"t-{name}-{secrets.token_hex(2)}"
                    bill0, n0 = up.bill_nano(), len(up.billed)
                    statuses = []
                    for _ in range(3):
                        headers = {"x-tenant-id": tenant, **PROBES[name]}
                        if name == "leave_before_headers":
                            try:
                                statuses.append(post(envoy.listen_port, headers, timeout=0.2)[0])
                            except OSError:
                                statuses.append(0)
                            continue
                        if name in LEAVING:
                            doc, path = None, "/v1/messages"
                            if name == "responses_previous_id_leave":
                                path, doc = "/v1/responses", {
                                    "model": "gpt-4o", "stream": True, "input": "Go on.",
                                    "previous_response_id": "resp_stored_50k_tokens",
                                    "max_output_tokens": 200}
                            statuses.append(leave_after(envoy.listen_port, headers,
                                                        LEAVING[name], path, doc))
                            continue
                        status, _ = post(envoy.listen_port, headers)
                        statuses.append(status)
                    time.sleep(1.0)  # the upstream finishes what it was given
                    spend = spend_nano(sc, tenant)
                    bill = up.bill_nano() - bill0
                    out[name] = {"statuses": statuses, "billed_generations":
                                 len(up.billed) - n0, "bill_usd": bill / 1e9,
                                 "spend_usd": spend / 1e9,
                                 "spend_of_bill": round(spend / bill, 3) if bill else None}
                    print(name, out[name], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(PROBES))
    ap.add_argument("--upstream-timeout", type=float, default=300.0,
                    help="EnvoyOptions.upstream_timeout_s (kt envoy-config's default: 300)")
    args = ap.parse_args()
    print(json.dumps(run(args.only.split(","), args.upstream_timeout), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
