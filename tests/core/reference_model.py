"""The reference model of one decision: plain Python, written for clarity, not speed.

This is the *specification* that both implementations are held to:
the Cython core (``native/core.pyx``, used by the embedded backend) and the Lua
scripts (``lua/decide.lua``, used by the Redis backend). It lives in tests/ on
purpose: the package has exactly one implementation of each rule per backend,
and this file exists only to check them.

Units: time in integer microseconds since the Unix epoch (UTC); tokens are
integers; a budget is in tokens or in nano-USD (1e-9 USD), always an integer.
"""
from __future__ import annotations

import calendar
import math
from dataclasses import dataclass, field

US = 1_000_000

# Outcome kinds (same numbers in core.pyx and decide.lua)
ALLOW, DOWNGRADE, DENY_RATE, DENY_BUDGET, TOO_LARGE = 0, 1, 2, 3, 4
# Reasons: which limit decided (R_SIZE: a count beyond MAX_TOKENS)
R_NONE, R_RPM, R_TPM, R_BUDGET, R_SIZE = 0, 1, 2, 3, 4
R_PROVIDER = 5
# Periods
P_MINUTE, P_HOUR, P_DAY, P_MONTH, P_TOTAL, P_WEEK, P_WINDOW = 0, 1, 2, 3, 4, 5, 6
NO_END = 2**62
# Bounds (native/core.pyx). Python integers cannot wrap; the bounds are part of the rules
# because the implementations' int64 and doubles need them: a count beyond MAX_TOKENS is
# too large; a cost is capped at MAX_COST (above any budget); spend saturates there;
# settlement deltas are clamped to +-MAX_COST; waits are capped at MAX_WAIT_US.
MAX_TOKENS = 2**35 - 1
MAX_COST = 2**53
MAX_WAIT_US = 10**15


def add_spend(spent: int, amount: int) -> int:
    return max(0, min(MAX_COST, max(0, min(spent, MAX_COST)) + amount))


def clamp_delta(x: int) -> int:
    return max(-MAX_COST, min(MAX_COST, x))


def period_bounds(now_us: int, period: int) -> tuple[int, int]:
    """[start, end) of the UTC-aligned window holding now_us."""
    if period == P_TOTAL:
        return 0, NO_END
    if period == P_WEEK:  # from Monday 00:00 UTC
        import datetime

        day = datetime.date(1970, 1, 1) + datetime.timedelta(days=now_us // (86400 * US))
        monday = day - datetime.timedelta(days=day.weekday())
        start = calendar.timegm(monday.timetuple()) * US
        return start, start + 7 * 86400 * US
    if period in (P_MINUTE, P_HOUR, P_DAY):
        size = (60, 3600, 86400)[period] * US
        start = (now_us // size) * size
        return start, start + size
    days = now_us // (86400 * US)
    y, m = _civil_year_month(days)
    start = calendar.timegm((y, m, 1, 0, 0, 0)) * US
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return start, calendar.timegm((ny, nm, 1, 0, 0, 0)) * US


def lim_bounds(lim: "Limits", now: int, stored: int = -1) -> tuple[int, int]:
    """A budget's period: from the clock, or (P_WINDOW) the window the caller gave, and
    the next one from its end on (a clock a little past it rolls over exactly there) or
    once the state (its period start ``stored``) is in it: a window never goes back."""
    if lim.period != P_WINDOW:
        return period_bounds(now, lim.period)
    if now < lim.win_end and stored != lim.win_end:
        return lim.win_start, lim.win_end
    return lim.win_end, lim.win_next


def _civil_year_month(days: int) -> tuple[int, int]:
    import datetime

    d = datetime.date(1970, 1, 1) + datetime.timedelta(days=days)
    return d.year, d.month


@dataclass
class Limits:
    rpm: int = 0  # 0 = no request limit
    tpm: int = 0  # 0 = no token limit
    burst: float = 1.0
    budget: int = -1  # -1 = no budget
    budget_in_usd: bool = False
    period: int = P_DAY
    low_water: float = 0.0
    # per tier: (nano-USD per input token, nano-USD per output token)
    prices: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    # P_WINDOW: the window the caller computed (a time zone, an anchor) and the next's end
    win_start: int = 0
    win_end: int = 0
    win_next: int = 0

    @property
    def req_cap(self) -> float:
        return self.rpm * self.burst

    @property
    def tok_cap(self) -> float:
        return self.tpm * self.burst


@dataclass
class State:
    # +inf: never used, full at any capacity (every read clamps to the capacity). A
    # bucket in use never reaches it; any level below zero is a debt that refills.
    req_level: float = math.inf
    req_last: int = 0
    tok_level: float = math.inf
    tok_last: int = 0
    spent: int = 0
    period_start: int = -1


@dataclass
class Outcome:
    kind: int
    reason: int
    tier: int
    retry_after_s: int
    remaining_requests: int
    remaining_tokens: int
    budget_remaining: int
    charged_tokens: int
    charged_cost: int
    reset_requests_us: int = 0
    reset_tokens_us: int = 0
    budget_reset_us: int = 0
    wait_us: int = 0  # exact µs until the refusing limit has room
    provider: int = -1  # decide_routed: the candidate charged
    provider_remaining_requests: int = -1
    provider_remaining_tokens: int = -1
    cell: int = -1  # decide_path: the cell that refused, else the one that downgraded
    charges: tuple = ()  # decide_path: per cell, (cost charged, its period start)


def remaining_shown(level: float, limit: int) -> int:
    """What the headers call remaining: whole units in the bucket, in [0, limit]. A debt
    shows as 0; with burst the bucket holds up to limit x burst, and the part above the
    limit is headroom the headers do not promise (docs/contract.md)."""
    return max(0, math.floor(min(level, limit)))


def wait_us(deficit: float, rpm_like: int) -> int:
    if deficit <= 0:
        return 0
    w = deficit / (rpm_like / 60e6)
    return MAX_WAIT_US if w >= MAX_WAIT_US else math.ceil(w)


def _refill(level: float, last: int, cap: float, rpm_like: int, now: int) -> float:
    """The level now, never above the capacity in force (also when no time passed: a
    reload may have lowered it). A debt (level < 0) refills from where it is."""
    elapsed = now - last
    if elapsed > 0:
        level = level + elapsed * (rpm_like / 60e6)
    return min(cap, level)


def cost_of(lim: Limits, tier: int, input_tokens: int, output_tokens: int) -> int:
    if not lim.budget_in_usd:
        return min(MAX_COST, input_tokens + output_tokens)
    pin, pout = lim.prices[tier]
    return min(MAX_COST, input_tokens * pin + output_tokens * pout)


def decide(
    lim: Limits,
    st: State,
    now: int,
    tier: int,
    input_tokens: int,
    output_tokens: int,
    firm_tokens: int,
    commit_on_deny: bool = False,
) -> Outcome:
    """One decision. Mutates ``st`` only as the rules say (a denial holds nothing,
    unless commit_on_deny: shadow mode, where the request goes through anyway)."""
    kind, reason, retry_us = ALLOW, R_NONE, 0
    # 0. A count beyond MAX_TOKENS is too large for every tenant (counted as MAX_TOKENS).
    if max(input_tokens, output_tokens) > MAX_TOKENS:
        kind, reason = TOO_LARGE, R_SIZE
        input_tokens, output_tokens = min(input_tokens, MAX_TOKENS), min(output_tokens, MAX_TOKENS)
    # 1. Estimate trimming: the soft part (a defaulted output size) never makes a
    #    request impossible; the firm part (prompt + explicit max_tokens) may.
    tokens = input_tokens + output_tokens
    if kind == ALLOW and lim.tpm > 0 and tokens > lim.tok_cap:
        if firm_tokens > lim.tok_cap:
            kind, reason = TOO_LARGE, R_TPM
        else:
            output_tokens = max(0, int(lim.tok_cap) - input_tokens)
            tokens = input_tokens + output_tokens
    # 2. Budget: period from the clock, downgrade below low water, cost at the
    #    tier the request actually goes to.
    cost = 0
    budget_remaining = 0
    budget_end = NO_END
    if lim.budget >= 0:
        start, end = lim_bounds(lim, now, st.period_start)
        budget_end = end
        if st.period_start != start:
            st.period_start, st.spent = start, 0
        st.spent = add_spend(st.spent, 0)
        remaining = lim.budget - st.spent
        if remaining < lim.low_water * lim.budget and tier + 1 < len(lim.prices):
            tier += 1
            if kind == ALLOW:
                kind = DOWNGRADE
        cost = cost_of(lim, tier, input_tokens, output_tokens)
        budget_remaining = remaining
        if kind in (ALLOW, DOWNGRADE):
            if cost > lim.budget:
                kind, reason = TOO_LARGE, R_BUDGET
            elif cost > remaining:
                kind, reason = DENY_BUDGET, R_BUDGET
                retry_us = end - now if end != NO_END else 0
    # 3. Buckets: each limit its own state; refill is continuous.
    req_level = tok_level = 0.0
    if lim.rpm > 0:
        req_level = _refill(st.req_level, st.req_last, lim.req_cap, lim.rpm, now)
        st.req_level, st.req_last = req_level, now
    if lim.tpm > 0:
        tok_level = _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tpm, now)
        st.tok_level, st.tok_last = tok_level, now
    if kind in (ALLOW, DOWNGRADE):
        wait_req = wait_tok = 0.0
        if lim.rpm > 0 and req_level < 1.0:
            wait_req = (1.0 - req_level) / (lim.rpm / 60e6)
        if lim.tpm > 0 and tok_level < tokens:
            wait_tok = (tokens - tok_level) / (lim.tpm / 60e6)
        if wait_req > 0 or wait_tok > 0:
            kind = DENY_RATE
            reason = R_RPM if wait_req >= wait_tok else R_TPM
            retry_us = max(wait_req, wait_tok)
    # 4. Commit: only an admitted request (or any request, in shadow mode) is charged.
    charged_tokens = charged_cost = 0
    if kind in (ALLOW, DOWNGRADE) or commit_on_deny:
        if lim.rpm > 0:
            st.req_level = req_level = req_level - 1.0
        if lim.tpm > 0:
            st.tok_level = tok_level = tok_level - tokens
        if lim.budget >= 0:
            st.spent = add_spend(st.spent, cost)
            budget_remaining = lim.budget - st.spent
        charged_tokens, charged_cost = tokens, cost
    retry_after_s = 0
    retry_us = min(retry_us, MAX_WAIT_US)
    if retry_us > 0:
        retry_after_s = max(1, math.ceil(retry_us / US))
    # without a limit its remaining and reset are 0 (the limit, 0, says there is none)
    return Outcome(
        kind=kind,
        reason=reason,
        tier=tier,
        retry_after_s=retry_after_s,
        remaining_requests=remaining_shown(req_level, lim.rpm) if lim.rpm > 0 else 0,
        remaining_tokens=remaining_shown(tok_level, lim.tpm) if lim.tpm > 0 else 0,
        budget_remaining=max(0, budget_remaining) if lim.budget >= 0 else 0,
        charged_tokens=charged_tokens,
        charged_cost=charged_cost,
        reset_requests_us=wait_us(lim.rpm - req_level, lim.rpm) if lim.rpm > 0 else 0,
        reset_tokens_us=wait_us(lim.tpm - tok_level, lim.tpm) if lim.tpm > 0 else 0,
        budget_reset_us=(budget_end - now if lim.budget >= 0 and budget_end != NO_END else 0),
        wait_us=math.ceil(retry_us),
    )


def settle(lim: Limits, st: State, now: int, delta_tokens: int, delta_cost: int,
           period_start: int) -> int:
    """Reconcile actual usage with what was charged (negative delta = refund).

    The token bucket takes the token difference now (never above its capacity);
    the budget takes the cost difference in the period the charge was made, or
    in the current one when period_start < 0 (no reservation known). A refund
    never reaches into a closed period; extra usage of a request admitted in a
    closed period lands in the current one: spend is never lost.
    Returns the budget spent after it (-1 without a budget)."""
    delta_tokens, delta_cost = clamp_delta(delta_tokens), clamp_delta(delta_cost)
    if lim.tpm > 0 and delta_tokens != 0:
        level = _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tpm, now)
        st.tok_level, st.tok_last = min(lim.tok_cap, level - delta_tokens), now
    if lim.budget < 0:
        return -1
    start, _ = lim_bounds(lim, now, st.period_start)
    if st.period_start != start:
        st.period_start, st.spent = start, 0
    if period_start == start or period_start < 0:
        st.spent = add_spend(st.spent, delta_cost)
    elif delta_cost > 0:
        st.spent = add_spend(st.spent, delta_cost)
    return st.spent


MAX_PATH = 32


def decide_path(cells: list[tuple[Limits, State]], now: int, tier: int, input_tokens: int,
                output_tokens: int, firm_tokens: int, commit_on_deny: bool = False) -> Outcome:
    """One decision over a path of cells (the holder's own first, up to the root): all of
    them admit and are charged, or none is. decide()'s rules taken over every cell: the
    soft part trimmed to each token bucket in turn; one tier down if any cell's budget is
    below its low water (the first such cell named); too large if any cell can never take
    it; refused by budget at the first cell without room (retry: the longest of their
    period ends); refused by rate at the cell that must wait longest (retry: that wait).
    Header fields are the first cell's. A one-cell path is decide()."""
    if len(cells) == 1:
        o = decide(cells[0][0], cells[0][1], now, tier, input_tokens, output_tokens,
                   firm_tokens, commit_on_deny)
        if o.kind != ALLOW:
            o.cell = 0
        lim, st = cells[0]
        o.charges = ((o.charged_cost, lim_bounds(lim, now, st.period_start)[0]
                      if lim.budget >= 0 else 0),)
        return o
    assert 1 <= len(cells) <= MAX_PATH
    ntiers = len(cells[0][0].prices)
    kind, reason, cell, retry_us = ALLOW, R_NONE, -1, 0.0
    if max(input_tokens, output_tokens) > MAX_TOKENS:
        kind, reason, cell = TOO_LARGE, R_SIZE, 0
        input_tokens, output_tokens = min(input_tokens, MAX_TOKENS), min(output_tokens, MAX_TOKENS)
    tokens = input_tokens + output_tokens
    for i, (lim, _) in enumerate(cells):
        if kind == ALLOW and lim.tpm > 0 and tokens > lim.tok_cap:
            if firm_tokens > lim.tok_cap:
                kind, reason, cell = TOO_LARGE, R_TPM, i
            else:
                output_tokens = max(0, int(lim.tok_cap) - input_tokens)
                tokens = input_tokens + output_tokens
    n = len(cells)
    start, end, remaining = [0] * n, [NO_END] * n, [0] * n
    down = -1
    for i, (lim, st) in enumerate(cells):
        if lim.budget >= 0:
            start[i], end[i] = lim_bounds(lim, now, st.period_start)
            if st.period_start != start[i]:
                st.period_start, st.spent = start[i], 0
            st.spent = add_spend(st.spent, 0)
            remaining[i] = lim.budget - st.spent
            if remaining[i] < lim.low_water * lim.budget and tier + 1 < ntiers and down < 0:
                down = i
    if down >= 0:
        tier += 1
        if kind == ALLOW:
            kind, cell = DOWNGRADE, down
    cost = [cost_of(lim, tier, input_tokens, output_tokens) if lim.budget >= 0 else 0
            for lim, _ in cells]
    if kind in (ALLOW, DOWNGRADE):
        for i, (lim, _) in enumerate(cells):
            if lim.budget >= 0 and cost[i] > lim.budget:
                kind, reason, cell = TOO_LARGE, R_BUDGET, i
                break
    if kind in (ALLOW, DOWNGRADE):
        for i, (lim, _) in enumerate(cells):
            if lim.budget >= 0 and cost[i] > remaining[i]:
                if kind in (ALLOW, DOWNGRADE):
                    kind, reason, cell = DENY_BUDGET, R_BUDGET, i
                if end[i] != NO_END:
                    retry_us = max(retry_us, float(end[i] - now))
    req_level, tok_level = [0.0] * n, [0.0] * n
    for i, (lim, st) in enumerate(cells):
        if lim.rpm > 0:
            req_level[i] = _refill(st.req_level, st.req_last, lim.req_cap, lim.rpm, now)
            st.req_level, st.req_last = req_level[i], now
        if lim.tpm > 0:
            tok_level[i] = _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tpm, now)
            st.tok_level, st.tok_last = tok_level[i], now
    if kind in (ALLOW, DOWNGRADE):
        best = 0.0
        for i, (lim, _) in enumerate(cells):
            wr = (1.0 - req_level[i]) / (lim.rpm / 60e6) if lim.rpm > 0 and req_level[i] < 1.0 else 0.0
            wt = (tokens - tok_level[i]) / (lim.tpm / 60e6) if lim.tpm > 0 and tok_level[i] < tokens else 0.0
            w = max(wr, wt)
            if w > 0 and w > best:
                best, cell, reason = w, i, (R_RPM if wr >= wt else R_TPM)
        if best > 0:
            kind, retry_us = DENY_RATE, best
    admitted = kind in (ALLOW, DOWNGRADE) or commit_on_deny
    charges = []
    for i, (lim, st) in enumerate(cells):
        if admitted:
            if lim.rpm > 0:
                st.req_level = req_level[i] = req_level[i] - 1.0
            if lim.tpm > 0:
                st.tok_level = tok_level[i] = tok_level[i] - tokens
            if lim.budget >= 0:
                st.spent = add_spend(st.spent, cost[i])
                remaining[i] = lim.budget - st.spent
        charges.append((cost[i] if admitted else 0, start[i] if lim.budget >= 0 else 0))
    if kind == ALLOW:
        cell = -1
    retry_us = min(retry_us, MAX_WAIT_US)
    lim = cells[0][0]
    return Outcome(
        kind=kind, reason=reason, tier=tier,
        retry_after_s=max(1, math.ceil(retry_us / US)) if retry_us > 0 else 0,
        remaining_requests=remaining_shown(req_level[0], lim.rpm) if lim.rpm > 0 else 0,
        remaining_tokens=remaining_shown(tok_level[0], lim.tpm) if lim.tpm > 0 else 0,
        budget_remaining=max(0, remaining[0]) if lim.budget >= 0 else 0,
        charged_tokens=tokens if admitted else 0,
        charged_cost=cost[0] if admitted else 0,
        reset_requests_us=wait_us(lim.rpm - req_level[0], lim.rpm) if lim.rpm > 0 else 0,
        reset_tokens_us=wait_us(lim.tpm - tok_level[0], lim.tpm) if lim.tpm > 0 else 0,
        budget_reset_us=(end[0] - now if lim.budget >= 0 and end[0] != NO_END else 0),
        wait_us=math.ceil(retry_us), cell=cell, charges=tuple(charges))


def settle_path(cells: list[tuple[Limits, State]], now: int, delta_tokens: int,
                deltas: list[tuple[int, int]]) -> list[int]:
    """settle() on every cell of a recorded path: one token difference, each cell its own
    (cost difference, period start of its charge)."""
    assert len(deltas) == len(cells)
    return [settle(lim, st, now, delta_tokens, d, ps)
            for (lim, st), (d, ps) in zip(cells, deltas, strict=True)]


# --- provider quotas (docs/providers.md) ---------------------------------------------
PRIO_LOW, PRIO_NORMAL, PRIO_HIGH = 0, 1, 2


@dataclass
class Quota:
    rpm: int = 0  # 0 = no request limit
    tpm: int = 0  # 0 = no token limit
    rpd: int = 0  # requests per UTC day; 0 = none
    burst: float = 1.0  # share of a minute's limit one burst may take, (0, 1]
    # per priority (low, normal, high): the share of each bucket a request must leave
    floors: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def req_cap(self) -> float:
        return self.rpm * self.burst

    @property
    def tok_cap(self) -> float:
        return self.tpm * self.burst


@dataclass
class QuotaState:
    req_level: float = math.inf  # never used: full at any capacity
    req_last: int = 0
    tok_level: float = math.inf
    tok_last: int = 0
    day_start: int = -1
    day_count: int = 0


def quota_wait(q: Quota, qs: QuotaState, now: int, prio: int, tokens: int
               ) -> tuple[float, float, float, int]:
    """(µs until the quota has room for the request at this priority — 0 now, -1 never —,
    request level, token level, day count), read at ``now``; ``qs`` is not changed.
    Room: after the charge every bucket keeps at least floors[prio] of its capacity."""
    f = q.floors[prio]
    wait, never = 0.0, False
    req_level = tok_level = 0.0
    day_count = 0
    if q.rpm > 0:
        req_level = _refill(qs.req_level, qs.req_last, q.req_cap, q.rpm, now)
        need = 1.0 + f * q.req_cap
        if need > q.req_cap:
            never = True
        elif req_level < need:
            wait = max(wait, (need - req_level) / (q.rpm / 60e6))
    if q.tpm > 0:
        tok_level = _refill(qs.tok_level, qs.tok_last, q.tok_cap, q.tpm, now)
        need = tokens + f * q.tok_cap
        if need > q.tok_cap:
            never = True
        elif tok_level < need:
            wait = max(wait, (need - tok_level) / (q.tpm / 60e6))
    if q.rpd > 0:
        start, end = period_bounds(now, P_DAY)
        day_count = qs.day_count if qs.day_start == start else 0
        if 1.0 > q.rpd * (1.0 - f):
            never = True
        elif day_count + 1 > q.rpd * (1.0 - f):
            wait = max(wait, float(end - now))
    return (-1.0 if never else wait), req_level, tok_level, day_count


def quota_charge(q: Quota, qs: QuotaState, now: int, tokens: int, req_level: float,
                 tok_level: float, day_count: int) -> None:
    if q.rpm > 0:
        qs.req_level, qs.req_last = req_level - 1.0, now
    if q.tpm > 0:
        qs.tok_level, qs.tok_last = tok_level - tokens, now
    if q.rpd > 0:
        qs.day_start, qs.day_count = period_bounds(now, P_DAY)[0], day_count + 1


def quota_take(q: Quota, qs: QuotaState, now: int, prio: int, tokens: int) -> int:
    """One provider alone (a cluster's first step): 0 charged, else µs to wait (-1 never)."""
    wait, r, t, d = quota_wait(q, qs, now, prio, tokens)
    if wait == 0.0:
        quota_charge(q, qs, now, tokens, r, t, d)
        return 0
    return -1 if wait < 0 else math.ceil(wait)


def quota_settle(q: Quota, qs: QuotaState, now: int, delta_tokens: int,
                 delta_requests: int = 0) -> None:
    """A settlement's token difference (actual minus charged), and requests given back by a
    refund (delta_requests < 0); never above capacity, the day's count never below 0."""
    if q.tpm > 0 and delta_tokens != 0:
        level = _refill(qs.tok_level, qs.tok_last, q.tok_cap, q.tpm, now) - delta_tokens
        qs.tok_level, qs.tok_last = min(q.tok_cap, level), now
    if delta_requests != 0:
        if q.rpm > 0:
            level = _refill(qs.req_level, qs.req_last, q.req_cap, q.rpm, now) - delta_requests
            qs.req_level, qs.req_last = min(q.req_cap, level), now
        if q.rpd > 0 and qs.day_start == period_bounds(now, P_DAY)[0]:
            qs.day_count = max(0, qs.day_count + delta_requests)


def _uncharge(lim: Limits, st: State, o: Outcome) -> None:
    """The exact inverse of decide()'s commit, at the same instant."""
    if lim.rpm > 0:
        st.req_level = min(lim.req_cap, st.req_level + 1.0)
    if lim.tpm > 0:
        st.tok_level = min(lim.tok_cap, st.tok_level + o.charged_tokens)
    if lim.budget >= 0:
        st.spent -= o.charged_cost


def _with_provider(o: Outcome, q: Quota, qs: QuotaState, i: int) -> Outcome:
    o.provider = i
    if q.rpm > 0:
        o.provider_remaining_requests = max(0, math.floor(qs.req_level))
    if q.tpm > 0:
        o.provider_remaining_tokens = max(0, math.floor(qs.tok_level))
    return o


def _seconds(us: float) -> int:
    return max(1, math.ceil(us / US)) if us > 0 else 0


def decide_routed(lim: Limits, st: State, now: int, tier: int, input_tokens: int,
                  output_tokens: int, firm_tokens: int, commit_on_deny: bool, prio: int,
                  spill: int, candidates: list[tuple[int, Quota, QuotaState]]) -> Outcome:
    """Tenant and one provider together, or neither (docs/providers.md, "The decision
    order"): the tenant decides (tier t by low water); the first candidate of tier t with
    room for this priority is charged; else, up to ``spill`` tiers down, the tenant's charge
    is given back and the decision made again at the lower tier with its candidates; else
    the charge is given back and the request refused by provider quota (DENY_RATE, or
    TOO_LARGE if no candidate could ever take it), without tenant fields."""
    o = decide(lim, st, now, tier, input_tokens, output_tokens, firm_tokens, commit_on_deny)
    charged = o.kind in (ALLOW, DOWNGRADE) or commit_on_deny
    if not charged:
        return o
    t0 = o.tier
    best, first = -1.0, -1
    for k in range(spill + 1):
        t = t0 + k
        if t >= len(lim.prices):
            break
        if k > 0:
            _uncharge(lim, st, o)
            charged = False
            d = decide(lim, st, now, tier + k, input_tokens, output_tokens, firm_tokens,
                       commit_on_deny)
            if not (d.kind in (ALLOW, DOWNGRADE) or commit_on_deny):
                break
            o, charged = d, True
            if o.tier != t:
                break
        for i, (ctier, q, qs) in enumerate(candidates):
            if ctier != t:
                continue
            if first < 0:
                first = i
            wait, r, tl, dc = quota_wait(q, qs, now, prio, o.charged_tokens)
            if wait == 0.0:
                quota_charge(q, qs, now, o.charged_tokens, r, tl, dc)
                if t > tier and o.kind == ALLOW:
                    o.kind = DOWNGRADE
                if k > 0 and o.kind in (ALLOW, DOWNGRADE):
                    o.reason = R_PROVIDER
                return _with_provider(o, q, qs, i)
            if wait > 0 and (best < 0 or wait < best):
                best = wait
    if charged:
        _uncharge(lim, st, o)
    if commit_on_deny and first >= 0:
        o = decide(lim, st, now, tier, input_tokens, output_tokens, firm_tokens, True)
        _, q, qs = candidates[first]
        _, r, tl, dc = quota_wait(q, qs, now, prio, o.charged_tokens)
        quota_charge(q, qs, now, o.charged_tokens, r, tl, dc)
        if o.kind in (ALLOW, DOWNGRADE):
            o.kind, o.reason = (DENY_RATE, R_PROVIDER) if best >= 0 else (TOO_LARGE, R_PROVIDER)
            o.wait_us = math.ceil(best) if best > 0 else 0
            o.retry_after_s = _seconds(best)
        return _with_provider(o, q, qs, first)
    return Outcome(kind=DENY_RATE if best >= 0 else TOO_LARGE, reason=R_PROVIDER, tier=t0,
                   retry_after_s=_seconds(best), remaining_requests=0, remaining_tokens=0,
                   budget_remaining=0, charged_tokens=0, charged_cost=0,
                   wait_us=math.ceil(best) if best > 0 else 0)
