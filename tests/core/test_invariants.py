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
from sidecar.ledger.spend import SpendRecord
from sidecar.estimate import LengthRequired, estimate
from sidecar.model import CORE_KINDS, Decision, Kind, Request
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService
from sidecar.policy import schema
from tests.support.clock import ManualClock

# the Lua scripts run on the module's Valkey (conftest's ``valkey``, asked for by name)
REDIS = pytest.param("redis", marks=pytest.mark.valkey)
BACKENDS = ["memory", REDIS]


def make_backend(kind: str, clock: ManualClock, valkey_url: str = ""):
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
    clock = ManualClock()
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
    clock = ManualClock()
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
estimate: {trusted: true}  # the count of 100 below comes from a trusted filter
""", "<test>")
    clock = ManualClock()
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
    # the burn-rate alert's inputs (docs/prometheus/alerts.yaml, BudgetBurnRateHigh): the
    # period's budget and its end, as a Unix time, only for a tenant with a budget
    ends = {}
    for m in svc.metrics.registry.collect():
        for s in m.samples:
            if m.name in ("kt_budget_limit", "kt_budget_period_end_timestamp_seconds"):
                assert s.labels["tenant"] == "withbudget", s
                ends[m.name] = s.value
    assert ends["kt_budget_limit"] == 500.0
    day_end_us = (clock.now // 86_400_000_000 + 1) * 86_400_000_000
    expected = time.time() + (day_end_us - clock.now) / 1e6  # the day's end, on the wall clock
    assert abs(ends["kt_budget_period_end_timestamp_seconds"] - expected) < 5


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
    clock = ManualClock()
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
    # nothing was charged: the next request sees the whole $50 less its own cost (its
    # 38-byte body is 10 input tokens, and 100 output)
    assert small.kind is Kind.ALLOW and small.outcome.charged_cost == 10 * 2_500 + 100 * 10_000
    assert small.outcome.budget_remaining == 50_000_000_000 - 1_025_000


def test_content_length_at_the_cap_is_counted_and_beyond_it_too_large():
    policy = parse_policy(b"tiers: [{name: default, model: m}]\n", "<test>")
    cap_bytes = _core.MAX_TOKENS * 4  # chars_per_token 4: exactly MAX_TOKENS tokens

    def tokens(length: str) -> int:
        return estimate(policy, Request(headers={"content-length": length}, body=b"{",
                                        body_truncated=True)).input_tokens

    assert tokens(str(cap_bytes)) == _core.MAX_TOKENS
    assert tokens(str(cap_bytes + 1)) == _core.MAX_TOKENS + 1  # refused by the core (R_SIZE)
    assert tokens("2" + "0" * 16) == _core.MAX_TOKENS + 1
    for bad in ("١٢٣", "-5", ""):  # not ASCII digits: as good as none, never a crash
        with pytest.raises(LengthRequired):
            tokens(bad)


# --- the invariant suite -----------------------------------------------------------------
# A random program of decisions, settlements (above and below the estimate, repeated,
# late: after a period boundary), refunds, clock advances and policy reloads that change
# the limits runs on one implementation; its recorded history is then checked against
# consequences any correct limiter must satisfy. The checks use only the history (what
# the implementation answered) and the limits: never the reference model, which runs
# here as a third implementation under the same checks.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

from tests.core import reference_model as ref  # noqa: E402

MINUTE_US = 60_000_000
EPS = 1e-6


class ModelBackend:
    """The reference model behind the backend interface: per-tenant state, settlement
    idempotent per request id (as both backends are)."""

    name = "model"

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.states: dict[str, ref.State] = {}
        self.settled: set[tuple[str, str]] = set()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @staticmethod
    def _lim(lim: _core.Limits) -> ref.Limits:
        return ref.Limits(rpm=lim.rpm, tpm=lim.tpm, burst=lim.burst, budget=lim.budget,
                          budget_in_usd=lim.budget_in_usd, period=lim.period,
                          low_water=lim.low_water, prices=list(lim.prices))

    async def decide(self, tenant, lim, tier, inp, out, firm, shadow):
        st = self.states.setdefault(tenant, ref.State())
        now = self.clock()
        o = ref.decide(self._lim(lim), st, now, tier, inp, out, firm, shadow)
        start = ref.period_bounds(now, lim.period)[0] if lim.budget >= 0 else 0
        return _core.Outcome(o.kind, o.reason, o.tier, o.retry_after_s, lim.rpm,
                             o.remaining_requests, o.reset_requests_us, lim.tpm,
                             o.remaining_tokens, o.reset_tokens_us, lim.budget,
                             o.budget_remaining, o.budget_reset_us, o.charged_tokens,
                             o.charged_cost, start)

    async def settle(self, tenant, lim, request_id, d_tokens, d_cost, period_start,
                     spend=None):
        from sidecar.backends.base import Settlement

        st = self.states.setdefault(tenant, ref.State())
        if (tenant, request_id) in self.settled:
            return Settlement(applied=False, budget_spent=st.spent)
        self.settled.add((tenant, request_id))
        spent = ref.settle(self._lim(lim), st, self.clock(), d_tokens, d_cost, period_start)
        return Settlement(applied=True, budget_spent=spent)


IMPLEMENTATIONS = ["memory", REDIS, "model"]


def limit_variants(draw) -> list[_core.Limits]:
    """Two to three limits one tenant moves between (policy reloads): the same budget
    period, anything else may change."""
    in_usd = draw(hs.booleans())
    period = draw(hs.sampled_from([_core.P_MINUTE, _core.P_HOUR, _core.P_TOTAL]))
    out = []
    for _ in range(draw(hs.integers(1, 3))):
        budget = draw(hs.sampled_from([-1, 0, 500, 3000, 20_000]))
        prices = ((draw(hs.sampled_from([0, 3, 10])), draw(hs.sampled_from([1, 7, 20]))),
                  (1, 2))
        out.append(_core.Limits(
            rpm=draw(hs.sampled_from([0, 2, 5, 30])),
            tpm=draw(hs.sampled_from([0, 300, 1000, 6000])),
            burst=draw(hs.sampled_from([1.0, 1.5, 3.0])),
            budget=budget * (50 if in_usd else 1) if budget > 0 else budget,
            budget_in_usd=in_usd, period=period,
            low_water=draw(hs.sampled_from([0.0, 0.25, 0.5])), prices=prices))
    return out


OPS = hs.one_of(
    hs.tuples(hs.just("advance"), hs.sampled_from([0, 1, 250_000, 2_000_000, 20_000_000,
                                                   61_000_000, 3_600_000_000])),
    hs.tuples(hs.just("decide"), hs.integers(0, 1), hs.integers(0, 400), hs.integers(0, 400),
              hs.booleans()),
    # settle the n-th admitted request at a multiple of its estimate (0 = a refund)
    hs.tuples(hs.just("settle"), hs.integers(0, 30),
              hs.sampled_from([0.0, 0.5, 1.0, 1.5, 4.0, 10.0, 40.0])),
    hs.tuples(hs.just("repeat"), hs.integers(0, 30)),  # a report sent again
    hs.tuples(hs.just("reload"), hs.integers(0, 2)),
)


@hs.composite
def programs(draw):
    return limit_variants(draw), draw(hs.lists(OPS, min_size=8, max_size=45))


def run_program(backend, clock: ManualClock, tenant: str, variants, ops) -> list[dict]:
    """Runs ``ops`` and returns the history: one record per event, with what the
    implementation answered and the limits in force."""
    history: list[dict] = []
    admitted: list[dict] = []  # requests that may be settled
    lim = variants[0]

    async def main():
        nonlocal lim
        await backend.start()
        try:
            for op in ops:
                if op[0] == "advance":
                    clock.now += op[1]
                elif op[0] == "reload":
                    lim = variants[op[1] % len(variants)]
                elif op[0] == "decide":
                    _, tier, inp, out, firm = op
                    tier = min(tier, lim.ntiers - 1)
                    o = await backend.decide(tenant, lim, tier, inp, out,
                                             inp + (out if firm else 0), False)
                    rec = {"t": clock.now, "op": "decide", "lim": lim, "asked": tier, "out": o}
                    history.append(rec)
                    if o.admitted:
                        admitted.append(rec)
                        rec["id"] = f"r{len(admitted)}"
                elif op[0] in ("settle", "repeat") and admitted:
                    rec = admitted[op[1] % len(admitted)]
                    o = rec["out"]
                    if op[0] == "settle":
                        actual = int(o.charged_tokens * op[2])
                    elif "actual" in rec:
                        actual = rec["actual"]
                    else:
                        continue
                    rec.setdefault("actual", actual)
                    actual = rec["actual"]  # a repeated id always carries its first report
                    pout = rec["lim"].prices[o.tier][1]
                    cost = actual * pout if rec["lim"].budget_in_usd else actual
                    d_tokens, d_cost = actual - o.charged_tokens, cost - o.charged_cost
                    # the usage, as the service records it (all output tokens here)
                    spend = SpendRecord("m", 1, 0, actual, 0, 0, actual * pout)
                    s = await backend.settle(tenant, lim, rec["id"], d_tokens, d_cost,
                                             o.period_start_us, spend)
                    history.append({"t": clock.now, "op": "settle", "lim": lim,
                                    "d_tokens": d_tokens, "d_cost": d_cost,
                                    "charge_period": o.period_start_us, "applied": s.applied,
                                    "spent": s.budget_spent, "cost": cost})
        finally:
            await backend.close()

    asyncio.run(main())
    return history


def check_buckets(history: list[dict]) -> None:
    """Tokens admitted plus settled over any interval <= the most the bucket can have given
    (capacity + tpm x minutes) plus the in-flight overshoot: usage settled above its
    estimate after the interval's last admission (docs/contract.md); requests likewise
    against rpm (no overshoot: nothing settles requests). With the limits in force changing,
    the largest capacity and rate of the interval bound it."""
    n = len(history)
    for i in range(n):
        used_tokens = 0.0
        used_requests = 0
        cap_t = cap_r = rate_t = rate_r = 0.0
        overshoot = 0.0
        limited_t = limited_r = True
        for j in range(i, n):
            e = history[j]
            lim = e["lim"]
            limited_t &= lim.tpm > 0
            limited_r &= lim.rpm > 0
            cap_t, rate_t = max(cap_t, lim.tok_cap), max(rate_t, lim.tok_rate)
            cap_r, rate_r = max(cap_r, lim.req_cap), max(rate_r, lim.req_rate)
            if e["op"] == "decide" and e["out"].admitted:
                used_tokens += e["out"].charged_tokens
                used_requests += 1
                overshoot = 0.0  # the bucket covered everything up to this admission
            elif e["op"] == "settle" and e["applied"]:
                used_tokens += e["d_tokens"]
                overshoot += max(0, e["d_tokens"])
            span = e["t"] - history[i]["t"]
            if limited_t:
                bound = cap_t + rate_t * span + overshoot
                assert used_tokens <= bound * (1 + EPS) + EPS, (
                    f"TPM: {used_tokens} tokens admitted+settled in events {i}..{j} "
                    f"({span} us), more than capacity {cap_t} + refill {rate_t * span:.1f} + "
                    f"in-flight overshoot {overshoot}")
            if limited_r:
                bound = cap_r + rate_r * span
                assert used_requests <= bound * (1 + EPS) + EPS, (
                    f"RPM: {used_requests} requests admitted in events {i}..{j} ({span} us), "
                    f"more than capacity {cap_r} + refill {rate_r * span:.2f}")


def check_budget(history: list[dict], spent_now) -> None:
    """Spend = settled usage + open reservations of the current period, rebuilt from the
    history alone (charges at admission, applied settlement differences: a refund never
    reaches into a closed period, extra usage of a closed period's request lands in the
    current one); it never goes backwards within a period except by a refund; and a
    downgrade happens exactly when the remaining budget is below low water."""
    expected: dict[int, int] = {}  # period start -> spend
    last_reported: dict[int, int] = {}
    for e in history:
        lim = e["lim"]
        if lim.budget < 0:
            continue
        start = _core.period_bounds(e["t"], lim.period)[0]
        spent_before = expected.get(start, 0)
        if e["op"] == "decide":
            o = e["out"]
            remaining = lim.budget - spent_before
            below = remaining < lim.low_water * lim.budget
            want_tier = e["asked"] + 1 if below and e["asked"] + 1 < lim.ntiers else e["asked"]
            assert o.tier == want_tier, (
                f"downgrade: tier {o.tier} for asked {e['asked']} with {remaining} of "
                f"{lim.budget} left and low water {lim.low_water}")
            assert o.period_start_us == start
            if o.admitted:
                expected[start] = spent_before + o.charged_cost
            assert lim.budget - expected.get(start, 0) == o.budget_remaining or (
                expected.get(start, 0) > lim.budget and o.budget_remaining == 0)
        elif e["applied"]:
            if e["charge_period"] == start:
                expected[start] = max(0, spent_before + e["d_cost"])
            elif e["d_cost"] > 0:
                expected[start] = spent_before + e["d_cost"]
            assert e["spent"] == expected.get(start, 0), (
                f"spend {e['spent']} after a settlement, the history says "
                f"{expected.get(start, 0)}")
            if e["d_cost"] >= 0:
                assert e["spent"] >= last_reported.get(start, 0), "spend went backwards"
            last_reported[start] = e["spent"]
    if history and history[-1]["lim"].budget >= 0:
        last = history[-1]
        start = _core.period_bounds(last["t"], last["lim"].period)[0]
        assert spent_now() == expected.get(start, 0)


def check_held(history: list[dict], held_now: dict[int, int]) -> None:
    """The held part of the durable spend (docs/ledger.md, "Held") is, per budget period,
    exactly what admitted requests were charged and their settlements have not replaced:
    held when charged under a budget, released (the usage's cost less the correction) by
    an applied settlement under one. With the settled cells, what every budget holds."""
    expected: dict[int, int] = {}
    for e in history:
        if e["lim"].budget < 0:
            continue
        if e["op"] == "decide" and e["out"].admitted and e["out"].charged_cost:
            ps = e["out"].period_start_us
            expected[ps] = expected.get(ps, 0) + e["out"].charged_cost
        elif e["op"] == "settle" and e["applied"] and e["charge_period"] >= 0:
            ps = e["charge_period"]
            expected[ps] = expected.get(ps, 0) - (e["cost"] - e["d_cost"])
    assert {ps: v for ps, v in expected.items() if v} == held_now


def held_now(kind, backend, tenant) -> dict[int, int]:
    if kind == "memory":
        return dict(backend.held.get(tenant, {}))
    import redis as redis_client

    r = redis_client.Redis.from_url(backend.cfg.url)
    try:
        fields = r.hgetall(backend.spend_key(tenant))
    finally:
        r.close()
    return {int(k[2:]): int(v) for k, v in fields.items() if k.startswith(b"h|")}


def check_headers(history: list[dict]) -> None:
    """Remaining values in the headers (through contract.answer) and the Outcome are never
    above their limit and never negative."""
    for e in history:
        if e["op"] != "decide":
            continue
        o = e["out"]
        for remaining, limit in ((o.remaining_requests, o.limit_requests),
                                 (o.remaining_tokens, o.limit_tokens),
                                 (o.budget_remaining, max(o.budget_limit, 0))):
            assert 0 <= remaining <= limit, (remaining, limit, o)
        h = headers_of(o, "usd" if e["lim"].budget_in_usd else "tokens")
        for lim_h, rem_h in ((contract.H_LIMIT_REQUESTS, contract.H_REMAINING_REQUESTS),
                             (contract.H_LIMIT_TOKENS, contract.H_REMAINING_TOKENS)):
            if lim_h in h:
                assert 0 <= int(h[rem_h]) <= int(h[lim_h]), (h, o)
        if contract.H_BUDGET_REMAINING in h:
            value = float(h[contract.H_BUDGET_REMAINING])
            scale = 1e9 if e["lim"].budget_in_usd else 1
            assert 0 <= value <= o.budget_limit / scale + 1e-9


def current_spent(kind, backend, tenant, lim, now):
    """The spend of the period holding ``now`` (0 when the stored one is older)."""
    if kind in ("memory", "model"):
        st = backend.states.get(tenant)
        if st is None or st.period_start != _core.period_bounds(now, lim.period)[0]:
            return 0
        return st.spent
    import redis as redis_client

    r = redis_client.Redis.from_url(backend.cfg.url)
    try:
        ps, s = r.hmget(backend.keys(tenant)[2], "ps", "s")
    finally:
        r.close()
    if ps is None or int(ps) != _core.period_bounds(now, lim.period)[0]:
        return 0
    return int(s)


# CI time: the memory backend and the model are fast; Lua pays a Valkey round trip per event
EXAMPLES = {"memory": 300, "model": 300, "redis": 150}


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_invariants_hold_on_every_implementation(kind, request):
    url = request.getfixturevalue("valkey").url if kind == "redis" else ""

    @settings(max_examples=EXAMPLES[kind], deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(programs())
    def run(program):
        variants, ops = program
        clock = ManualClock()
        backend = (ModelBackend(clock) if kind == "model"
                   else make_backend(kind, clock, url))
        tenant = fresh_tenant("inv")
        history = run_program(backend, clock, tenant, variants, ops)
        check_buckets(history)
        check_headers(history)
        last_lim = history[-1]["lim"] if history else variants[0]
        check_budget(history, lambda: current_spent(kind, backend, tenant, last_lim,
                                                    history[-1]["t"]))
        if kind != "model":  # the held part is the backends' bookkeeping, beside the rules
            check_held(history, held_now(kind, backend, tenant))

    run()


# --- provider quotas (docs/providers.md): the same consequences on both backends ----------
import math  # noqa: E402

from hypothesis import strategies as hst  # noqa: E402

from sidecar.backends.base import Candidate  # noqa: E402
from tests.core.test_provider_invariants import check_capacity, history  # noqa: E402


# the fixtures only name the backend and its URL: the same for every example
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hst.sampled_from([3, 10, 60]), hst.sampled_from([500, 5000]),
       hst.sampled_from([0.0, 0.2, 0.5]), history)
def test_a_provider_never_admits_more_than_its_capacity_on_either_backend(
        backend_kind, backend_url, rpm, tpm, high_share, steps):
    """Through the backends' own decide_routed and settle_provider (the Cython core, and
    lua/routed.lua + provider_settle.lua on a real Valkey): over every interval, what a
    provider admits stays within its capacity plus its refill plus what was given back, and
    a normal or low request never leaves a bucket below its floor."""
    clock = ManualClock()
    backend = make_backend(backend_kind, clock, backend_url)
    quota = _core.Quota(rpm=rpm, tpm=tpm, floors=(high_share, high_share, 0.0))
    provider = fresh_tenant("prov")
    cands = [Candidate(0, provider, quota)]
    lim = _core.Limits()

    async def main():
        await backend.start()
        req_events, tok_events, open_charges = [], [], []
        try:
            for i, (gap, prio, tokens, action, delta) in enumerate(steps):
                clock.now += gap
                if action == "decide":
                    o = await backend.decide_routed(fresh_tenant("t"), lim, 0, tokens, 0, tokens,
                                                    False, prio, 0, cands)
                    if o.admitted:
                        req_events.append((clock.now, 1.0, 0.0, True))
                        tok_events.append((clock.now, float(o.charged_tokens), 0.0, True))
                        open_charges.append(o.charged_tokens)
                        # never below the floor of its priority (remaining is the level
                        # rounded down: at least the floor rounded down)
                        floor = quota.floors[prio]
                        assert o.provider_remaining_requests >= math.floor(floor * quota.req_cap)
                        assert o.provider_remaining_tokens >= math.floor(floor * quota.tok_cap)
                elif open_charges:
                    charged = open_charges.pop(0)
                    if action == "settle":
                        d = max(delta, -charged)
                        assert await backend.settle_provider(provider, quota, f"s{i}", d)
                        tok_events.append((clock.now, max(d, 0), max(-d, 0), False))
                    else:
                        assert await backend.settle_provider(provider, quota, f"r{i}",
                                                             -charged, -1)
                        req_events.append((clock.now, 0.0, 1.0, False))
                        tok_events.append((clock.now, 0.0, float(charged), False))
        finally:
            await backend.close()
        return req_events, tok_events

    req_events, tok_events = asyncio.run(main())
    check_capacity(req_events, quota.req_cap, rpm / 60e6)
    check_capacity(tok_events, quota.tok_cap, tpm / 60e6)


# --- the held part across a day and a budget period (docs/ledger.md, "Held") ---------------
@pytest.mark.parametrize("period", [_core.P_TOTAL, _core.P_DAY])
def test_an_estimate_held_on_one_day_and_settled_on_the_next(backend_kind, backend_url, period):
    """A request decided a second before UTC midnight and settled two seconds later. Its
    estimate is held under the budget period it was charged to and leaves it at the
    settlement (no residue on either day); its usage is settled spend of the new day. A
    `total` budget then holds exactly settled + held; a daily one starts the new day with
    only the usage beyond the estimate (the closed day keeps the estimate: a refund never
    reaches a closed period), the held part of neither day keeping anything."""
    from tests.support.clock import T0_US

    day_us = 86_400_000_000
    clock = ManualClock((T0_US // day_us + 1) * day_us - 1_000_000)
    backend = make_backend(backend_kind, clock, backend_url)
    lim = _core.Limits(tpm=10**9, budget=10**12, budget_in_usd=True, period=period,
                       prices=((2500, 10000),))
    tenant = fresh_tenant("held-midnight")
    actual = 100 * 2500 + 80 * 10000

    async def main():
        await backend.start()
        try:
            out = await backend.decide(tenant, lim, 0, 100, 50, 150, False)
            held_before = held_now(backend_kind, backend, tenant)
            clock.advance(2)
            s = await backend.settle(tenant, lim, "r1", 30, actual - out.charged_cost,
                                     out.period_start_us,
                                     SpendRecord("gpt-4o", 1, 100, 80, 0, 0, actual))
            cells = await backend.spend_cells()
            return out, held_before, s, cells
        finally:
            await backend.close()

    out, held_before, s, cells = asyncio.run(main())
    assert out.admitted and held_before == {out.period_start_us: 100 * 2500 + 50 * 10000}
    assert s.applied and held_now(backend_kind, backend, tenant) == {}
    mine = [c for c in cells if c.tenant == tenant]
    assert [(c.day, c.counts[5]) for c in mine] == [(clock.now // day_us, actual)]
    spent = current_spent(backend_kind, backend, tenant, lim, clock.now)
    assert spent == (actual if period == _core.P_TOTAL else actual - out.charged_cost)
