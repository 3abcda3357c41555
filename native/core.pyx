# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""kt-sidecar decision core: token buckets, budget periods, low-water tier choice.

The only in-process implementation of these rules. ``lua/decide.lua`` mirrors
it for the Redis backend; ``tests/core/reference_model.py`` is the specification
both are tested against. Pure computation: the clock comes in as ``now_us``
(integer microseconds since the Unix epoch, UTC), nothing here does I/O.

Units: tokens are integers; a budget is in tokens or nano-USD (1e-9 USD).

Bounds (docs/contract.md, "Bounds"): every quantity is bounded where it enters, so no
product or sum below can wrap int64, and the Lua scripts, whose numbers are doubles,
compute the same values exactly (every integer they handle stays at or below 2^53):
a token count per request above MAX_TOKENS is refused as too large (R_SIZE); a cost is
at most MAX_TOKENS x MAX_PRICE x 2 < 2^63 before it is capped at MAX_COST (2^53, more
than any budget: such a request is too large); spend saturates at MAX_COST; waits are
capped at MAX_WAIT_US. Limits() refuses anything outside its bounds.
"""
from libc.math cimport floor, ceil, INFINITY
from cpython.mem cimport PyMem_Malloc, PyMem_Free

cdef extern from *:
    ctypedef long long int64 "long long"

# Outcome kinds; same numbers in lua/decide.lua and sidecar/model.py
ALLOW = 0
DOWNGRADE = 1
DENY_RATE = 2
DENY_BUDGET = 3
TOO_LARGE = 4
# Which limit decided
R_NONE = 0
R_RPM = 1
R_TPM = 2
R_BUDGET = 3
R_SIZE = 4  # a token count beyond MAX_TOKENS: larger than anything the sidecar counts
R_PROVIDER = 5  # a provider's quota (docs/providers.md)
cdef int _R_PROVIDER = 5
# Budget periods
P_MINUTE = 0
P_HOUR = 1
P_DAY = 2
P_MONTH = 3
P_TOTAL = 4
P_WEEK = 5  # UTC weeks from Monday 00:00
# a calendar window given from outside (a time zone, a billing anchor: docs/budgets.md):
# Limits.set_window(start, end, next_end), computed in Python with zoneinfo
P_WINDOW = 6
# the most cells one decision's path may hold (decide_path): a holder's windows and model
# cells times its depth
MAX_PATH = 32

cdef int64 US = 1000000
cdef int64 DAY_US = 86400000000
# "no end" for a `total` period; far beyond any clock, well inside int64 and
# exactly representable as a double (Lua numbers are doubles).
cdef int64 NO_END = 4611686018427387904
NO_END_US = NO_END

# Bounds (see the module docstring). 2^35 tokens x 1e8 nano-USD x 2 < 2^63.
cdef int64 MAX_TOKENS_C = 34359738367          # 2^35 - 1 tokens per count of one request
cdef int64 MAX_RATE_C = 1000000000000          # rpm, tpm: 1e12 (x burst 1000 < 2^53)
cdef double MAX_BURST_C = 1000.0
cdef int64 MAX_PRICE_C = 100000000             # nano-USD per token: $100 per 1K tokens
cdef int64 MAX_COST_C = 9007199254740992       # 2^53: budgets below it, costs and spend capped at it
cdef double MAX_WAIT_US_C = 1e15               # retry-after and reset: ~31.7 years at most
MAX_TOKENS = MAX_TOKENS_C
MAX_RATE = MAX_RATE_C
MAX_BURST = MAX_BURST_C
MAX_PRICE = MAX_PRICE_C
MAX_COST = MAX_COST_C
MAX_BUDGET = MAX_COST_C - 1
MAX_WAIT_US = <int64>MAX_WAIT_US_C

cdef int64 _days_from_civil(int64 y, int64 m, int64 d) noexcept nogil:
    # Howard Hinnant's days_from_civil: proleptic Gregorian date -> days since 1970-01-01
    cdef int64 era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468

cdef void _year_month(int64 days, int64* y_out, int64* m_out) noexcept nogil:
    # Inverse of _days_from_civil, keeping only year and month.
    cdef int64 z = days + 719468
    cdef int64 era = (z if z >= 0 else z - 146096) // 146097
    cdef int64 doe = z - era * 146097
    cdef int64 yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64 y = yoe + era * 400
    cdef int64 doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64 mp = (5 * doy + 2) // 153
    cdef int64 m = mp + (3 if mp < 10 else -9)
    if m <= 2:
        y += 1
    y_out[0] = y
    m_out[0] = m

cdef void _period_bounds(int64 now, int period, int64* start, int64* end) noexcept nogil:
    cdef int64 size, days, y, m
    if period == 4:  # total
        start[0] = 0
        end[0] = NO_END
        return
    if period == 3:  # calendar month, UTC
        days = now // DAY_US if now >= 0 else -((-now + DAY_US - 1) // DAY_US)
        _year_month(days, &y, &m)
        start[0] = _days_from_civil(y, m, 1) * DAY_US
        if m == 12:
            end[0] = _days_from_civil(y + 1, 1, 1) * DAY_US
        else:
            end[0] = _days_from_civil(y, m + 1, 1) * DAY_US
        return
    if period == 5:  # week from Monday 00:00 UTC (1970-01-01 was a Thursday)
        days = now // DAY_US if now >= 0 else -((-now + DAY_US - 1) // DAY_US)
        days -= (days + 3) % 7
        start[0] = days * DAY_US
        end[0] = start[0] + 7 * DAY_US
        return
    if period == 0:
        size = 60 * US
    elif period == 1:
        size = 3600 * US
    else:
        size = DAY_US
    start[0] = (now // size) * size
    end[0] = start[0] + size


def period_bounds(int64 now_us, int period):
    """[start, end) in microseconds of the UTC-aligned window that holds now_us."""
    cdef int64 s, e
    if period < 0 or period > 5:
        raise ValueError("a period from the clock: 0..5 (P_WINDOW's come from Limits)")
    _period_bounds(now_us, period, &s, &e)
    return s, e


cdef class Limits:
    """One tenant's compiled limits. rpm/tpm 0 = unlimited (the policy refuses an
    explicit 0, which would read as "nothing" to a person); budget -1 = none (0 is a
    budget of nothing: every request with a cost is refused).

    prices: one (nano-USD per input token, nano-USD per output token) per tier,
    best tier first; its length is the number of tiers. Every value is checked against
    its bound (ValueError): NaN and infinities never get in.
    """
    cdef readonly int64 rpm, tpm, budget
    cdef readonly double burst, low_water, req_cap, tok_cap, req_rate, tok_rate
    cdef readonly bint budget_in_usd
    cdef readonly int period, ntiers
    # P_WINDOW: [win_start, win_end) the window the caller computed, win_next the end of
    # the one after (so a clock a little past win_end rolls over exactly there)
    cdef readonly int64 win_start, win_end, win_next
    cdef int64* _pin
    cdef int64* _pout
    cdef readonly tuple prices

    def __cinit__(self, int64 rpm=0, int64 tpm=0, double burst=1.0, int64 budget=-1,
                  bint budget_in_usd=False, int period=2, double low_water=0.0,
                  prices=((0, 0),)):
        cdef Py_ssize_t i
        if not (0 <= rpm <= MAX_RATE_C and 0 <= tpm <= MAX_RATE_C):
            raise ValueError(f"rpm and tpm must be in 0..{MAX_RATE_C}")
        # written so that NaN fails too (every comparison with NaN is false)
        if not (1.0 <= burst <= MAX_BURST_C):
            raise ValueError(f"burst must be in 1..{MAX_BURST_C:g}")
        if not (0.0 <= low_water < 1.0):
            raise ValueError("low_water must be in [0, 1)")
        if not (-1 <= budget < MAX_COST_C):
            raise ValueError(f"budget must be -1 (none) or in 0..{MAX_COST_C - 1}")
        if period < 0 or period > 6:
            raise ValueError("unknown period")
        self.prices = tuple((int(a), int(b)) for a, b in prices)
        if len(self.prices) < 1:
            raise ValueError("at least one tier")
        for a, b in self.prices:
            if not (0 <= a <= MAX_PRICE_C and 0 <= b <= MAX_PRICE_C):
                raise ValueError(f"prices must be in 0..{MAX_PRICE_C} nano-USD per token")
        self.rpm, self.tpm, self.budget = rpm, tpm, budget
        self.burst, self.low_water = burst, low_water
        self.budget_in_usd, self.period = budget_in_usd, period
        self.req_cap = rpm * burst
        self.tok_cap = tpm * burst
        self.req_rate = rpm / 60e6
        self.tok_rate = tpm / 60e6
        self.ntiers = len(self.prices)
        self._pin = <int64*>PyMem_Malloc(self.ntiers * sizeof(int64))
        self._pout = <int64*>PyMem_Malloc(self.ntiers * sizeof(int64))
        if self._pin == NULL or self._pout == NULL:
            raise MemoryError()
        for i in range(self.ntiers):
            self._pin[i] = self.prices[i][0]
            self._pout[i] = self.prices[i][1]

    def __dealloc__(self):
        PyMem_Free(self._pin)
        PyMem_Free(self._pout)

    def set_window(self, int64 start, int64 end, int64 next_end):
        """P_WINDOW: the calendar window holding the caller's clock, and the next one's end."""
        if not (0 <= start < end < next_end):
            raise ValueError("a window needs 0 <= start < end < next_end")
        self.win_start, self.win_end, self.win_next = start, end, next_end

    cdef inline int64 cost(self, int tier, int64 input_tokens, int64 output_tokens):
        # counts <= MAX_TOKENS and prices <= MAX_PRICE: the products and their sum stay
        # below 2^63; the result is capped at MAX_COST, more than any budget
        cdef int64 c
        if not self.budget_in_usd:
            c = input_tokens + output_tokens
        else:
            c = input_tokens * self._pin[tier] + output_tokens * self._pout[tier]
        return MAX_COST_C if c > MAX_COST_C else c


cdef inline void _lim_bounds(Limits lim, int64 now, int64 stored, int64* start,
                             int64* end) noexcept:
    # a budget's period: from the clock, or (P_WINDOW) the window the caller gave: the one
    # it computed, or the next from its end on, or when the state (``stored``, its period
    # start) is in the next already: a window never goes back, so a caller whose clock is
    # behind another's, near a window's end, does not start the spend again from zero
    if lim.period != 6:
        _period_bounds(now, lim.period, start, end)
    elif now < lim.win_end and stored != lim.win_end:
        start[0] = lim.win_start
        end[0] = lim.win_end
    else:
        start[0] = lim.win_end
        end[0] = lim.win_next


cdef inline int64 _add_spend(int64 spent, int64 amount):
    # amount in [-MAX_COST, MAX_COST] (callers clamp) and spent brought into [0, MAX_COST]
    # first (State.spent is writable from Python: a state file), so the sum cannot wrap;
    # spend saturates at MAX_COST (more than any budget) and never goes negative
    if spent > MAX_COST_C:
        spent = MAX_COST_C
    elif spent < 0:
        spent = 0
    spent += amount
    if spent > MAX_COST_C:
        return MAX_COST_C
    return spent if spent > 0 else 0


cdef inline int64 _clamp_delta(int64 x):
    if x > MAX_COST_C:
        return MAX_COST_C
    if x < -MAX_COST_C:
        return -MAX_COST_C
    return x


cdef class State:
    """One tenant's mutable state. period_start -1: no budget period yet (real period
    starts are >= 0: decide() refuses a clock before 1970).

    A bucket never used has level +inf: full at any capacity, because every read
    clamps a level to the capacity in force (_refill). No decision or settlement can
    produce +inf (levels only fall from, or refill up to, a finite capacity), so
    "never used" is not a value a bucket in use can reach. Any level below zero is a
    debt (a settlement larger than the estimate, or shadow mode) and refills from there.
    """
    cdef public double req_level, tok_level
    cdef public int64 req_last, tok_last, spent, period_start

    def __cinit__(self):
        self.req_level = INFINITY
        self.tok_level = INFINITY
        self.req_last = 0
        self.tok_last = 0
        self.spent = 0
        self.period_start = -1


cdef class Outcome:
    """The result of one decision; also built by the Redis backend from Lua's reply."""
    cdef readonly int kind, reason, tier
    cdef readonly int64 retry_after_s
    cdef readonly int64 limit_requests, remaining_requests, reset_requests_us
    cdef readonly int64 limit_tokens, remaining_tokens, reset_tokens_us
    cdef readonly int64 budget_limit, budget_remaining, budget_reset_us
    cdef readonly int64 charged_tokens, charged_cost
    # start of the budget period the charge went to (for settle); 0 without a budget
    cdef readonly int64 period_start_us
    # µs until the limit that refused has room (exact; retry_after_s is it in whole seconds)
    cdef readonly int64 wait_us
    # decide_routed: index of the candidate provider charged (-1: none), its buckets after
    cdef readonly int provider
    cdef readonly int64 provider_remaining_requests, provider_remaining_tokens
    # decide_path: the index of the cell that refused, else of the one that downgraded
    # (-1: none); charges: per cell, (cost charged in its unit, its period start µs), for
    # settle_path (None from decide(): the one cell is charged_cost, period_start_us)
    cdef public int cell
    cdef public tuple charges

    def __cinit__(self, *args, **kwargs):
        self.provider = -1
        self.cell = -1
        self.provider_remaining_requests = -1
        self.provider_remaining_tokens = -1

    def __init__(self, int kind, int reason, int tier, int64 retry_after_s,
                 int64 limit_requests, int64 remaining_requests, int64 reset_requests_us,
                 int64 limit_tokens, int64 remaining_tokens, int64 reset_tokens_us,
                 int64 budget_limit, int64 budget_remaining, int64 budget_reset_us,
                 int64 charged_tokens, int64 charged_cost, int64 period_start_us=0,
                 int64 wait_us=0, int provider=-1, int64 provider_remaining_requests=-1,
                 int64 provider_remaining_tokens=-1):
        self.kind, self.reason, self.tier = kind, reason, tier
        self.retry_after_s = retry_after_s
        self.limit_requests = limit_requests
        self.remaining_requests = remaining_requests
        self.reset_requests_us = reset_requests_us
        self.limit_tokens = limit_tokens
        self.remaining_tokens = remaining_tokens
        self.reset_tokens_us = reset_tokens_us
        self.budget_limit = budget_limit
        self.budget_remaining = budget_remaining
        self.budget_reset_us = budget_reset_us
        self.charged_tokens = charged_tokens
        self.charged_cost = charged_cost
        self.period_start_us = period_start_us
        self.wait_us = wait_us
        self.provider = provider
        self.provider_remaining_requests = provider_remaining_requests
        self.provider_remaining_tokens = provider_remaining_tokens

    @property
    def admitted(self):
        return self.kind == 0 or self.kind == 1

    def __repr__(self):
        return ("Outcome(kind=%d, reason=%d, tier=%d, retry_after_s=%d, remaining_requests=%d, "
                "remaining_tokens=%d, budget_remaining=%d, charged_tokens=%d, charged_cost=%d)" % (
                    self.kind, self.reason, self.tier, self.retry_after_s, self.remaining_requests,
                    self.remaining_tokens, self.budget_remaining, self.charged_tokens,
                    self.charged_cost))


cdef inline double _refill(double level, int64 last, double cap, double rate, int64 now):
    # The level now: refilled at `rate` per µs since `last`, never above `cap`. The clamp
    # applies even when no time passed: a never-used bucket (+inf) reads as full, and a
    # policy reload that lowered the capacity takes effect at once. A negative level is
    # a debt: it refills from where it is, like any other level.
    cdef int64 elapsed = now - last
    if elapsed > 0:
        level = level + elapsed * rate
    return cap if level > cap else level


cdef inline int64 _wait_us(double deficit, double rate):
    cdef double w
    if deficit <= 0.0:
        return 0
    w = deficit / rate
    # a deep debt at a low rate could exceed int64 as a double: cap before the cast
    return <int64>MAX_WAIT_US_C if w >= MAX_WAIT_US_C else <int64>ceil(w)


cdef inline int64 _remaining(double level, int64 limit):
    # What the headers call remaining: whole units in the bucket, never negative (a debt
    # shows as 0) and never above the limit shown beside it (a bucket with burst holds up
    # to limit x burst; the part above the limit is headroom the headers do not promise).
    if level <= 0.0:
        return 0
    if level >= <double>limit:
        return limit
    return <int64>floor(level)


cpdef Outcome decide(Limits lim, State st, int64 now_us, int tier, int64 input_tokens,
                     int64 output_tokens, int64 firm_tokens, bint commit_on_deny=False):
    """Decide one request and apply it to ``st``.

    tier: the tier the request asked for (0 = best). firm_tokens: the part of the
    estimate that cannot be trimmed (prompt + an explicit max_tokens); the rest of
    output_tokens is a defaulted guess, trimmed so it never makes a request
    impossible. A denied request changes nothing but the buckets' refill
    bookkeeping, unless commit_on_deny (shadow mode: it goes through anyway).
    """
    cdef int kind = 0, reason = 0
    cdef double retry_us = 0.0, wait_req = 0.0, wait_tok = 0.0
    cdef int64 tokens
    cdef int64 cost = 0, budget_remaining = 0, start = 0, end = NO_END, remaining
    cdef double req_level = 0.0, tok_level = 0.0
    cdef int64 charged_tokens = 0, charged_cost = 0
    if tier < 0 or tier >= lim.ntiers:
        raise ValueError("tier out of range")
    if now_us < 0:
        # a clock before 1970 is a caller's bug; refusing it keeps every period start >= 0,
        # so State.period_start -1 ("none yet") and settle's period_start < 0 ("not known")
        # can never be a real period
        raise ValueError("now_us must be >= 0")
    if input_tokens < 0 or output_tokens < 0 or firm_tokens < 0:
        raise ValueError("token counts must be >= 0")
    # 0. a count beyond MAX_TOKENS is larger than anything counted: too large for every
    #    tenant. It is counted as MAX_TOKENS (what shadow mode charges), so nothing below
    #    can wrap.
    if input_tokens > MAX_TOKENS_C or output_tokens > MAX_TOKENS_C:
        kind, reason = 4, 4
        if input_tokens > MAX_TOKENS_C:
            input_tokens = MAX_TOKENS_C
        if output_tokens > MAX_TOKENS_C:
            output_tokens = MAX_TOKENS_C
    tokens = input_tokens + output_tokens
    # 1. trim the soft part of the estimate
    if kind == 0 and lim.tpm > 0 and tokens > lim.tok_cap:
        if firm_tokens > lim.tok_cap:
            kind, reason = 4, 2
        else:
            output_tokens = <int64>lim.tok_cap - input_tokens
            if output_tokens < 0:
                output_tokens = 0
            tokens = input_tokens + output_tokens
    # 2. budget
    if lim.budget >= 0:
        _lim_bounds(lim, now_us, st.period_start, &start, &end)
        if st.period_start != start:
            st.period_start = start
            st.spent = 0
        st.spent = _add_spend(st.spent, 0)  # into [0, MAX_COST]: no subtraction can wrap
        remaining = lim.budget - st.spent
        if remaining < lim.low_water * lim.budget and tier + 1 < lim.ntiers:
            tier += 1
            if kind == 0:
                kind = 1
        cost = lim.cost(tier, input_tokens, output_tokens)
        budget_remaining = remaining
        if kind <= 1:
            if cost > lim.budget:
                kind, reason = 4, 3
            elif cost > remaining:
                kind, reason = 3, 3
                if end != NO_END:
                    retry_us = <double>(end - now_us)
    # 3. buckets
    if lim.rpm > 0:
        req_level = _refill(st.req_level, st.req_last, lim.req_cap, lim.req_rate, now_us)
        st.req_level = req_level
        st.req_last = now_us
    if lim.tpm > 0:
        tok_level = _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tok_rate, now_us)
        st.tok_level = tok_level
        st.tok_last = now_us
    if kind <= 1:
        if lim.rpm > 0 and req_level < 1.0:
            wait_req = (1.0 - req_level) / lim.req_rate
        if lim.tpm > 0 and tok_level < tokens:
            wait_tok = (tokens - tok_level) / lim.tok_rate
        if wait_req > 0.0 or wait_tok > 0.0:
            kind = 2
            if wait_req >= wait_tok:
                reason, retry_us = 1, wait_req
            else:
                reason, retry_us = 2, wait_tok
    # 4. commit
    if kind <= 1 or commit_on_deny:
        if lim.rpm > 0:
            req_level -= 1.0
            st.req_level = req_level
        if lim.tpm > 0:
            tok_level -= tokens
            st.tok_level = tok_level
        if lim.budget >= 0:
            st.spent = _add_spend(st.spent, cost)
            budget_remaining = lim.budget - st.spent
        charged_tokens, charged_cost = tokens, cost
    if retry_us > MAX_WAIT_US_C:
        retry_us = MAX_WAIT_US_C
    cdef int64 retry_after_s = _seconds(retry_us)
    # fields set directly: no Python-level __init__ call on the hot path
    cdef Outcome o = Outcome.__new__(Outcome)
    o.kind, o.reason, o.tier, o.retry_after_s = kind, reason, tier, retry_after_s
    o.limit_requests = lim.rpm
    o.limit_tokens = lim.tpm
    # remaining in [0, limit] (0 without a limit, where limit 0 says there is none); reset:
    # time until remaining is back at the limit (docs/contract.md, "Headers and burst")
    if lim.rpm > 0:
        o.remaining_requests = _remaining(req_level, lim.rpm)
        o.reset_requests_us = _wait_us(lim.rpm - req_level, lim.req_rate)
    else:
        o.remaining_requests = 0
        o.reset_requests_us = 0
    if lim.tpm > 0:
        o.remaining_tokens = _remaining(tok_level, lim.tpm)
        o.reset_tokens_us = _wait_us(lim.tpm - tok_level, lim.tok_rate)
    else:
        o.remaining_tokens = 0
        o.reset_tokens_us = 0
    o.budget_limit = lim.budget
    if lim.budget >= 0:
        # spend never goes below zero in its period (settle), so remaining <= budget
        o.budget_remaining = budget_remaining if budget_remaining > 0 else 0
        o.budget_reset_us = end - now_us if end != NO_END else 0
    else:
        o.budget_remaining = 0
        o.budget_reset_us = 0
    o.charged_tokens, o.charged_cost = charged_tokens, charged_cost
    o.period_start_us = start if lim.budget >= 0 else 0
    o.wait_us = <int64>ceil(retry_us)
    return o


DEF MAX_PATH_C = 32


cpdef Outcome decide_path(list cells, int64 now_us, int tier, int64 input_tokens,
                          int64 output_tokens, int64 firm_tokens, bint commit_on_deny=False):
    """Decide one request over a path of cells, all of them or none, and apply it.

    cells: [(Limits, State), ...], the requesting holder's own cell first (the outcome's
    header fields are its), then its other windows and model cells, then its parent's,
    up to the root (docs/budgets.md). The rules are decide()'s, taken over every cell:
    the soft part of the estimate is trimmed to the smallest token bucket; the request
    goes one tier down when any cell's budget is below its low water (every cell is then
    charged at that tier's price, each in its own unit); it is too large when any cell can
    never take it, refused by budget when any cell's budget has no room, refused by rate
    when any cell's bucket has no room (retry-after: the longest wait among them); else
    every cell is charged. A refusal charges no cell (unless commit_on_deny: shadow mode
    charges them all). Outcome.cell names the cell that refused (the first in path order;
    budget before buckets, as decide() checks them), or, when admitted one tier down, the
    first cell below its low water; Outcome.charges lists each cell's (cost, period
    start) for settle_path. A one-cell path is decide() exactly."""
    cdef Py_ssize_t n = len(cells), i
    cdef Limits lim
    cdef State st
    cdef Outcome o
    cdef int kind = 0, reason = 0, cell = -1, down = -1, ntiers
    cdef double retry_us = 0.0, w, wr, wt, best = 0.0
    cdef int64 tokens
    cdef int64 cost[MAX_PATH_C]
    cdef int64 remaining[MAX_PATH_C]
    cdef int64 start[MAX_PATH_C]
    cdef int64 end[MAX_PATH_C]
    cdef double req_level[MAX_PATH_C]
    cdef double tok_level[MAX_PATH_C]
    cdef bint admitted
    if n == 1:
        lim = <Limits>cells[0][0]
        st = <State>cells[0][1]
        o = decide(lim, st, now_us, tier, input_tokens, output_tokens, firm_tokens,
                   commit_on_deny)
        if o.kind != 0:
            o.cell = 0
        o.charges = ((o.charged_cost, o.period_start_us),)
        return o
    if n < 1 or n > MAX_PATH_C:
        raise ValueError(f"a path holds 1..{MAX_PATH_C} cells")
    ntiers = (<Limits>cells[0][0]).ntiers
    for i in range(n):
        if (<Limits>cells[i][0]).ntiers != ntiers:
            raise ValueError("every cell of a path has the same tiers")
    if tier < 0 or tier >= ntiers:
        raise ValueError("tier out of range")
    if now_us < 0:
        raise ValueError("now_us must be >= 0")  # see decide()
    if input_tokens < 0 or output_tokens < 0 or firm_tokens < 0:
        raise ValueError("token counts must be >= 0")
    # 0. beyond MAX_TOKENS: too large for every holder (decide()'s rule)
    if input_tokens > MAX_TOKENS_C or output_tokens > MAX_TOKENS_C:
        kind, reason, cell = 4, 4, 0
        if input_tokens > MAX_TOKENS_C:
            input_tokens = MAX_TOKENS_C
        if output_tokens > MAX_TOKENS_C:
            output_tokens = MAX_TOKENS_C
    tokens = input_tokens + output_tokens
    # 1. the soft part trimmed to every token bucket in turn: after the last, it fits the
    #    smallest; the firm part larger than any bucket is too large there
    for i in range(n):
        lim = <Limits>cells[i][0]
        if kind == 0 and lim.tpm > 0 and tokens > lim.tok_cap:
            if firm_tokens > lim.tok_cap:
                kind, reason, cell = 4, 2, i
            else:
                output_tokens = <int64>lim.tok_cap - input_tokens
                if output_tokens < 0:
                    output_tokens = 0
                tokens = input_tokens + output_tokens
    # 2. budgets: every period rolled from the clock; one tier down if any cell is below
    #    its low water (the first such cell is named)
    for i in range(n):
        lim = <Limits>cells[i][0]
        st = <State>cells[i][1]
        start[i] = 0
        end[i] = NO_END
        cost[i] = 0
        remaining[i] = 0
        if lim.budget >= 0:
            _lim_bounds(lim, now_us, st.period_start, &start[i], &end[i])
            if st.period_start != start[i]:
                st.period_start = start[i]
                st.spent = 0
            st.spent = _add_spend(st.spent, 0)
            remaining[i] = lim.budget - st.spent
            if remaining[i] < lim.low_water * lim.budget and tier + 1 < ntiers and down < 0:
                down = i
    if down >= 0:
        tier += 1
        if kind == 0:
            kind, cell = 1, down
    for i in range(n):
        lim = <Limits>cells[i][0]
        if lim.budget >= 0:
            cost[i] = lim.cost(tier, input_tokens, output_tokens)
    if kind <= 1:
        for i in range(n):  # too large first: a permanent answer
            lim = <Limits>cells[i][0]
            if lim.budget >= 0 and cost[i] > lim.budget:
                kind, reason, cell = 4, 3, i
                break
    if kind <= 1:
        for i in range(n):
            lim = <Limits>cells[i][0]
            if lim.budget >= 0 and cost[i] > remaining[i]:
                if kind <= 1:
                    kind, reason, cell = 3, 3, i
                if end[i] != NO_END and <double>(end[i] - now_us) > retry_us:
                    retry_us = <double>(end[i] - now_us)
    # 3. buckets: every cell's refilled (bookkeeping, as decide()); the cell that must
    #    wait longest refuses, and its wait is the retry-after
    for i in range(n):
        lim = <Limits>cells[i][0]
        st = <State>cells[i][1]
        req_level[i] = 0.0
        tok_level[i] = 0.0
        if lim.rpm > 0:
            req_level[i] = _refill(st.req_level, st.req_last, lim.req_cap, lim.req_rate, now_us)
            st.req_level = req_level[i]
            st.req_last = now_us
        if lim.tpm > 0:
            tok_level[i] = _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tok_rate, now_us)
            st.tok_level = tok_level[i]
            st.tok_last = now_us
    if kind <= 1:
        for i in range(n):
            lim = <Limits>cells[i][0]
            wr = 0.0
            wt = 0.0
            if lim.rpm > 0 and req_level[i] < 1.0:
                wr = (1.0 - req_level[i]) / lim.req_rate
            if lim.tpm > 0 and tok_level[i] < tokens:
                wt = (tokens - tok_level[i]) / lim.tok_rate
            w = wr if wr >= wt else wt
            if w > 0.0 and w > best:
                best = w
                cell = i
                reason = 1 if wr >= wt else 2
        if best > 0.0:
            kind, retry_us = 2, best
    # 4. commit: every cell, or none
    admitted = kind <= 1 or commit_on_deny
    charges = []
    for i in range(n):
        lim = <Limits>cells[i][0]
        st = <State>cells[i][1]
        if admitted:
            if lim.rpm > 0:
                req_level[i] -= 1.0
                st.req_level = req_level[i]
            if lim.tpm > 0:
                tok_level[i] -= tokens
                st.tok_level = tok_level[i]
            if lim.budget >= 0:
                st.spent = _add_spend(st.spent, cost[i])
                remaining[i] = lim.budget - st.spent
        charges.append((cost[i] if admitted else 0, start[i] if lim.budget >= 0 else 0))
    if kind == 0:
        cell = -1
    if retry_us > MAX_WAIT_US_C:
        retry_us = MAX_WAIT_US_C
    cdef int64 retry_after_s = _seconds(retry_us)
    # the header fields are the first cell's (the requesting holder's own limits)
    lim = <Limits>cells[0][0]
    o = Outcome.__new__(Outcome)
    o.kind, o.reason, o.tier, o.retry_after_s = kind, reason, tier, retry_after_s
    o.limit_requests = lim.rpm
    o.limit_tokens = lim.tpm
    if lim.rpm > 0:
        o.remaining_requests = _remaining(req_level[0], lim.rpm)
        o.reset_requests_us = _wait_us(lim.rpm - req_level[0], lim.req_rate)
    if lim.tpm > 0:
        o.remaining_tokens = _remaining(tok_level[0], lim.tpm)
        o.reset_tokens_us = _wait_us(lim.tpm - tok_level[0], lim.tok_rate)
    o.budget_limit = lim.budget
    if lim.budget >= 0:
        o.budget_remaining = remaining[0] if remaining[0] > 0 else 0
        o.budget_reset_us = end[0] - now_us if end[0] != NO_END else 0
        o.period_start_us = start[0]
    if admitted:
        o.charged_tokens, o.charged_cost = tokens, cost[0]
    o.wait_us = <int64>ceil(retry_us)
    o.cell = cell
    o.charges = tuple(charges)
    return o


cpdef list settle_path(list cells, int64 now_us, int64 delta_tokens, list deltas):
    """settle() on every cell of a recorded path: the same token difference on each, and
    on each its own cost difference in its own unit, against the period its charge went
    to. deltas: [(delta_cost, period_start), ...], one per cell. Returns each cell's
    budget spent after it (-1 without a budget)."""
    cdef Py_ssize_t i, n = len(cells)
    if len(deltas) != n:
        raise ValueError("one delta per cell")
    return [settle(<Limits>cells[i][0], <State>cells[i][1], now_us, delta_tokens,
                   deltas[i][0], deltas[i][1]) for i in range(n)]


cpdef bint at_rest(Limits lim, State st, int64 now_us):
    """True when ``st`` is, under ``lim`` at now_us, what a fresh State() is: both buckets
    full again and nothing spent in the current budget period. From then on it decides
    and settles exactly as a fresh State() would (tests/core/test_core_reference.py holds that),
    so the embedded backend may drop it to bound its memory."""
    cdef int64 start = 0, end = 0
    if lim.rpm > 0 and _refill(st.req_level, st.req_last, lim.req_cap, lim.req_rate,
                               now_us) < lim.req_cap:
        return False
    if lim.tpm > 0 and _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tok_rate,
                               now_us) < lim.tok_cap:
        return False
    if lim.budget >= 0 and st.spent != 0:
        _lim_bounds(lim, now_us, st.period_start, &start, &end)
        if st.period_start == start:
            return False
    return True


cpdef int64 settle(Limits lim, State st, int64 now_us, int64 delta_tokens, int64 delta_cost,
                   int64 period_start):
    """Apply a reconciliation: the difference between actual usage and what was
    charged at decision time (negative = refund). The token bucket takes the token
    difference now; the budget takes the cost difference only if the charge was
    made in the current period (a refund never reaches into a closed period).
    period_start < 0 means "the current period" (usage with no reservation found).
    Returns the budget spent after the adjustment (-1 without a budget)."""
    cdef double tok_level
    cdef int64 start = 0, end = 0
    if now_us < 0:
        raise ValueError("now_us must be >= 0")  # see decide()
    # deltas come from usage reports (bounded there); clamped again so no sum can wrap
    delta_tokens = _clamp_delta(delta_tokens)
    delta_cost = _clamp_delta(delta_cost)
    if lim.tpm > 0 and delta_tokens != 0:
        tok_level = _refill(st.tok_level, st.tok_last, lim.tok_cap, lim.tok_rate, now_us)
        tok_level -= delta_tokens
        if tok_level > lim.tok_cap:
            tok_level = lim.tok_cap
        st.tok_level = tok_level
        st.tok_last = now_us
    if lim.budget < 0:
        return -1
    _lim_bounds(lim, now_us, st.period_start, &start, &end)
    if st.period_start != start:
        st.period_start = start
        st.spent = 0
    if period_start == start or period_start < 0:
        st.spent = _add_spend(st.spent, delta_cost)
    elif delta_cost > 0:
        # extra usage of a request admitted in an earlier period is charged now:
        # spend is never lost, it lands in the period in which it became known
        st.spent = _add_spend(st.spent, delta_cost)
    return st.spent


# --- provider quotas: docs/providers.md ------------------------------------------------
# Priorities, lowest first (the index into a Quota's floors)
PRIO_LOW = 0
PRIO_NORMAL = 1
PRIO_HIGH = 2


cdef class Quota:
    """One provider's quota: a request bucket and a token bucket holding ``burst`` of a
    minute's limit (0 < burst <= 1) and refilling continuously, a count of requests per
    UTC day (0 = no such limit), and the reservation: floors[p] is the share of each of
    them a request of priority p must leave (0 for the highest priority it is kept for)."""
    cdef readonly int64 rpm, tpm, rpd
    cdef readonly double burst, req_cap, tok_cap, req_rate, tok_rate
    cdef readonly tuple floors
    cdef double _floor[3]

    def __cinit__(self, int64 rpm=0, int64 tpm=0, int64 rpd=0, double burst=1.0,
                  floors=(0.0, 0.0, 0.0)):
        cdef int i
        if not (0 <= rpm <= MAX_RATE_C and 0 <= tpm <= MAX_RATE_C and 0 <= rpd <= MAX_RATE_C):
            raise ValueError("rpm, tpm and rpd must be in 0..MAX_RATE")
        if not (0.0 < burst <= 1.0):
            raise ValueError("burst must be in (0, 1]")
        self.floors = tuple(float(f) for f in floors)
        if len(self.floors) != 3 or not all(0.0 <= f < 1.0 for f in self.floors):
            raise ValueError("floors: three fractions in [0, 1)")
        for i in range(3):
            self._floor[i] = self.floors[i]
        self.rpm, self.tpm, self.rpd, self.burst = rpm, tpm, rpd, burst
        self.req_cap = rpm * burst
        self.tok_cap = tpm * burst
        self.req_rate = rpm / 60e6
        self.tok_rate = tpm / 60e6


cdef class QuotaState:
    """One provider's mutable state. A bucket never used holds +inf, as a tenant's does
    (full at any capacity: every read clamps to the capacity in force)."""
    cdef public double req_level, tok_level
    cdef public int64 req_last, tok_last, day_start, day_count

    def __cinit__(self):
        self.req_level = float("inf")
        self.tok_level = float("inf")
        self.req_last = 0
        self.tok_last = 0
        self.day_start = -1
        self.day_count = 0


cdef double _quota_wait(Quota q, QuotaState qs, int64 now, int prio, int64 tokens,
                        double* req_level, double* tok_level, int64* day_count):
    """µs until ``q`` has room for one request of ``tokens`` at priority ``prio`` (0: now;
    -1: never, the request is larger than the share this priority may take). Room means:
    after the charge each bucket holds at least floors[prio] x its capacity. Writes the
    levels refilled to now and the day's count into the out-parameters; ``qs`` is left
    as it is (only a charge writes it, so a refused candidate costs Redis no write)."""
    cdef double f = q._floor[prio]
    cdef double wait = 0.0, w, level, need
    cdef int64 start = 0, end = 0
    cdef bint never = False
    if q.rpm > 0:
        level = _refill(qs.req_level, qs.req_last, q.req_cap, q.req_rate, now)
        req_level[0] = level
        need = 1.0 + f * q.req_cap
        if need > q.req_cap:
            never = True
        elif level < need:
            w = (need - level) / q.req_rate
            if w > wait:
                wait = w
    if q.tpm > 0:
        level = _refill(qs.tok_level, qs.tok_last, q.tok_cap, q.tok_rate, now)
        tok_level[0] = level
        need = tokens + f * q.tok_cap
        if need > q.tok_cap:
            never = True
        elif level < need:
            w = (need - level) / q.tok_rate
            if w > wait:
                wait = w
    if q.rpd > 0:
        _period_bounds(now, 2, &start, &end)
        day_count[0] = qs.day_count if qs.day_start == start else 0
        if 1.0 > q.rpd * (1.0 - f):
            never = True
        elif day_count[0] + 1 > q.rpd * (1.0 - f):
            w = <double>(end - now)
            if w > wait:
                wait = w
    if never:
        return -1.0
    return wait


cdef void _quota_charge(Quota q, QuotaState qs, int64 now, int64 tokens, double req_level,
                        double tok_level, int64 day_count):
    """Charge one request of ``tokens``, from the levels _quota_wait read at ``now``."""
    cdef int64 start = 0, end = 0
    if q.rpm > 0:
        qs.req_level = req_level - 1.0
        qs.req_last = now
    if q.tpm > 0:
        qs.tok_level = tok_level - tokens
        qs.tok_last = now
    if q.rpd > 0:
        _period_bounds(now, 2, &start, &end)
        qs.day_start = start
        qs.day_count = day_count + 1


cdef void _uncharge(Limits lim, State st, Outcome o):
    """Give back what decide() just charged (at the same instant): the exact inverse of its
    commit, so a decision whose provider refuses holds nothing (lua/routed.lua does the same
    arithmetic on the stored values)."""
    cdef double level
    if lim.rpm > 0:
        level = st.req_level + 1.0
        st.req_level = lim.req_cap if level > lim.req_cap else level
    if lim.tpm > 0:
        level = st.tok_level + o.charged_tokens
        st.tok_level = lim.tok_cap if level > lim.tok_cap else level
    if lim.budget >= 0:
        st.spent -= o.charged_cost


def quota_wait(Quota q, QuotaState qs, int64 now_us, int priority, int64 tokens):
    """_quota_wait for tests and the cluster protocol's reference: µs, 0 now, -1 never."""
    cdef double r = 0.0, t = 0.0
    cdef int64 d = 0
    if priority < 0 or priority > 2:
        raise ValueError("priority out of range")
    return _quota_wait(q, qs, now_us, priority, tokens, &r, &t, &d)


cpdef int64 quota_take(Quota q, QuotaState qs, int64 now_us, int priority, int64 tokens):
    """Check and charge one provider alone (a cluster's first step, docs/providers.md):
    returns 0 when charged, else the µs until it has room (-1: never)."""
    cdef double w, r = 0.0, t = 0.0
    cdef int64 d = 0
    if priority < 0 or priority > 2:
        raise ValueError("priority out of range")
    w = _quota_wait(q, qs, now_us, priority, tokens, &r, &t, &d)
    if w == 0.0:
        _quota_charge(q, qs, now_us, tokens, r, t, d)
        return 0
    if w < 0.0:
        return -1
    return <int64>ceil(w)


cpdef quota_settle(Quota q, QuotaState qs, int64 now_us, int64 delta_tokens,
                   int64 delta_requests=0):
    """Correct a provider's buckets: the token difference of a settlement (actual minus
    charged; negative gives back), and requests given back by a refund (delta_requests < 0).
    Never above capacity; the daily count is never below zero."""
    cdef double level
    cdef int64 start = 0, end = 0
    if q.tpm > 0 and delta_tokens != 0:
        level = _refill(qs.tok_level, qs.tok_last, q.tok_cap, q.tok_rate, now_us) - delta_tokens
        qs.tok_level = q.tok_cap if level > q.tok_cap else level
        qs.tok_last = now_us
    if delta_requests != 0:
        if q.rpm > 0:
            level = _refill(qs.req_level, qs.req_last, q.req_cap, q.req_rate, now_us) - delta_requests
            qs.req_level = q.req_cap if level > q.req_cap else level
            qs.req_last = now_us
        if q.rpd > 0:
            _period_bounds(now_us, 2, &start, &end)
            if qs.day_start == start:
                qs.day_count += delta_requests
                if qs.day_count < 0:
                    qs.day_count = 0


cpdef Outcome decide_routed(Limits lim, State st, int64 now_us, int tier, int64 input_tokens,
                            int64 output_tokens, int64 firm_tokens, bint commit_on_deny,
                            int priority, int spill, list candidates):
    """One decision that charges the tenant and one provider together, or neither.

    candidates: [(tier, Quota, QuotaState), ...] in routing order (the service orders the
    providers of each tier's model). The tenant decides first (decide(): its limits, budget,
    low-water tier t). Then the candidates of tier t, in order: the first with room for the
    request at ``priority`` (PRIO_*) is charged with it. If none has room, and spill > 0,
    the tenant's charge is given back and the decision is made again one tier down (priced
    there), with that tier's candidates; at most ``spill`` tiers down. A spilled request is
    a DOWNGRADE with reason R_PROVIDER. If no candidate has room, the tenant's charge is
    given back and the answer is DENY_RATE, reason R_PROVIDER, with the soonest wait of a
    candidate (TOO_LARGE if none could ever take it); its tenant fields are left out
    (limits and remaining 0, budget limit -1): the tenant's own limits did not refuse. In shadow mode
    (commit_on_deny) such a request goes to the first candidate of its tier all the same,
    charged there, and the outcome says what enforcement would have answered."""
    cdef Outcome o, d
    cdef int t0, t, k, i, n = len(candidates)
    cdef double w, best = -1.0, req_level = 0.0, tok_level = 0.0
    cdef int64 day_count = 0
    cdef int first = -1
    cdef bint charged
    cdef Quota q
    cdef QuotaState qs
    if priority < 0 or priority > 2:
        raise ValueError("priority out of range")
    o = decide(lim, st, now_us, tier, input_tokens, output_tokens, firm_tokens, commit_on_deny)
    charged = o.kind <= 1 or commit_on_deny
    if not charged:
        return o
    t0 = o.tier
    for k in range(spill + 1):
        t = t0 + k
        if t >= lim.ntiers:
            break
        if k > 0:
            _uncharge(lim, st, o)
            charged = False
            d = decide(lim, st, now_us, tier + k, input_tokens, output_tokens, firm_tokens,
                       commit_on_deny)
            if not (d.kind <= 1 or commit_on_deny):
                break  # the lower tier does not take it either (priced above what is left)
            o = d
            charged = True
            if o.tier != t:
                break
        for i in range(n):
            cand = candidates[i]
            if <int>cand[0] != t:
                continue
            q = <Quota>cand[1]
            qs = <QuotaState>cand[2]
            if first < 0:
                first = i
            w = _quota_wait(q, qs, now_us, priority, o.charged_tokens, &req_level, &tok_level,
                            &day_count)
            if w == 0.0:
                _quota_charge(q, qs, now_us, o.charged_tokens, req_level, tok_level, day_count)
                _provider_fields(o, q, qs, i)
                if t > tier and o.kind == 0:
                    o.kind = 1
                if k > 0 and o.kind <= 1:
                    o.reason = _R_PROVIDER
                return o
            if w > 0.0 and (best < 0.0 or w < best):
                best = w
    # no candidate had room
    if charged:
        _uncharge(lim, st, o)
    if commit_on_deny and first >= 0:
        # shadow: the request goes on all the same, to its tier's first candidate
        o = decide(lim, st, now_us, tier, input_tokens, output_tokens, firm_tokens, True)
        cand = candidates[first]
        q = <Quota>cand[1]
        qs = <QuotaState>cand[2]
        _quota_wait(q, qs, now_us, priority, o.charged_tokens, &req_level, &tok_level,
                    &day_count)
        _quota_charge(q, qs, now_us, o.charged_tokens, req_level, tok_level, day_count)
        _provider_fields(o, q, qs, first)
        if o.kind <= 1:
            o.kind, o.reason = (2, _R_PROVIDER) if best >= 0.0 else (4, _R_PROVIDER)
            o.wait_us = <int64>ceil(best) if best > 0.0 else 0
            o.retry_after_s = _seconds(best)
        return o
    return _provider_refusal(t0, best)


cdef int64 _seconds(double us) noexcept:
    """Whole seconds to wait, rounded up, at least 1 when there is any wait."""
    cdef int64 s
    if us <= 0.0:
        return 0
    s = <int64>ceil(us / US)
    return s if s >= 1 else 1


cdef void _provider_fields(Outcome o, Quota q, QuotaState qs, int i):
    o.provider = i
    if q.rpm > 0:
        o.provider_remaining_requests = <int64>floor(qs.req_level) if qs.req_level > 0 else 0
    if q.tpm > 0:
        o.provider_remaining_tokens = <int64>floor(qs.tok_level) if qs.tok_level > 0 else 0


cdef Outcome _provider_refusal(int tier, double best):
    cdef Outcome o = Outcome.__new__(Outcome)
    o.tier = tier
    o.reason = _R_PROVIDER
    if best < 0.0:
        o.kind = 4  # no candidate could ever take it
    else:
        o.kind = 2
        o.wait_us = <int64>ceil(best)
        o.retry_after_s = _seconds(best)
    o.budget_limit = -1  # no tenant fields: the tenant's own limits did not refuse
    return o
