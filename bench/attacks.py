"""The red-team attacks of issue 12, measured: run before and after a change, compare.

  python bench/attacks.py [--only estimate,replay,books,deep_json,labels,slowloris,trickle,
                                 unmetered,underscores,gzip,stream_no_usage,responses_large,
                                 reply_memory,stats_names]
                          [--connections 6000] [--trickle 2000] [--reports 20000]
                          [--replies 120] [--json FILE]

Every attack runs against a real `kt serve` process (embedded backend) and, where the
attack goes through the gateway, a real Envoy configured by `kt envoy-config`'s own
renderer, with fake OpenAI-compatible upstreams (tests/support). It works against the
code before the fix (one side port, no admin token) and after it (a separate admin port
with a bearer token): it reads which ports the sidecar reports in its ready file.

What each attack prints:
- estimate:  30 requests with `x-kt-estimated-tokens: 0` and max_tokens 100000 (alone a
             413 for a tpm 20000 tenant): how many were admitted.
- replay:    25 requests reusing one x-request-id, estimate header 1, each really using
             10,000 tokens: tokens charged to the tenant's budget (should be 250,000).
- books:     anonymous POST /v1/usage (1e9 tokens for acme) and GET /v1/spend on every
             HTTP port the sidecar serves: statuses, and whether acme's budget moved.
- deep_json: a 4 KB body nested 1,000 levels: the fast path's statuses, the gRPC
             Check's codes, and through Envoy (failure mode allow, tenant rpm exhausted)
             how many reached the upstream; sidecar log lines added.
- labels:    20,000 usage reports with distinct model names: /metrics size, lines,
             scrape time.
- slowloris: 6,000 connections trickling a request head on the side port(s): sidecar
             threads and RSS, decisions slower than 200 ms meanwhile (fast path probe
             every 10 ms), whether /metrics still answers.
- trickle:   2,000 connections trickling one byte a second to the fast path: how many
             the sidecar has not closed after twice its idle timeout + 10 s.
- charge:    usage made unreadable by the client (issue 20), each row its own tenant on
             its own policy (CHARGE_POLICY): spend (`GET /v1/spend`) against the bill (what
             the upstream would report, priced by the policy), or the status where the
             attack is to get admitted. Rows: a stream without include_usage nor max_tokens;
             the same with n 8; a client leaving before the usage chunk; a Responses
             request with 17 KB of instructions, streamed without usage; a 1 MB prompt
             sent chunked (no content-length) to a tpm 20,000 tenant.

The edge: what a client sends past the decision, through Envoy. "bill" is what
the upstream reported (x-fake-usage), priced by the policy; "spend" is GET /v1/spend.
- unmetered:       POST /v1/batches, GET /v1/files, POST /v1/fine_tuning/jobs: statuses,
                   and which reached the provider carrying the operator's API key.
- underscores:     x_kt_tier / x_kt_priority: which header names reached the upstream.
- gzip:            10 chat requests with Accept-Encoding: gzip: spend / bill.
- stream_no_usage: 10 `"stream": true` chat requests without stream_options, no
                   max_tokens: spend / bill.
- responses_large: 5 streamed /v1/responses with 26 KB of output (the final event's line
                   over the filter's 16 KiB): spend / bill.
- reply_memory:    120 concurrent 3.9 MB JSON replies: Envoy's RSS idle and at its peak.
- stats_names:     a model name with an ANSI escape and a newline, then `kt events stats`:
                   the rows it printed, and whether raw control characters reached them.

The admission queue's attacks build their own stack (tests/support/flood.py: Valkey or
the embedded backend, a queue policy, the Envoy config `kt envoy-config --config` prints):
- queue_flood: three rpm-60 low-priority tenants on 1,100 keep-alive connections for
             --flood-seconds (queue max_wait_ms 2000, max_size 1000), 20 high-priority
             requests in the middle; per backend: answers by status, decisions by the
             failure mode (fail_open: admitted unmetered), allowed, shed (overloaded),
             Envoy's breaker overflows to the sidecar, high-priority admitted of 20.
- queue_spam: embedded backend, queue max_size 100, max_wait_ms 12000; a high-priority
             tenant at rpm 120 empties its bucket (120 requests at once, nothing else
             going on), then sends 20 at once (they need waits of 0.5 s after each
             other, 10 s for the last), alone
             and while one low-priority tenant spams on --spam-connections: the 20's
             admitted, and the queue's rejections by reason.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.envoy_config import EnvoyOptions, TierRoute, Upstream, render  # noqa: E402
from tests.support.procs import (EnvoyProcess, SidecarProcess, free_port,  # noqa: E402
                                 workdir)
from tests.support.flood import flood_stack, run_flood  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

LOOP = "127.0.0.1"
POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01}
  gpt-4o-mini: {input: 0.00015, output: 0.0006}
defaults:
  limits: {rpm: 100000, tpm: 20000}
tenants:
  acme:
    limits: {rpm: 100000, tpm: 10000000}
    budget: {tokens: 100000000, period: month}
  replayer:
    limits: {rpm: 100000, tpm: 10000000}
    budget: {tokens: 100000000, period: month}
  deep:
    limits: {rpm: 100}
  gzip: {limits: {rpm: 100000, tpm: 10000000}}
  streamer: {limits: {rpm: 100000, tpm: 10000000}}
  responses: {limits: {rpm: 100000, tpm: 10000000}}
  bulky: {limits: {rpm: 100000, tpm: 100000000}}
backend: {kind: memory, state_file: ""}
"""
PROVIDER_KEY = "sk-operator-provider-key"
# gpt-4o's price in POLICY, USD per 1K tokens
PRICE_IN, PRICE_OUT = 0.0025, 0.01


def chat(model: str = "gpt-4o", max_tokens: Optional[int] = 50) -> dict:
    body: dict = {"model": model, "messages": [{"role": "user", "content": "Say hi."}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


class Target:
    """The running sidecar (and Envoy), with whatever ports this version serves."""

    def __init__(self, d: Path, sidecar: SidecarProcess, envoy: EnvoyProcess,
                 upstream: FakeUpstream, token: str) -> None:
        self.d, self.sidecar, self.envoy, self.upstream, self.token = (
            d, sidecar, envoy, upstream, token)
        ready = json.loads(sidecar.ready.read_text())
        self.admin_port = int(ready.get("admin_port", 0))
        self.http_port = sidecar.http_port
        self.authz_port = sidecar.http_authz_port

    @property
    def pid(self) -> int:
        assert self.sidecar.proc is not None
        return self.sidecar.proc.pid

    @property
    def books_port(self) -> int:
        """Where usage reports and spend are served (the admin port once it exists)."""
        return self.admin_port or self.http_port

    def books_headers(self) -> dict:
        return {"authorization": f"Bearer {self.token}"} if self.admin_port else {}

    def log_lines(self) -> int:
        return len(self.sidecar.log.read_text(errors="replace").splitlines())

    def proc_status(self) -> dict:
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("Threads", "VmRSS"):
                out[k] = int(v.split()[0])
        return {"threads": out["Threads"], "rss_mb": round(out["VmRSS"] / 1024, 1)}


def request(port: int, method: str, path: str, body: Optional[bytes] = None,
            headers: Optional[dict] = None, timeout: float = 10.0
            ) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(LOOP, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def via_envoy(t: Target, tenant: str, body: dict, headers: Optional[dict] = None
              ) -> tuple[int, dict, bytes]:
    h = {"content-type": "application/json", "x-tenant-id": tenant}
    h.update(headers or {})
    return request(t.envoy.listen_port, "POST", "/v1/chat/completions",
                   json.dumps(body).encode(), h)


def budget_remaining(t: Target, tenant: str) -> int:
    """The tenant's budget left, read by a probe that charges nothing: its upstream
    fails (503, no usage), so its reservation is refunded before the reply ends."""
    _, headers, _ = via_envoy(t, tenant, chat(max_tokens=1), {"x-fake-status": "503"})
    time.sleep(0.2)
    return int(headers["x-kt-budget-remaining"])


@contextlib.contextmanager
def target(policy: str = POLICY) -> Iterator[Target]:
    token = secrets.token_hex(16)
    with workdir("kt-attacks-") as d, FakeUpstream("default") as up:
        (d / "policy.yaml").write_text(policy)
        (d / "admin.token").write_text(token + "\n")
        (d / "provider.key").write_text(PROVIDER_KEY)
        help_text = subprocess.run([sys.executable, "-m", "sidecar.cli", "serve", "--help"],
                                   capture_output=True, text=True).stdout
        extra = ["--http-authz", f"{LOOP}:0"]
        if "--admin-token-file" in help_text:
            extra += ["--admin", f"{LOOP}:0", "--admin-token-file", str(d / "admin.token")]
        with SidecarProcess(d / "policy.yaml", d, tuple(extra)) as sc:
            admin, listen = free_port(), free_port()
            opts = EnvoyOptions(listen_port=listen, admin_port=admin,
                                sidecar_address=f"{LOOP}:{sc.grpc_port}", mode="authz",
                                failure_mode="allow",
                                tiers=[TierRoute("default", "gpt-4o", [Upstream(
                                    LOOP, up.port, api_key_file=str(d / "provider.key"))]),
                                       TierRoute("compact", "gpt-4o-mini", up.address)])
            with EnvoyProcess(render(opts), d, admin, listen) as envoy:
                yield Target(d, sc, envoy, up, token)


# --- the attacks -------------------------------------------------------------
def attack_estimate(t: Target, _args) -> dict:
    admitted = 0
    for _ in range(30):
        status, _, _ = via_envoy(t, "t-estimate", chat(max_tokens=100000),
                                 {"x-kt-estimated-tokens": "0"})
        admitted += status == 200
    return {"requests": 30, "admitted": admitted}


def attack_replay(t: Target, _args) -> dict:
    before = budget_remaining(t, "replayer")
    admitted = 0
    for _ in range(25):
        status, _, _ = via_envoy(t, "replayer", chat(max_tokens=None), {
            "x-request-id": "replayed-id", "x-kt-estimated-tokens": "1",
            "x-fake-usage": "5000,5000"})
        admitted += status == 200
    time.sleep(0.5)
    charged = before - budget_remaining(t, "replayer")
    return {"requests": 25, "admitted": admitted, "used_tokens": admitted * 10_000,
            "charged_tokens": charged}


def attack_books(t: Target, _args) -> dict:
    out: dict = {}
    report = json.dumps({"request_id": f"forged-{secrets.token_hex(4)}", "tenant": "acme",
                         "input_tokens": 1_000_000_000, "output_tokens": 0}).encode()
    ports = {"http": t.http_port}
    if t.admin_port:
        ports["admin"] = t.admin_port
    before = budget_remaining(t, "acme")
    for name, port in ports.items():
        status, _, _ = request(port, "POST", "/v1/usage", report,
                               {"content-type": "application/json"})
        out[f"{name}_post_usage_anonymous"] = status
        status, _, _ = request(port, "GET", "/v1/spend")
        out[f"{name}_get_spend_anonymous"] = status
        if name == "admin":
            status, _, _ = request(port, "GET", "/v1/spend",
                                   headers={"authorization": "Bearer wrong"})
            out["admin_get_spend_wrong_token"] = status
    out["acme_budget_charged_by_anonymous_reports"] = before - budget_remaining(t, "acme")
    return out


def deep_body(levels: int = 1000) -> bytes:
    inner = b"[" * levels + b"]" * levels
    return b'{"model":"gpt-4o","max_tokens":10,"messages":' + inner + b'}'


def attack_deep_json(t: Target, _args) -> dict:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    body = deep_body()
    out: dict = {"body_bytes": len(body)}
    lines = t.log_lines()
    statuses: dict[int, int] = {}
    for _ in range(100):
        status, _, _ = request(t.authz_port, "POST", "/v1/chat/completions", body,
                               {"x-tenant-id": "deep-http", "content-type": "application/json"})
        statuses[status] = statuses.get(status, 0) + 1
    out["fast_path_statuses"] = statuses
    codes: dict[str, int] = {}
    with grpc.insecure_channel(f"{LOOP}:{t.sidecar.grpc_port}") as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        req = external_auth_pb2.CheckRequest()
        req.attributes.request.http.headers["x-tenant-id"] = "deep-grpc"
        req.attributes.request.http.raw_body = body
        for _ in range(100):
            try:
                resp = stub.Check(req, timeout=5)
                key = f"OK/http {resp.denied_response.status.code or 200}"
            except grpc.RpcError as exc:
                key = exc.code().name
            codes[key] = codes.get(key, 0) + 1
    out["grpc_check_codes"] = codes
    # through Envoy, failure mode allow: a tenant with rpm 100 sends 101 deep bodies
    before = sum(r["headers"].get("x-tenant-id") == "deep" for r in t.upstream.requests)
    for _ in range(101):
        request(t.envoy.listen_port, "POST", "/v1/chat/completions", body,
                {"x-tenant-id": "deep", "content-type": "application/json"})
    out["envoy_rpm100_sent"] = 101
    out["envoy_reached_upstream"] = sum(
        r["headers"].get("x-tenant-id") == "deep" for r in t.upstream.requests) - before
    out["sidecar_log_lines_added"] = t.log_lines() - lines
    return out


def scrape(t: Target) -> tuple[int, int, float]:
    start = time.perf_counter()
    status, _, body = request(t.http_port, "GET", "/metrics", timeout=60)
    return len(body), body.count(b"\n"), time.perf_counter() - start


def attack_labels(t: Target, args) -> dict:
    before = scrape(t)
    headers = {"content-type": "application/json", **t.books_headers()}
    conn = http.client.HTTPConnection(LOOP, t.books_port, timeout=10)
    failed = 0
    for i in range(args.reports):
        body = json.dumps({"request_id": f"label-{i}", "tenant": "acme",
                           "model": f"model-{i}-{secrets.token_hex(3)}",
                           "input_tokens": 1, "output_tokens": 1}).encode()
        try:
            conn.request("POST", "/v1/usage", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            failed += resp.status != 200
            if resp.getheader("connection", "").lower() == "close" or resp.version == 10:
                conn.close()
                conn = http.client.HTTPConnection(LOOP, t.books_port, timeout=10)
        except (OSError, http.client.HTTPException):
            failed += 1
            conn.close()
            conn = http.client.HTTPConnection(LOOP, t.books_port, timeout=10)
    conn.close()
    # through Envoy: a client picks the model, the upstream echoes it, ext_proc settles
    for i in range(300):
        via_envoy(t, "acme", chat(model=f"client-model-{i}"))
    time.sleep(0.5)
    after = scrape(t)
    return {"reports": args.reports, "reports_refused": failed,
            "metrics_bytes_before": before[0], "metrics_lines_before": before[1],
            "metrics_bytes_after": after[0], "metrics_lines_after": after[1],
            "scrape_s_after": round(after[2], 3)}


class DecisionProbe:
    """A decision every 10 ms on the fast path (one keep-alive connection), timed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        body = json.dumps(chat(max_tokens=1)).encode()
        self._req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: kt\r\nx-tenant-id: probe\r\n"
                     b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                     % len(body)) + body

    def _run(self) -> None:
        sock: Optional[socket.socket] = None
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                if sock is None:
                    sock = socket.create_connection((LOOP, self.port), timeout=5)
                sock.sendall(self._req)
                got = b""
                while b"\r\n\r\n" not in got:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise OSError("closed")
                    got += chunk
                self.latencies.append(time.perf_counter() - start)
            except OSError:
                self.errors += 1
                self.latencies.append(time.perf_counter() - start)
                if sock is not None:
                    sock.close()
                sock = None
            time.sleep(0.01)
        if sock is not None:
            sock.close()

    def __enter__(self) -> "DecisionProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> dict:
        lat = sorted(self.latencies) or [0.0]
        return {"decisions": len(self.latencies), "errors": self.errors,
                "over_200ms": sum(x > 0.2 for x in lat),
                "p50_ms": round(statistics.median(lat) * 1000, 2),
                "max_ms": round(lat[-1] * 1000, 1)}


def _slow_clients(port: int, n: int) -> tuple[list[socket.socket], int]:
    socks, failed = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection((LOOP, port), timeout=2)
            s.sendall(b"GET /metrics HTTP/1.1\r\nhost: kt\r\n")
            socks.append(s)
        except OSError:
            failed += 1
    return socks, failed


def _trickle(socks: list[socket.socket], line: bytes) -> int:
    """Send a byte string to every socket still open; returns how many are still open."""
    alive = 0
    for s in socks:
        try:
            s.sendall(line)
            alive += 1
        except OSError:
            pass
    return alive


def _open_count(socks: list[socket.socket]) -> int:
    """Sockets the server has not closed (a closed one reads EOF or fails)."""
    n = 0
    for s in socks:
        try:
            s.setblocking(False)
            data = s.recv(65536)
            if data:  # an answer (e.g. 408/503) then close: count as closed if EOF follows
                continue
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def attack_slowloris(t: Target, args) -> dict:
    out: dict = {"idle": t.proc_status()}
    ports = {"http": t.http_port}
    if t.admin_port:
        ports["admin"] = t.admin_port
    for name, port in ports.items():
        with DecisionProbe(t.authz_port) as probe:
            socks, failed = _slow_clients(port, args.connections)
            res: dict = {"connections": args.connections, "connect_failed": failed}
            res["during"] = t.proc_status()
            for _ in range(6):  # 30 s of trickling, a header line every 5 s
                time.sleep(5)
                res["still_open"] = _trickle(socks, b"x-slow: 1\r\n")
                res["during"] = max(res["during"], t.proc_status(), key=lambda s: s["threads"])
            start = time.perf_counter()
            try:
                status = request(t.http_port, "GET", "/metrics", timeout=10)[0]
            except OSError as exc:
                status = repr(exc)
            res["metrics_scrape_during"] = {"status": status,
                                            "seconds": round(time.perf_counter() - start, 3)}
            for s in socks:
                s.close()
        res["decisions_meanwhile"] = probe.summary()
        out[name] = res
        time.sleep(2)
    out["after"] = t.proc_status()
    return out


def attack_trickle(t: Target, args) -> dict:
    from sidecar.transports import http_authz

    idle = getattr(http_authz, "IDLE_TIMEOUT_S", 30.0)
    socks: list[socket.socket] = []
    failed = 0
    with DecisionProbe(t.authz_port) as probe:
        for _ in range(args.trickle):
            try:
                socks.append(socket.create_connection((LOOP, t.authz_port), timeout=2))
            except OSError:
                failed += 1
        head = b"POST /v1/chat/completions HTTP/1.1\r\nx-tenant-id: trickle\r\n" + b"x" * 4000
        # the timer closes a connection without a whole request in an interval: within
        # two intervals of its last one (the code before the fix: never, bytes re-armed it)
        wait = 2 * idle + 10
        deadline = time.monotonic() + wait
        i = 0
        while time.monotonic() < deadline:
            _trickle(socks, head[i:i + 1])
            i += 1
            time.sleep(1)
        still_open = _open_count(socks)
    for s in socks:
        s.close()
    return {"connections": args.trickle, "connect_failed": failed,
            "idle_timeout_s": idle, "waited_s": round(wait, 1),
            "still_open": still_open, "decisions_meanwhile": probe.summary(),
            "sidecar": t.proc_status()}


# --- charge: usage the client makes unreadable (issue 20) ---------------------------
def _has_bound() -> bool:
    """Whether this version charges unreadable usage at a bound (and knows the policy's
    max_output_tokens): the policy below must load on the code before it too."""
    return (ROOT / "sidecar" / "bound.py").exists()


CHARGE_PRICES = {"gpt-4o": (2500, 10_000), "gpt-4o-mini": (150, 600)}  # nano-USD per token
CHARGE_POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: gpt-4o-mini}
pricing:
  gpt-4o: {input: 0.0025, output: 0.01%(max_out)s}
  gpt-4o-mini: {input: 0.00015, output: 0.0006%(max_out)s}
defaults:  # a USD budget: before the bound, a kept estimate was spend only with one
  limits: {rpm: 100000, tpm: 100000000}
  budget: {usd: 1000, period: month}
tenants:
  small:
    limits: {rpm: 100000, tpm: 20000}
backend: {kind: memory, state_file: ""}
"""
CHARGE_OUTPUT = 1500  # output tokens the upstream bills each choice


def _spend_usd(t: Target, tenant: str) -> float:
    _, _, body = request(t.books_port, "GET", "/v1/spend", headers=t.books_headers())
    models = json.loads(body)["tenants"].get(tenant, {})
    return sum(m.get("usd", 0.0) for m in models.values())


def _bill_usd(inp: int, out: int) -> float:
    p_in, p_out = CHARGE_PRICES["gpt-4o"]
    return (inp * p_in + out * p_out) / 1e9


def _spend_row(t: Target, tenant: str, status: int, inp: int, out: int) -> dict:
    time.sleep(1.0)  # the access log's flush and the settlement
    spend, bill = _spend_usd(t, tenant), _bill_usd(inp, out)
    return {"status": status, "spend_usd": round(spend, 6), "bill_usd": round(bill, 6),
            "spend_over_bill": round(spend / bill, 4) if bill else None}


def _stream_body(**fields) -> dict:
    body = {"model": "gpt-4o", "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story. " * 20}]}
    body.update(fields)
    return body


def _unread_stream(t: Target, tenant: str, body: dict, path: str, choices: int) -> dict:
    """A streamed request whose reply carries no usage; the upstream bills the body's
    size as input (4 bytes a token) and CHARGE_OUTPUT per choice."""
    data = json.dumps(body).encode()
    inp, out = -(-len(data) // 4), CHARGE_OUTPUT * choices
    t.upstream.release_stream.set()  # the whole stream at once
    status, _, _ = request(t.envoy.listen_port, "POST", path, data, {
        "content-type": "application/json", "x-tenant-id": tenant,
        "x-fake-usage": f"{inp},{out}"})
    return _spend_row(t, tenant, status, inp, out)


def charge_stream_without_usage(t: Target) -> dict:
    return _unread_stream(t, "c-stream", _stream_body(), "/v1/chat/completions", 1)


def charge_stream_n8(t: Target) -> dict:
    return _unread_stream(t, "c-n8", _stream_body(n=8), "/v1/chat/completions", 8)


def charge_responses_instructions(t: Target) -> dict:
    body = {"model": "gpt-4o", "stream": True, "input": "Summarise.",
            "instructions": "Follow these rules. " * 850}  # 17 KB
    return _unread_stream(t, "c-instructions", body, "/v1/responses", 1)


def charge_leave_before_usage(t: Target) -> dict:
    """include_usage asked, but the client leaves after the first chunk: the upstream
    finishes (and bills) the reply, whose usage chunk never reaches a reader."""
    tenant = "c-leave"
    data = json.dumps(_stream_body(stream_options={"include_usage": True})).encode()
    inp = -(-len(data) // 4)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nx-tenant-id: %s\r\n"
            b"x-fake-usage: %d,%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % (tenant.encode(), inp, CHARGE_OUTPUT, len(data)))
    t.upstream.release_stream.clear()
    try:
        with socket.create_connection((LOOP, t.envoy.listen_port), timeout=10) as sock:
            sock.sendall(head + data)
            received = b""
            while b'"first"' not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        t.upstream.release_stream.set()
    return _spend_row(t, tenant, int(received.split(b" ", 2)[1]), inp, CHARGE_OUTPUT)


def charge_chunked_prompt(t: Target) -> dict:
    """A 1 MB prompt with transfer-encoding: chunked, for a tpm 20,000 tenant: admitted
    (200) means it went past its TPM; 411 is the refusal."""
    data = json.dumps({"model": "gpt-4o", "max_tokens": 10, "messages": [
        {"role": "user", "content": "w" * 1_000_000}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nconnection: close\r\n"
            b"x-tenant-id: small\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 16384]), data[i:i + 16384])
                      for i in range(0, len(data), 16384))
    with socket.create_connection((LOOP, t.envoy.listen_port), timeout=30) as sock:
        sock.sendall(head + pieces + b"0\r\n\r\n")
        received = sock.recv(65536)
    return {"status": int(received.split(b" ", 2)[1]), "prompt_tokens": len(data) // 4,
            "tenant_tpm": 20000}


CHARGE_ROWS = {"stream_without_usage": charge_stream_without_usage,
               "stream_n8": charge_stream_n8, "leave_before_usage": charge_leave_before_usage,
               "responses_instructions": charge_responses_instructions,
               "chunked_prompt": charge_chunked_prompt}


def attack_charge(t: Target, _args) -> dict:
    """Every row on its own sidecar and Envoy with CHARGE_POLICY (``t`` is not used)."""
    policy = CHARGE_POLICY % {"max_out": ", max_output_tokens: 16384" if _has_bound() else ""}
    out: dict = {}
    for name, row in CHARGE_ROWS.items():
        with target(policy) as ct:
            try:
                out[name] = row(ct)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next row
                out[name] = {"error": repr(exc)}
    return out


# --- the edge -----------------------------------------------------------------
def spend_of(t: Target, tenant: str) -> tuple[float, int, int]:
    """The tenant's durable spend: USD, input and output tokens (GET /v1/spend)."""
    t.sidecar.wait_usage_delivered()
    _, _, body = request(t.books_port, "GET", "/v1/spend", headers=t.books_headers())
    models = json.loads(body)["tenants"].get(tenant, {}).values()
    return (sum(m.get("usd", 0.0) for m in models), sum(m.get("input_tokens", 0) for m in models),
            sum(m.get("output_tokens", 0) for m in models))


def spend_and_bill(t: Target, tenant: str, n: int, usage: tuple[int, int]) -> dict:
    spend, tokens_in, tokens_out = spend_of(t, tenant)
    bill = n * (usage[0] * PRICE_IN + usage[1] * PRICE_OUT) / 1000
    return {"requests": n, "bill_usd": round(bill, 6), "spend_usd": round(spend, 6),
            "spend_of_bill_pct": round(100 * spend / bill, 1),
            "tokens_billed": n * sum(usage), "tokens_read": tokens_in + tokens_out}


def attack_unmetered(t: Target, _args) -> dict:
    out: dict = {}
    for method, path in (("POST", "/v1/batches"), ("GET", "/v1/files"),
                         ("POST", "/v1/fine_tuning/jobs")):
        before = len(t.upstream.requests)
        status, _, _ = request(t.envoy.listen_port, method, path,
                               json.dumps({"input_file_id": "file-1"}).encode(),
                               {"x-tenant-id": "acme", "content-type": "application/json"})
        reached = t.upstream.requests[before:]
        out[f"{method} {path}"] = {
            "status": status, "reached_provider": len(reached),
            "with_operator_key": sum(r["headers"].get("authorization") == f"Bearer {PROVIDER_KEY}"
                                     for r in reached)}
    return out


def attack_underscores(t: Target, _args) -> dict:
    _, _, body = via_envoy(t, "acme", chat(), {"x_kt_tier": "compact", "x_kt_priority": "high"})
    got = json.loads(body).get("received_headers", {})
    return {"reached_upstream": sorted(k for k in got if "_" in k)}


def attack_gzip(t: Target, _args) -> dict:
    n, usage = 10, (1000, 5000)
    for _ in range(n):
        via_envoy(t, "gzip", chat(max_tokens=None), {"accept-encoding": "gzip",
                                                     "x-fake-usage": "%d,%d" % usage})
    return spend_and_bill(t, "gzip", n, usage)


def attack_stream_no_usage(t: Target, _args) -> dict:
    t.upstream.release_stream.set()
    n, usage = 10, (1000, 5000)
    for _ in range(n):
        via_envoy(t, "streamer", {**chat(max_tokens=None), "stream": True},
                  {"x-fake-usage": "%d,%d" % usage})
    return spend_and_bill(t, "streamer", n, usage)


def attack_responses_large(t: Target, _args) -> dict:
    t.upstream.release_stream.set()
    n, usage = 5, (1000, 6500)
    for _ in range(n):
        request(t.envoy.listen_port, "POST", "/v1/responses",
                json.dumps({"model": "gpt-4o", "input": "Say hi.", "stream": True}).encode(),
                {"x-tenant-id": "responses", "content-type": "application/json",
                 "x-fake-format": "responses", "x-fake-output-bytes": "26000",
                 "x-fake-usage": "%d,%d" % usage})
    return spend_and_bill(t, "responses", n, usage)


def _envoy_memory(t: Target) -> dict:
    assert t.envoy.proc is not None
    out = {}
    for line in Path(f"/proc/{t.envoy.proc.pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


def attack_reply_memory(t: Target, args) -> dict:
    size = int(3.9 * 1024 * 1024)
    via_envoy(t, "bulky", chat(), {"x-fake-output-bytes": str(size)})  # warm
    idle = _envoy_memory(t)
    statuses: list[int] = []

    def one() -> None:
        try:
            statuses.append(via_envoy(t, "bulky", chat(), {
                "x-fake-output-bytes": str(size), "x-fake-usage": "10,1000"})[0])
        except (OSError, http.client.HTTPException):
            statuses.append(0)

    threads = [threading.Thread(target=one) for _ in range(args.replies)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    return {"replies": args.replies, "reply_mb": round(size / 2**20, 1),
            "ok": statuses.count(200), "envoy_rss_mb_idle": idle["VmRSS"],
            "envoy_rss_mb_peak": _envoy_memory(t)["VmHWM"]}


def attack_stats_names(t: Target, _args) -> dict:
    forged = "gpt-4o\x1b[8m\nmallory              gpt-4o        1"
    via_envoy(t, "acme", chat(model=forged))
    t.sidecar.wait_usage_delivered()
    time.sleep(1.0)  # the ledger's writer flushes every 0.2 s
    res = subprocess.run([sys.executable, "-m", "sidecar.cli", "events", "stats", "--dir",
                          str(t.d / "kt-state" / "events"), "--last", "1h"],
                         capture_output=True, text=True, cwd=t.d)
    lines = res.stdout.splitlines()
    return {"exit": res.returncode, "rows": len(lines),
            "forged_row": any(line.startswith("mallory") for line in lines),
            "raw_escape": "\x1b" in res.stdout}

# --- the admission queue: stacks of their own -------------------------------------
QUEUE = "max_wait_ms: 2000, max_size: %d"


def attack_queue_flood(args) -> dict:
    out: dict = {}
    for backend in ("redis", "memory"):
        with flood_stack(backend, QUEUE % 1000) as s:
            counts, vip = run_flood(s.port, ["low-a", "low-b", "low-c"], args.flood_connections,
                                    args.flood_seconds, "vip", 20, args.flood_seconds / 2)
            out[backend] = {
                "answers": counts, "failure_mode": s.failure_mode_decisions(),
                "fail_open": s.decisions("fail_open"), "allowed": s.decisions("allow"),
                "overloaded": s.decisions("overloaded"),
                "breaker_overflows": sum(s.breaker_overflows().values()),
                "vip_admitted_of_20": sum(x == 200 for x in vip)}
    return out


def _queue_rejections(s) -> dict:
    text = s.sidecar.metrics()
    return {m[0]: float(m[1]) for m in re.findall(
        r'^kt_queue_rejections_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def attack_queue_spam(args) -> dict:
    out: dict = {}
    for spam in (0, args.spam_connections):
        with flood_stack("memory", "max_wait_ms: 12000, max_size: 100",
                         vip_limits="{rpm: 120}") as s:
            # the high-priority tenant's bucket emptied first, at once, nothing else going on
            run_flood(s.port, [], 0, 0.0, "vip", 120)
            # then 20 at once while the spam goes on: they need waits of 0.5 s each after
            # the other (10 s for the last), all within max_wait_ms
            counts, vip = run_flood(s.port, ["low-a"], spam, max(args.flood_seconds, 14.0),
                                    "vip", 20, 1.0)
            out["under_spam" if spam else "alone"] = {
                "vip_admitted_of_20": sum(x == 200 for x in vip),
                "vip_answers": vip,
                "spam_answers": counts, "queue_rejections": _queue_rejections(s)}
    return out


OWN_STACK = {"queue_flood": attack_queue_flood, "queue_spam": attack_queue_spam}

ATTACKS = {"estimate": attack_estimate, "replay": attack_replay, "books": attack_books,
           "deep_json": attack_deep_json, "labels": attack_labels,
           "slowloris": attack_slowloris, "trickle": attack_trickle, "charge": attack_charge,
           "unmetered": attack_unmetered, "underscores": attack_underscores,
           "gzip": attack_gzip, "stream_no_usage": attack_stream_no_usage,
           "responses_large": attack_responses_large, "reply_memory": attack_reply_memory,
           "stats_names": attack_stats_names}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join([*ATTACKS, *OWN_STACK]))
    ap.add_argument("--connections", type=int, default=6000)
    ap.add_argument("--trickle", type=int, default=2000)
    ap.add_argument("--reports", type=int, default=20000)
    ap.add_argument("--replies", type=int, default=120)
    ap.add_argument("--flood-connections", type=int, default=1100)
    ap.add_argument("--flood-seconds", type=float, default=10.0)
    ap.add_argument("--spam-connections", type=int, default=1000)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results: dict = {"commit": commit, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name in args.only.split(","):
        if name in OWN_STACK:
            started = time.monotonic()
            try:
                results[name] = OWN_STACK[name](args)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next attack
                results[name] = {"error": repr(exc)}
            results[name]["seconds"] = round(time.monotonic() - started, 1)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
            continue
        # a fresh sidecar and Envoy per attack: no attack measures another's leftovers
        with target() as t:
            started = time.monotonic()
            try:
                results[name] = ATTACKS[name](t, args)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next attack
                results[name] = {"error": repr(exc)}
            results[name]["seconds"] = round(time.monotonic() - started, 1)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.pop("http_proxy", None)
    os.environ.pop("HTTP_PROXY", None)
    sys.exit(main())
