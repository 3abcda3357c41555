"""Decision → what Envoy and the client see. Every header name, status and error
body of kt-sidecar is defined here and nowhere else; docs/contract.md documents it.

Transports call ``answer(decision)`` and translate the ``Answer`` into their
protocol (ext_authz CheckResponse, RLS RateLimitResponse, ...), nothing more.
"""
from __future__ import annotations

import math

import msgspec

from sidecar import _core
from sidecar.model import REASON_TOKEN_RATE, REASONS, Decision, Kind

# Set on the upstream request (the LLM provider / gateway sees them; Envoy routes on x-kt-tier).
H_DECISION = "x-kt-decision"
H_TENANT = "x-kt-tenant"
H_TIER = "x-kt-tier"
H_MODEL = "x-kt-model"
H_PRIORITY = "x-kt-priority"
H_SHADOW = "x-kt-shadow"  # shadow mode: what the decision would have been
# the reservation id the sidecar made for an admitted request: ext_proc and usage reports
# settle by it (docs/usage.md); a client-chosen x-request-id is never the key
H_RESERVATION = "x-kt-reservation"
H_PROVIDER = "x-kt-provider"  # the provider charged with the request: Envoy routes on it
H_REASON = "x-kt-reason"  # why provider quota downgraded or refused it (client sees it too)
# Only the sidecar may set these: the printed Envoy config strips them from the client's
# request before any filter runs (else a fail-open or an appending filter lets them through).
UPSTREAM_HEADERS = (H_DECISION, H_TENANT, H_TIER, H_MODEL, H_PRIORITY, H_SHADOW, H_RESERVATION,
                    H_PROVIDER, H_REASON)
# gRPC metadata on the ext_proc stream of a body rewrite (usage comes by Envoy's access log,
# `kt envoy-config` usage "als"): that stream must not close the reservation.
H_EXT_PROC_ROLE = "x-kt-ext-proc"
# Dynamic metadata namespace where Envoy's Lua filter leaves the response's usage
# (envoy/usage.lua), read back from Envoy's access log (sidecar/transports/als.py).
USAGE_METADATA_NAMESPACE = "kt.usage"
# Set on the response to the client (OpenAI-style).
H_LIMIT_REQUESTS = "x-ratelimit-limit-requests"
H_REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
H_RESET_REQUESTS = "x-ratelimit-reset-requests"
H_LIMIT_TOKENS = "x-ratelimit-limit-tokens"
H_REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
H_RESET_TOKENS = "x-ratelimit-reset-tokens"
H_BUDGET_REMAINING = "x-kt-budget-remaining"
H_BUDGET_RESET = "x-kt-budget-reset"
H_RETRY_AFTER = "retry-after"
H_CONTENT_TYPE = "content-type"

# kind → (HTTP status, OpenAI error type, error code)
ERRORS: dict[Kind, tuple[int, str, str]] = {
    Kind.DENY_RATE: (429, "rate_limit_exceeded", "rate_limit_exceeded"),
    Kind.DENY_BUDGET: (429, "insufficient_quota", "insufficient_quota"),
    Kind.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    Kind.UNKNOWN_TENANT: (403, "permission_error", "unknown_tenant"),
    Kind.MISSING_TENANT: (400, "invalid_request_error", "missing_tenant"),
    Kind.BAD_REQUEST: (400, "invalid_request_error", "invalid_request"),
    Kind.LENGTH_REQUIRED: (411, "invalid_request_error", "length_required"),
    Kind.FAIL_CLOSED: (503, "service_unavailable", "limiter_unavailable"),
    Kind.OVERLOADED: (503, "service_unavailable", "limiter_overloaded"),
    # frozen by an operator (docs/budgets.md, "Management API"): waiting does not help
    Kind.FROZEN: (403, "permission_error", "tenant_frozen"),
}
# seconds a client is told to wait when the limiter itself is down (fail closed)
FAIL_CLOSED_RETRY_AFTER_S = 1
# a tenant refused for a token-rate anomaly: judged again once a minute (sidecar/anomaly.py)
ANOMALY_RETRY_AFTER_S = 60


class Answer(msgspec.Struct, frozen=True):
    """Protocol-neutral answer. ``status`` 200 means let the request through.
    ``unavailable`` means: answer with a transport-level failure (gRPC UNAVAILABLE)
    so that Envoy's own failure mode applies. (A msgspec Struct, one per decision: a
    frozen dataclass took ~0.9 µs to build, this ~0.1 µs.)"""

    status: int
    upstream_headers: tuple[tuple[str, str], ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    unavailable: bool = False
    metadata: dict | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 200 and not self.unavailable


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str
    param: None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_encode = msgspec.json.Encoder().encode


def error_body(message: str, type_: str, code: str) -> bytes:
    return _encode(_ErrorBody(_ErrorDetail(message=message, type=type_, code=code)))


def duration(us: int) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s', '1h2m3s'."""
    if us <= 0:
        return "0s"
    if us < 1_000_000:
        return f"{math.ceil(us / 1000)}ms"
    s = math.ceil(us / 1_000_000)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def budget_amount(value: int, unit: str) -> str:
    """A budget quantity as it reads on an invoice: tokens, or USD with 6 decimals."""
    if unit == "usd":
        return f"{value / 1e9:.6f}"
    return str(value)


def _within(value: int, limit: int) -> int:
    """``value`` clamped to [0, limit]. The backends already keep remaining values there
    (native/core.pyx, lua/decide.lua); the headers hold to it whatever an Outcome says,
    because OpenAI-style clients pace on them: a remaining above its limit or below zero
    reads as a contradiction (docs/contract.md, "Headers and burst")."""
    return 0 if value < 0 else (limit if value > limit else value)


def _rate_headers(d: Decision) -> list[tuple[str, str]]:
    o = d.outcome
    if o is None:
        return []
    h: list[tuple[str, str]] = []
    if o.limit_requests > 0:
        h += [(H_LIMIT_REQUESTS, str(o.limit_requests)),
              (H_REMAINING_REQUESTS, str(_within(o.remaining_requests, o.limit_requests))),
              (H_RESET_REQUESTS, duration(o.reset_requests_us))]
    if o.limit_tokens > 0:
        h += [(H_LIMIT_TOKENS, str(o.limit_tokens)),
              (H_REMAINING_TOKENS, str(_within(o.remaining_tokens, o.limit_tokens))),
              (H_RESET_TOKENS, duration(o.reset_tokens_us))]
    if o.budget_limit >= 0:
        h.append((H_BUDGET_REMAINING, budget_amount(_within(o.budget_remaining, o.budget_limit),
                                                    d.budget_unit)))
        if o.budget_reset_us > 0:
            h.append((H_BUDGET_RESET, duration(o.budget_reset_us)))
    return h


def _deny_message(d: Decision) -> str:
    if d.message:
        return d.message
    o = d.outcome
    reason = REASONS.get(o.reason, "") if o is not None else ""
    if reason == "provider" and o is not None:
        return _provider_message(d, o)
    if d.kind is Kind.DENY_RATE and o is not None:
        limit = f"{o.limit_requests} requests" if reason == "requests" else f"{o.limit_tokens} tokens"
        return (f"Rate limit reached for tenant {d.tenant!r}: {limit} per minute. "
                f"Try again in {o.retry_after_s}s.")
    if d.kind is Kind.DENY_BUDGET and o is not None:
        tail = f" Budget resets in {duration(o.budget_reset_us)}." if o.budget_reset_us > 0 else ""
        left = budget_amount(_within(o.budget_remaining, o.budget_limit), d.budget_unit)
        return f"Budget exhausted for tenant {d.tenant!r}: {left} {d.budget_unit} left.{tail}"
    if d.kind is Kind.TOO_LARGE and o is not None:
        if reason == "size":
            return (f"Request too large for tenant {d.tenant!r}: its token estimate exceeds "
                    f"{_core.MAX_TOKENS} tokens, the most any request may count.")
        if reason == "tokens":
            return (f"Request too large for tenant {d.tenant!r}: its token estimate exceeds what "
                    f"the tenant's token bucket holds ({o.limit_tokens} tokens per minute, "
                    "times its burst); it can never be admitted.")
        return (f"Request too large for tenant {d.tenant!r}: its cost exceeds the tenant's whole "
                f"budget of {budget_amount(o.budget_limit, d.budget_unit)} {d.budget_unit}.")
    return d.kind.value


def _provider_message(d: Decision, o) -> str:
    if d.kind is Kind.TOO_LARGE:
        return (f"Request too large for the providers serving model {d.model!r}: its token "
                f"estimate exceeds what any of them takes in one burst at priority "
                f"{d.priority or 'normal'}; it can never be admitted.")
    return (f"Provider capacity for model {d.model!r} is exhausted: every provider serving it "
            f"is at its quota for priority {d.priority or 'normal'}. "
            f"Try again in {o.retry_after_s}s.")


def answer(d: Decision) -> Answer:
    if d.kind is Kind.UNAVAILABLE:
        return Answer(status=503, unavailable=True, body=d.message.encode())
    rate = _rate_headers(d)
    if d.admitted:
        if d.kind is Kind.FAIL_OPEN:
            decision = "fail-open"
        else:
            decision = "downgrade" if d.downgraded else "allow"
        up = [(H_DECISION, decision), (H_TENANT, d.tenant)]
        if d.tier:
            up += [(H_TIER, d.tier), (H_MODEL, d.model)]
        if d.priority:
            up.append((H_PRIORITY, d.priority))
        if d.shadow:
            up.append((H_SHADOW, d.kind.value))
        if d.reservation_id:
            up.append((H_RESERVATION, d.reservation_id))
        if d.provider:
            up.append((H_PROVIDER, d.provider))
        if d.reason:
            up.append((H_REASON, d.reason))
            rate.append((H_REASON, d.reason))
        return Answer(status=200, upstream_headers=tuple(up), response_headers=tuple(rate),
                      metadata=_metadata(d, decision))
    status, type_, code = ERRORS[d.kind]
    headers = [(H_CONTENT_TYPE, "application/json")] + rate
    if d.reason:
        headers.append((H_REASON, d.reason))
    retry = d.outcome.retry_after_s if d.outcome is not None else 0
    if d.reason == REASON_TOKEN_RATE:
        retry = ANOMALY_RETRY_AFTER_S
    if d.kind in (Kind.FAIL_CLOSED, Kind.OVERLOADED):
        retry = FAIL_CLOSED_RETRY_AFTER_S
    if retry > 0 and d.kind in (Kind.DENY_RATE, Kind.DENY_BUDGET, Kind.FAIL_CLOSED,
                                Kind.OVERLOADED):
        headers.append((H_RETRY_AFTER, str(retry)))
    return Answer(status=status, response_headers=tuple(headers),
                  body=error_body(_deny_message(d), type_, code),
                  metadata=_metadata(d, d.kind.value))


def _metadata(d: Decision, decision: str) -> dict:
    """Dynamic metadata for Envoy (namespace set by the transport): routable and loggable
    without trusting a header the client could have sent."""
    md: dict = {"decision": decision, "tenant": d.tenant}
    if d.tier:
        md["tier"] = d.tier
        md["model"] = d.model
    if d.shadow:
        md["shadow"] = d.kind.value
    if d.provider:
        md["provider"] = d.provider
    if d.reason:
        md["reason"] = d.reason
    return md
