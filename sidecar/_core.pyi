# Type stub of the Cython decision core (native/core.pyx).
ALLOW: int
DOWNGRADE: int
DENY_RATE: int
DENY_BUDGET: int
TOO_LARGE: int
R_NONE: int
R_RPM: int
R_TPM: int
R_BUDGET: int
R_SIZE: int
R_PROVIDER: int
PRIO_LOW: int
PRIO_NORMAL: int
PRIO_HIGH: int
P_MINUTE: int
P_HOUR: int
P_DAY: int
P_MONTH: int
P_TOTAL: int
P_WEEK: int
P_WINDOW: int
MAX_PATH: int
NO_END_US: int
MAX_TOKENS: int
MAX_RATE: int
MAX_BURST: float
MAX_PRICE: int
MAX_COST: int
MAX_BUDGET: int
MAX_WAIT_US: int

def period_bounds(now_us: int, period: int) -> tuple[int, int]: ...

class Limits:
    rpm: int
    tpm: int
    budget: int
    burst: float
    low_water: float
    req_cap: float
    tok_cap: float
    req_rate: float
    tok_rate: float
    budget_in_usd: bool
    period: int
    ntiers: int
    prices: tuple[tuple[int, int], ...]
    win_start: int
    win_end: int
    win_next: int
    def set_window(self, start: int, end: int, next_end: int) -> None: ...
    def __init__(self, rpm: int = 0, tpm: int = 0, burst: float = 1.0, budget: int = -1,
                 budget_in_usd: bool = False, period: int = 2, low_water: float = 0.0,
                 prices: object = ((0, 0),)) -> None: ...

class State:
    req_level: float
    tok_level: float
    req_last: int
    tok_last: int
    spent: int
    period_start: int
    def __init__(self) -> None: ...

class Outcome:
    kind: int
    reason: int
    tier: int
    retry_after_s: int
    limit_requests: int
    remaining_requests: int
    reset_requests_us: int
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_us: int
    budget_limit: int
    budget_remaining: int
    budget_reset_us: int
    charged_tokens: int
    charged_cost: int
    period_start_us: int
    wait_us: int
    provider: int
    provider_remaining_requests: int
    provider_remaining_tokens: int
    cell: int
    charges: tuple[tuple[int, int], ...] | None
    def __init__(self, kind: int, reason: int, tier: int, retry_after_s: int,
                 limit_requests: int, remaining_requests: int, reset_requests_us: int,
                 limit_tokens: int, remaining_tokens: int, reset_tokens_us: int,
                 budget_limit: int, budget_remaining: int, budget_reset_us: int,
                 charged_tokens: int, charged_cost: int, period_start_us: int = 0,
                 wait_us: int = 0, provider: int = -1, provider_remaining_requests: int = -1,
                 provider_remaining_tokens: int = -1) -> None: ...
    @property
    def admitted(self) -> bool: ...

def decide(lim: Limits, st: State, now_us: int, tier: int, input_tokens: int,
           output_tokens: int, firm_tokens: int, commit_on_deny: bool = False) -> Outcome: ...
def decide_path(cells: list[tuple[Limits, State]], now_us: int, tier: int, input_tokens: int,
                output_tokens: int, firm_tokens: int, commit_on_deny: bool = False) -> Outcome: ...
def settle_path(cells: list[tuple[Limits, State]], now_us: int, delta_tokens: int,
                deltas: list[tuple[int, int]]) -> list[int]: ...
def at_rest(lim: Limits, st: State, now_us: int) -> bool: ...
def settle(lim: Limits, st: State, now_us: int, delta_tokens: int, delta_cost: int,
           period_start: int) -> int: ...


class Quota:
    rpm: int
    tpm: int
    rpd: int
    burst: float
    req_cap: float
    tok_cap: float
    req_rate: float
    tok_rate: float
    floors: tuple[float, float, float]
    def __init__(self, rpm: int = 0, tpm: int = 0, rpd: int = 0, burst: float = 1.0,
                 floors: object = (0.0, 0.0, 0.0)) -> None: ...

class QuotaState:
    req_level: float
    tok_level: float
    req_last: int
    tok_last: int
    day_start: int
    day_count: int
    def __init__(self) -> None: ...

def quota_wait(q: Quota, qs: QuotaState, now_us: int, priority: int, tokens: int) -> float: ...
def quota_take(q: Quota, qs: QuotaState, now_us: int, priority: int, tokens: int) -> int: ...
def quota_settle(q: Quota, qs: QuotaState, now_us: int, delta_tokens: int,
                 delta_requests: int = 0) -> None: ...
def decide_routed(lim: Limits, st: State, now_us: int, tier: int, input_tokens: int,
                  output_tokens: int, firm_tokens: int, commit_on_deny: bool, priority: int,
                  spill: int, candidates: list[tuple[int, Quota, QuotaState]]) -> Outcome: ...
