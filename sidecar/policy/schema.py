"""The policy file's shape, as msgspec Structs. Unknown keys are rejected.

Semantic checks that msgspec cannot express (a tier's model has a price, a
low-water fraction is in [0, 1), ...) live in ``load.py``; both report errors
with the file name and the field path.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import msgspec

from sidecar.attribution import AttributionConfig
from sidecar.ledger.config import LedgerConfig

Period = Literal["minute", "hour", "day", "week", "month", "total"]
Priority = Literal["low", "normal", "high"]
FailureMode = Literal["open", "closed", "envoy"]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class TenantSource(_Strict, frozen=True):
    header: str = "x-tenant-id"
    # "namespace:path.to.field" of Envoy dynamic metadata that names the tenant, e.g.
    # "envoy.filters.http.jwt_authn:jwt_payload.tenant" after jwt_authn validated a token.
    # A client cannot forge it; when set, the header is not read (ext_authz over gRPC only).
    metadata: Optional[str] = None
    # what to do with a request whose tenant is not listed under `tenants`:
    # `defaults` applies the default limits (each unknown tenant gets its own
    # state), `deny` refuses it with 403.
    unknown: Literal["defaults", "deny"] = "defaults"
    # what to do with a request that carries no tenant at all
    missing: Literal["deny", "anonymous"] = "deny"


class Tier(_Strict, frozen=True):
    name: str
    model: str


class Price(_Strict, frozen=True):
    input: float  # USD per 1K tokens
    output: float
    # prompt tokens read from / written to the provider's prompt cache (sidecar/settlement/usage.py);
    # absent: the input price (never cheaper than the operator said)
    cached_input: Optional[float] = None
    cache_write: Optional[float] = None
    # the most output tokens the provider bills for one choice of this model: what a
    # request whose usage cannot be read is charged at when it names no max_tokens
    # (sidecar/settlement/bound.py; absent: sidecar.settlement.bound.DEFAULT_MAX_OUTPUT_TOKENS)
    max_output_tokens: Optional[int] = None
    # the most input tokens the provider bills for one request of this model (its context
    # window): the input a request whose usage cannot be read is charged at when the
    # provider adds stored input to its body (a Responses `previous_response_id` or
    # `conversation`; sidecar/settlement/bound.py; absent: sidecar.settlement.bound.DEFAULT_MAX_INPUT_TOKENS)
    max_input_tokens: Optional[int] = None


class Limits(_Strict, frozen=True):
    rpm: Optional[int] = None
    tpm: Optional[int] = None
    burst: Optional[float] = None  # bucket capacity = limit x burst; absent = 1.0


Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                  "sunday"]


class Budget(_Strict, frozen=True):
    tokens: Optional[int] = None
    usd: Optional[float] = None
    period: Period = "month"
    low_water: float = 0.0
    # a calendar window (day, week, month; docs/budgets.md): days start at 00:00 in this
    # IANA time zone (absent: UTC), a month on `start_day` (1..28), a week on `start_weekday`
    timezone: Optional[str] = None
    start_day: Optional[int] = None
    start_weekday: Optional[Weekday] = None


class ModelLimits(_Strict, frozen=True):
    """A holder's limits and budgets for one model (docs/budgets.md), applied together
    with its overall ones to requests for that model."""
    limits: Optional[Limits] = None
    budget: Optional[Budget] = None
    budgets: Optional[list[Budget]] = None


class TenantPolicy(_Strict, frozen=True):
    priority: Optional[Priority] = None
    limits: Optional[Limits] = None
    budget: Optional[Budget] = None
    # several windows at once (docs/budgets.md), e.g. usd 50 a day and usd 1000 a month;
    # `budget:` is the one-window form (set one of them)
    budgets: Optional[list[Budget]] = None
    # the holder above this one (a team, an org: another entry of `tenants`); a request
    # is admitted only if every holder up to the root admits it (docs/budgets.md)
    parent: Optional[str] = None
    # per-model limits and budgets of this holder, by the model a request asks for
    models: Optional[dict[str, ModelLimits]] = None
    shadow_mode: Optional[bool] = None
    # providers: when every provider of the request's tier is full, try the next tier
    spill_to_next_tier: Optional[bool] = None


class Defaults(_Strict, frozen=True):
    priority: Priority = "normal"
    limits: Limits = Limits()
    budget: Optional[Budget] = None
    spill_to_next_tier: bool = True


class Estimate(_Strict, frozen=True):
    # output tokens assumed when a request names no max_tokens; trimmed to fit
    # a small bucket, so it never makes a request impossible by accident
    default_output_tokens: int = 256
    # tokens assumed for a request with neither a header estimate nor a body
    default_request_tokens: int = 512
    chars_per_token: float = 4.0
    # input tokens counted for each image part of a request (image_url, input_image,
    # Anthropic image), on top of its bytes: a provider prices an image by its size in
    # pixels, which a short URL does not show (docs/contract.md, "Token estimate")
    image_tokens: int = 2000
    # an explicit token count in this header (or RLS hits_addend) is read only when a
    # filter the operator runs sets it (trusted: true); a client's own count is ignored,
    # and `kt envoy-config` strips it at the edge (docs/security.md)
    header: str = "x-kt-estimated-tokens"
    trusted: bool = False


class FailureModes(_Strict, frozen=True):
    rate_limits: FailureMode = "open"
    budgets: FailureMode = "closed"


class MemoryBackend(_Strict, frozen=True, tag_field="kind", tag="memory"):
    # where budget spend is persisted (atomic rename); "" disables persistence
    state_file: str = "kt-state/spend.json"
    flush_interval_s: float = 1.0
    # tenants held in memory at once (1-3 KB each); past it a tenant the policy does
    # not name, and that is not already held, is refused (docs/embedded.md)
    max_tenants: int = 100_000


class Tls(_Strict, frozen=True):
    """TLS for a rediss:// URL. Paths are PEM files, relative to the working directory."""
    ca_file: Optional[str] = None  # CAs that sign the server's certificate (else the system's)
    cert_file: Optional[str] = None  # client certificate for mutual TLS, with key_file
    key_file: Optional[str] = None


class RedisBackend(_Strict, frozen=True, tag_field="kind", tag="redis"):
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    timeout_ms: int = 50
    failure_mode: Union[FailureMode, FailureModes] = FailureModes()
    key_prefix: str = "kt"
    tls: Optional[Tls] = None
    # keep each admitted request's reservation in Redis too, so a usage report reaching
    # another replica replaces the estimate instead of adding to it (docs/usage.md);
    # one extra write per admitted request with an x-request-id
    shared_reservations: bool = False
    # capacity leases for hot tenants: a replica decides in process within capacity it
    # took from Redis at once (docs/redis.md, "Capacity leases"; when to turn them off)
    leases: bool = True


Backend = Union[MemoryBackend, RedisBackend]


class Admin(_Strict, frozen=True):
    # the bearer token of the admin API (usage reports, spend), first line of this file;
    # `kt serve --admin-token-file` overrides it (docs/security.md)
    token_file: Optional[str] = None


# --- provider quotas (docs/providers.md) -------------------------------------------
class ProviderRateLimits(_Strict, frozen=True):
    requests_per_minute: Optional[int] = None
    tokens_per_minute: Optional[int] = None
    requests_per_day: Optional[int] = None
    # share of a minute's quota one burst may take (0 < burst <= 1): for a provider that
    # enforces its per-minute limit over shorter intervals
    burst: float = 1.0


class Provider(_Strict, frozen=True):
    id: str
    models: list[str]
    rate_limits: ProviderRateLimits = ProviderRateLimits()
    # share of each bucket kept for a priority and those above it, e.g. {high: 0.2}
    reserve: dict[str, float] = {}
    # where it lives, for `kt envoy-config`
    host: Optional[str] = None
    port: Optional[int] = None
    tls: Optional[bool] = None  # absent: TLS on port 443
    sni: Optional[str] = None  # absent: the host
    ca_file: Optional[str] = None  # CAs of its certificate for Envoy (absent: the system's)
    # where Envoy reads the provider's API key (a mounted Secret): the key itself is never
    # in the policy, nor does it pass through the sidecar
    api_key_file: Optional[str] = None
    api_key_header: str = "authorization"  # "Bearer <key>"; another header gets the raw key


class Routing(_Strict, frozen=True):
    strategy: Literal["weighted", "priority"] = "priority"
    weights: dict[str, float] = {}  # weighted: provider id -> weight > 0
    order: list[str] = []  # priority: provider ids, first tried first


class Queue(_Strict, frozen=True):
    max_wait_ms: int = 2000  # kept under Envoy's ext_authz timeout (kt envoy-config)
    max_size: int = 1000  # waiting requests per sidecar process (the guide's queue_max_size)
    overflow: Literal["reject"] = "reject"  # the guide's queue_overflow
    # the most of max_size one tenant may hold (at least one place): one tenant's flood
    # cannot fill the queue for everyone
    tenant_share: float = 0.25


class Anomaly(_Strict, frozen=True):
    """Token-rate anomalies (sidecar/anomaly.py, docs/policy.md): a tenant whose settled
    tokens per minute reach ``factor`` times its own usual rate (and at least
    ``min_tokens_per_minute``) is flagged; ``action`` says what its requests get meanwhile."""
    enabled: bool = True
    factor: float = 20.0
    min_tokens_per_minute: float = 10_000.0
    baseline_minutes: float = 1440.0
    warmup_minutes: int = 60
    action: Literal["flag", "refuse", "downgrade"] = "flag"


class Policy(_Strict, frozen=True, kw_only=True):
    tenant: TenantSource = TenantSource()
    tiers: list[Tier]
    pricing: dict[str, Price] = {}
    # a request naming a model neither priced nor a tier's, when the policy prices models:
    # "refuse" (400: the provider would bill it at a price the gateway does not know) or
    # "dearest" (let through, charged at the dearest listed price; docs/usage.md)
    unpriced_models: Literal["refuse", "dearest"] = "refuse"
    defaults: Defaults = Defaults()
    tenants: dict[str, TenantPolicy] = {}
    shadow_mode: bool = False
    estimate: Estimate = Estimate()
    backend: Backend = msgspec.field(default_factory=MemoryBackend)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)  # sidecar/ledger/
    admin: Admin = Admin()
    providers: list[Provider] = []
    routing: dict[str, Routing] = {}  # model -> how its providers share its traffic
    queue: Optional[Queue] = None
    anomaly: Anomaly = Anomaly()
    # the end user and tags a request is attributed to, below its tenant (docs/budgets.md,
    # "Attribution"); the schema is sidecar/attribution.py's own
    attribution: AttributionConfig = AttributionConfig()
