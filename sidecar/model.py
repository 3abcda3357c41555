"""The small values that flow through the sidecar, transport → estimate → decision → contract."""
from __future__ import annotations

import enum
from typing import Optional

import msgspec

from sidecar import _core


MAX_TENANT_LEN = 128
# metric labels (and spend cells) of tenants the policy does not name, and of models
# outside its tiers and pricing: one series each, whatever a client invents
OTHER_TENANTS = "_other"
OTHER_MODELS = "_other"


def valid_tenant(t: str) -> bool:
    """A tenant name the sidecar keeps state under: 1..MAX_TENANT_LEN printable
    characters without braces (braces are Redis hash tags)."""
    return 0 < len(t) <= MAX_TENANT_LEN and t.isprintable() and not any(c in t for c in "{}")


class Request(msgspec.Struct, frozen=True):
    """What a transport extracted from Envoy's call; nothing protocol-specific."""

    headers: dict[str, str]  # lower-cased names
    body: bytes = b""
    body_truncated: bool = False
    tenant: Optional[str] = None  # set when the transport carries it out of band (RLS descriptor)
    model: Optional[str] = None
    tokens: Optional[int] = None  # an explicit token count from the transport (RLS hits_addend)
    request_id: str = ""


class Estimate(msgspec.Struct, frozen=True):
    """Tokens a request is expected to use. ``firm_tokens`` is the part that is
    known (prompt + an explicit max_tokens); the rest is a defaulted guess."""

    input_tokens: int
    output_tokens: int
    firm_tokens: int
    model: Optional[str]
    source: str  # "header", "body", "transport" or "default"
    # what the body asks for, for the charge when usage cannot be read (sidecar/settlement/bound.py):
    # the most output tokens per choice (-1: it names none), and how many choices
    asked_output: int = -1
    choices: int = 1
    shown: bool = False  # the request had a body (whole or in part)
    # the provider adds stored input to the body's (a Responses previous_response_id or
    # conversation): its input bound is the model's context window (sidecar/settlement/bound.py)
    stored_input: bool = False


class Kind(str, enum.Enum):
    """Every answer the sidecar can give; contract.py maps each to status and headers."""

    ALLOW = "allow"
    DOWNGRADE = "downgrade"
    DENY_RATE = "rate_limited"  # RPM or TPM bucket empty
    DENY_BUDGET = "budget_exhausted"  # budget for the period spent
    TOO_LARGE = "too_large"  # can never fit the tenant's bucket or budget
    UNKNOWN_TENANT = "unknown_tenant"
    MISSING_TENANT = "missing_tenant"
    BAD_REQUEST = "bad_request"
    LENGTH_REQUIRED = "length_required"  # a chunked body beyond what Envoy passes on
    FAIL_OPEN = "fail_open"  # backend failed; configured to allow
    FAIL_CLOSED = "fail_closed"  # backend failed; configured to deny
    UNAVAILABLE = "unavailable"  # backend failed; Envoy's own failure mode decides
    # the store answered, but this sidecar could not decide in time (its own load): shed
    OVERLOADED = "overloaded"
    # the holder was frozen through the management API (docs/budgets.md)
    FROZEN = "frozen"


# the kinds that let a request through (a set: read on every decision, a few times)
_ADMITTED = frozenset((Kind.ALLOW, Kind.DOWNGRADE, Kind.FAIL_OPEN))

CORE_KINDS = {
    _core.ALLOW: Kind.ALLOW,
    _core.DOWNGRADE: Kind.DOWNGRADE,
    _core.DENY_RATE: Kind.DENY_RATE,
    _core.DENY_BUDGET: Kind.DENY_BUDGET,
    _core.TOO_LARGE: Kind.TOO_LARGE,
}
REASONS = {_core.R_NONE: "", _core.R_RPM: "requests", _core.R_TPM: "tokens",
           _core.R_BUDGET: "budget", _core.R_SIZE: "size", _core.R_PROVIDER: "provider"}
# Decision.reason: every provider serving the tier was full, the request went one tier
# down; every provider that could take the request was full, it was refused
REASON_PROVIDER_FULL = "provider_full"
REASON_PROVIDER_QUOTA = "provider_quota"
REASON_TOKEN_RATE = "token_rate_anomaly"  # the tenant's token rate is far above its usual
REASON_FROZEN = "frozen"  # the holder is frozen (management API): refused, whatever its limits


class Decision(msgspec.Struct, frozen=True):
    """The service's answer; the contract turns it into headers, status and body.

    ``shadow`` is set when shadow mode turned a refusal into an allow: ``kind``
    then says what would have happened."""

    kind: Kind
    tenant: str = ""
    tier: str = ""
    model: str = ""
    priority: str = ""
    outcome: Optional[_core.Outcome] = None
    message: str = ""
    shadow: bool = False
    downgraded: bool = False  # the request goes to a lower tier than it asked for
    budget_unit: str = ""
    # the id the request's reservation (and its settlement) is keyed by: made by the
    # sidecar, sent to the upstream as x-kt-reservation, never taken from the client
    reservation_id: str = ""
    provider: str = ""  # the provider charged with it (docs/providers.md)
    reason: str = ""  # why a downgrade or refusal came from provider quota (REASON_*)

    @property
    def admitted(self) -> bool:
        return self.shadow or self.kind in _ADMITTED
