"""Consequences any correct limiter must satisfy, checked on both backends (the Cython
core behind the embedded backend, the Lua scripts on a real Valkey) and on the reference
model, without trusting the reference model: it once carried the same bug as the code
("a level below zero means never used", which let TPM leak after large settlements)."""
from __future__ import annotations

import asyncio
import time

import pytest

from sidecar import _core
from sidecar.backends.memory import MemoryBackend
from sidecar.backends.redis import RedisBackend
from sidecar.policy import schema
from tests.support.procs import workdir
from tests.support.valkey import Valkey

BACKENDS = ["memory", "redis"]


@pytest.fixture(scope="module")
def valkey():
    with workdir() as d, Valkey(d) as v:
        yield v


class Clock:
    def __init__(self) -> None:
        # real time: the Lua scripts' PEXPIREAT must lie in the future
        self.now = int(time.time()) * 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1_000_000)


def make_backend(kind: str, clock: Clock, valkey_url: str = ""):
    if kind == "memory":
        return MemoryBackend(clock=clock)
    return RedisBackend(schema.RedisBackend(url=valkey_url, timeout_ms=2000),
                        clock_override=clock)


@pytest.fixture(params=BACKENDS)
def backend_kind(request):
    return request.param


@pytest.fixture
def backend_url(backend_kind, request):
    return request.getfixturevalue("valkey").url if backend_kind == "redis" else ""


_tenant_seq = iter(range(10**9))


def fresh_tenant(prefix: str) -> str:
    return f"{prefix}-{next(_tenant_seq)}-{time.monotonic_ns()}"


def test_settlements_beyond_the_estimate_leave_the_token_bucket_in_debt(backend_kind,
                                                                        backend_url):
    """The issue's repro: two requests estimated at 100 tokens each use 15,000 (a usage
    report settles them), so a 20,000-token bucket is 10,000 tokens in debt. The third
    request must wait until the debt is repaid at 20,000/60 tokens per second; before the
    fix a level below zero read as "never used, so full" and it was admitted at once."""
    clock = Clock()
    backend = make_backend(backend_kind, clock, backend_url)
    lim = _core.Limits(tpm=20_000)
    tenant = fresh_tenant("tpm-debt")

    async def main():
        await backend.start()
        try:
            for i in range(2):
                out = await backend.decide(tenant, lim, 0, 0, 100, 100, False)
                assert out.admitted and out.charged_tokens == 100
                settled = await backend.settle(tenant, lim, f"r{i}", 15_000 - 100, 0, -1)
                assert settled.applied
            third = await backend.decide(tenant, lim, 0, 0, 100, 100, False)
            # 20,000 - 2 x 15,000 = -10,000: 10,100 tokens short at 1/3 token per ms
            assert (third.kind, third.reason) == (_core.DENY_RATE, _core.R_TPM)
            assert third.retry_after_s == 31  # ceil(10,100 / (20,000 / 60))
            assert third.remaining_tokens == 0 and third.charged_tokens == 0
            clock.advance(30)  # the debt is repaid (level 0), 100 tokens not yet
            early = await backend.decide(tenant, lim, 0, 0, 100, 100, False)
            assert early.kind == _core.DENY_RATE and early.retry_after_s == 1
            clock.advance(0.31)  # 0 + 0.31 s x 333.3 tokens/s > 100
            late = await backend.decide(tenant, lim, 0, 0, 100, 100, False)
            assert late.admitted
        finally:
            await backend.close()

    asyncio.run(main())
