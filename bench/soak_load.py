"""The soak's clients: a bounded, rate-limited loop of chat requests to two gateways over
raw loopback sockets (asyncio), mixed tenants, JSON and SSE, some clients leaving a stream
after its first chunk. Each request is one connection (`connection: close`), so a
restarted Envoy costs only the requests in flight at that moment."""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Optional

CHARS_PER_TOKEN = 4  # the policy's estimate.chars_per_token (the default)
REQUEST_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class TenantLoad:
    name: str
    share: float  # of the total request rate


@dataclass
class Sent:
    seq: int  # its number in the run; the provider logs it (x-soak-seq)
    at: float
    gateway: str
    tenant: str
    kind: str  # json, sse, leave
    fail: bool  # the provider was asked to fail
    prompt_tokens: int  # the sidecar's estimate of the prompt (bytes of messages / 4)
    max_tokens: int  # the firm output estimate
    status: int = 0  # 0: no answer (connection refused, reset, timeout)
    error: str = ""
    reason: str = ""  # x-kt-reason or the error type of a refusal


@dataclass
class LoadPlan:
    rate: float  # requests per second, all gateways together
    tenants: list[TenantLoad]
    gateways: dict[str, int]  # name -> Envoy listener port
    stream_share: float = 0.4
    leave_share: float = 0.05
    fail_share: float = 0.05
    cached_share: float = 0.3
    max_in_flight: int = 32
    seed: int = 7
    sent: list[Sent] = field(default_factory=list)


def build(rng: random.Random, plan: LoadPlan, seq: int, tenant: str,
          gateway: str) -> tuple[bytes, Sent]:
    """One request: its bytes and what the client expects of it."""
    prompt = "x" * rng.randrange(400, 2400)
    max_tokens = rng.randrange(50, 300)
    kind = "json"
    r = rng.random()
    if r < plan.leave_share:
        kind = "leave"
    elif r < plan.leave_share + plan.stream_share:
        kind = "sse"
    messages = [{"role": "user", "content": prompt}]
    body: dict = {"model": "gpt-4o", "messages": messages, "max_tokens": max_tokens}
    if kind != "json":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    prompt_estimate = len(json.dumps(messages).encode()) // CHARS_PER_TOKEN
    # the provider reports at most the estimate (usage above it is the documented
    # in-flight overshoot, which would loosen the TPM check)
    inp = rng.randrange(prompt_estimate // 3, prompt_estimate // 2 + 1)
    out = rng.randrange(1, max_tokens + 1)
    cached = inp // 2 if rng.random() < plan.cached_share else 0
    fail = kind != "leave" and rng.random() < plan.fail_share
    data = json.dumps(body).encode()
    headers = [("host", "llm"), ("content-type", "application/json"),
               ("content-length", str(len(data))), ("connection", "close"),
               ("x-tenant-id", tenant), ("x-soak-gateway", gateway), ("x-soak-seq", str(seq)),
               ("x-soak-usage", f"{inp},{out},{cached}")]
    if fail:
        headers.append(("x-soak-fail", "1"))
    if kind == "leave":
        headers.append(("x-soak-leave", "1"))
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + data, Sent(seq, time.time(), gateway, tenant, kind, fail,
                                      prompt_estimate, max_tokens)


async def one(port: int, request: bytes, sent: Sent) -> None:
    writer: Optional[asyncio.StreamWriter] = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT_S)
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        sent.status = int(head.split(b" ", 2)[1])
        for line in head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "x-kt-reason":
                sent.reason = v.strip()
        if sent.kind == "leave" and sent.status == 200:
            got = b""
            while b'"first"' not in got:  # the provider holds the rest until we go
                chunk = await asyncio.wait_for(reader.read(65536), REQUEST_TIMEOUT_S)
                if not chunk:
                    break
                got += chunk
            return  # leave: the connection closes in finally
        rest = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT_S)  # to EOF
        if sent.status >= 400 and not sent.reason:
            try:  # the error body, whether sent with a length or chunked
                sent.reason = json.loads(rest[rest.index(b"{"):rest.rindex(b"}") + 1]
                                         )["error"]["type"]
            except (ValueError, KeyError, TypeError):
                pass
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        sent.error = type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


async def run(plan: LoadPlan, seconds: float) -> None:
    """Send at plan.rate for ``seconds``, at most plan.max_in_flight at once (a request that
    would exceed it is skipped and counted as `skipped`, so a stall does not queue a burst)."""
    rng = random.Random(plan.seed)
    names = [t.name for t in plan.tenants]
    weights = [t.share for t in plan.tenants]
    gateways = list(plan.gateways.items())
    in_flight: set[asyncio.Task] = set()
    interval = 1.0 / plan.rate
    start = time.monotonic()
    n = 0
    while True:
        due = start + n * interval
        now = time.monotonic()
        if due - start >= seconds:
            break
        if due > now:
            await asyncio.sleep(due - now)
        n += 1
        tenant = rng.choices(names, weights)[0]
        gw, port = gateways[n % len(gateways)]
        request, sent = build(rng, plan, n, tenant, gw)
        plan.sent.append(sent)
        if len(in_flight) >= plan.max_in_flight:
            sent.error = "skipped"
            continue
        task = asyncio.create_task(one(port, request, sent))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT_S * 2)
