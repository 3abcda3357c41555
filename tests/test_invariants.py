"""Consequences any correct limiter must satisfy, checked on both backends (the Cython
core behind the embedded backend, the Lua scripts on a real Valkey) and on the reference
model, without trusting the reference model: it once carried the same bug as the code
("a level below zero means never used", which let TPM leak after large settlements)."""
from __future__ import annotations

import asyncio
import time

import pytest

from sidecar import _core, contract
from sidecar.backends.memory import MemoryBackend
from sidecar.backends.redis import RedisBackend
from sidecar.estimate import estimate
from sidecar.model import CORE_KINDS, Decision, Kind, Request
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService
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


def headers_of(out: _core.Outcome, unit: str = "tokens") -> dict[str, str]:
    kind = CORE_KINDS[out.kind]
    answer = contract.answer(Decision(kind, tenant="t", tier="default", model="m",
                                      outcome=out, budget_unit=unit))
    return dict(answer.response_headers)


def test_headers_with_burst_never_show_more_remaining_than_the_limit(backend_kind, backend_url):
    """The issue's case: with burst 1.5 the headers said `limit-requests: 600` and
    `remaining-requests: 899`. Limit is the policy's RPM; remaining is clamped to it, and
    the burst (900 at once) stays admitted, unadvertised (docs/contract.md)."""
    clock = Clock()
    backend = make_backend(backend_kind, clock, backend_url)
    lim = _core.Limits(rpm=600, tpm=1000, burst=1.5)
    tenant = fresh_tenant("burst")

    async def main():
        await backend.start()
        try:
            shown = []
            for _ in range(900):  # one instant: the whole burst capacity
                out = await backend.decide(tenant, lim, 0, 0, 1, 1, False)
                assert out.admitted
                h = headers_of(out)
                shown.append(int(h[contract.H_REMAINING_REQUESTS]))
                assert h[contract.H_LIMIT_REQUESTS] == "600"
                assert 0 <= int(h[contract.H_REMAINING_TOKENS]) <= 1000
            # 899 .. 600 left show as 600, then one fewer per request down to 0
            assert shown[:300] == [600] * 300 and shown[300:] == list(range(599, -1, -1))
            refused = await backend.decide(tenant, lim, 0, 0, 1, 1, False)
            assert refused.kind == _core.DENY_RATE and refused.remaining_requests == 0
            h = headers_of(refused)
            # back at the limit (600 in the bucket) after a minute at 10 per second
            assert h[contract.H_RESET_REQUESTS] == "1m0s"
        finally:
            await backend.close()

    asyncio.run(main())


def test_the_contract_clamps_whatever_an_outcome_says():
    # an Outcome as a backend could build it from a reply: remaining above the limit,
    # below zero, and a budget remaining above the budget
    out = _core.Outcome(_core.ALLOW, 0, 0, 0, 600, 899, 0, 1000, -5, 0, 100, 250, 0, 1, 0)
    h = headers_of(out)
    assert h[contract.H_REMAINING_REQUESTS] == "600"
    assert h[contract.H_REMAINING_TOKENS] == "0"
    assert h[contract.H_BUDGET_REMAINING] == "100"


def test_a_tenant_without_a_budget_exports_no_budget_series():
    """The issue's false alarm: `kt_budget_remaining{unit=""} 0` for a tenant without a
    budget fired every low-budget alert."""
    policy = parse_policy(b"""
tiers: [{name: default, model: m}]
tenants:
  nobudget: {limits: {rpm: 10}}
  withbudget: {limits: {tpm: 1000}, budget: {tokens: 500, period: day}}
""", "<test>")
    clock = Clock()
    svc = DecisionService(policy, MemoryBackend(clock=clock))

    async def main():
        for tenant in ("nobudget", "withbudget"):
            d = await svc.decide(Request(headers={"x-tenant-id": tenant}, tokens=100))
            assert d.kind is Kind.ALLOW

    asyncio.run(main())
    samples = [(m.name, s.labels, s.value) for m in svc.metrics.registry.collect()
               for s in m.samples if m.name in ("kt_budget_remaining", "kt_tokens_remaining")]
    assert ("kt_budget_remaining", {"tenant": "withbudget", "unit": "tokens"}, 400.0) in samples
    assert not [s for s in samples if s[1]["tenant"] == "nobudget"]


USD_POLICY = b"""
tiers: [{name: default, model: gpt-4o}]
pricing: {gpt-4o: {input: 0.0025, output: 0.01}}
tenants:
  acme: {budget: {usd: 50, period: month}}
"""


@pytest.mark.parametrize("length", ["20000000000000000", "9" * 40, "  20000000000000000 "])
def test_a_huge_content_length_is_too_large_and_never_wraps_the_budget(backend_kind, backend_url,
                                                                       length):
    """The issue's case: a partial body whose content-length claims 2e16 bytes was
    estimated at 5e15 tokens; tokens x price wrapped negative in the core and a $50
    budget showed $5,946,744,123 remaining. The estimate is capped one past the core's
    MAX_TOKENS, so the request is refused as too large (413) and charges nothing."""
    text = USD_POLICY
    if backend_kind == "redis":
        text += f"backend: {{kind: redis, url: '{backend_url}', timeout_ms: 2000}}\n".encode()
    policy = parse_policy(text, "<test>")
    clock = Clock()
    svc = DecisionService(policy, make_backend(backend_kind, clock, backend_url))
    tenant = fresh_tenant("acme")
    svc.policy.tenants[tenant] = svc.policy.tenants["acme"]

    async def main():
        await svc.backend.start()
        try:
            huge = await svc.decide(Request(headers={"x-tenant-id": tenant,
                                                     "content-length": length},
                                            body=b'{"model": "gpt-4o", "messages": [{"con',
                                            body_truncated=True))
            small = await svc.decide(Request(headers={"x-tenant-id": tenant},
                                             body=b'{"model": "gpt-4o", "max_tokens": 100}'))
            return huge, small
        finally:
            await svc.backend.close()

    huge, small = asyncio.run(main())
    assert huge.kind is Kind.TOO_LARGE and huge.outcome.reason == _core.R_SIZE
    answer = contract.answer(huge)
    assert answer.status == 413 and b"request_too_large" in answer.body
    assert huge.outcome.charged_cost == 0 and huge.outcome.budget_remaining == 50_000_000_000
    # nothing was charged: the next request sees the whole $50 less its own cost
    assert small.kind is Kind.ALLOW and small.outcome.charged_cost == 100 * 10_000
    assert small.outcome.budget_remaining == 50_000_000_000 - 1_000_000


def test_content_length_at_the_cap_is_counted_and_beyond_it_too_large():
    policy = parse_policy(b"tiers: [{name: default, model: m}]\n", "<test>")
    cap_bytes = _core.MAX_TOKENS * 4  # chars_per_token 4: exactly MAX_TOKENS tokens

    def tokens(length: str) -> int:
        return estimate(policy, Request(headers={"content-length": length}, body=b"{",
                                        body_truncated=True)).input_tokens

    assert tokens(str(cap_bytes)) == _core.MAX_TOKENS
    assert tokens(str(cap_bytes + 1)) == _core.MAX_TOKENS + 1  # refused by the core (R_SIZE)
    assert tokens("2" + "0" * 16) == _core.MAX_TOKENS + 1
    assert tokens("١٢٣") == 1  # not ASCII digits: sized from what arrived, never a crash
    assert tokens("-5") == 1 and tokens("") == 1
