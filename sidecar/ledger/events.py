"""The ledger's records. One JSON object per line, told apart by ``type``.

Units: times are integer microseconds since the Unix epoch (UTC), as everywhere in
the sidecar; money is integer nano-USD (1e-9 USD); ``budget_charge`` is in the
budget's own unit (nano-USD for a USD budget, tokens for a token budget), so the sum
of a tenant's ``budget_charge`` over a period equals what its budget was charged.
"""
from __future__ import annotations

from typing import Literal, Union

import msgspec

# How a reservation was closed (UsageEvent.outcome):
#   settled   actual usage replaced the estimate (settled_by: access_log_json, access_log_sse,
#             ext_proc_json, ext_proc_sse, report)
#   released  the upstream failed without usage: the estimate was refunded (settled_by: release)
#   kept      no usage will come (client gone, 2xx without readable usage): charged at the
#             bound of what the provider could have billed (sidecar/settlement/bound.py), or the
#             estimate when that failed; the tokens are the ones charged
#             (settled_by: abandoned, no_usage)
#   expired   no usage came in time: likewise (settled_by: expiry)
Outcome = Literal["settled", "released", "kept", "expired"]


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="usage",
                 omit_defaults=False):
    request_id: str
    tenant: str
    outcome: Outcome
    settled_by: str
    decided_us: int = 0  # 0: the decision is not known here (no reservation: RLS, another replica)
    settled_us: int
    model_asked: str = ""
    model_served: str = ""
    tier: str = ""
    provider: str = ""
    decision: str = ""  # allow, downgrade, fail_open, shadow ("" unknown)
    estimate_tokens: int = 0  # what the reservation held
    input_tokens: int = 0  # all input tokens, cache reads and writes included
    output_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens: written to it
    cost_nano_usd: int = 0  # the usage priced with the policy's pricing
    budget_unit: str = ""  # "usd" (nano-USD), "tokens", "" (no budget)
    budget_charge: int = 0  # what this request finally cost the budget, in its unit
    unpriced: bool = False  # the model had no price: charged at the dearest listed one
    instance: str = ""
    # the provider's answer, when the access log or ext_proc closed the reservation
    # (sidecar/upstream_sli.py); 0 / "": not known (an expiry, a usage report, no reply)
    status: int = 0  # HTTP status of the reply (100..599)
    upstream_us: int = 0  # first byte sent to the provider -> last byte of its reply
    ttft_us: int = 0  # first byte sent -> first byte of the reply (time to first token)
    endpoint: str = ""  # the route's name ("POST /v1/chat/completions"), never the raw path
    # attribution below the tenant (sidecar/attribution.py): the end user's id and the
    # request's tags, when a trusted filter set them ("" / []: none)
    user: str = ""
    tags: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """Unique per event: a request's reservation is closed once per outcome kind (an
        estimate kept for a vanished stream and a usage report arriving later are two
        charges, both real), and a retried or replayed batch repeats the same keys."""
        return (self.tenant, self.request_id, self.outcome)


class RefusalsEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                    tag="refusals"):
    """Requests refused, counted per tenant, reason and minute (a flood of 429s is one
    line per minute, not one per request)."""

    minute_us: int  # start of the UTC minute
    tenant: str
    reason: str  # the decision: rate_limited, budget_exhausted, too_large, unknown_tenant, ...
    count: int
    instance: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (str(self.minute_us), self.tenant, self.reason, self.instance)


class ThresholdEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                     tag="threshold"):
    """A tenant's spend crossed a fraction of its budget for the first time this period."""

    tenant: str
    period_start_us: int
    fraction: float
    budget: int  # in the budget's unit
    spent: int
    budget_unit: str
    at_us: int
    instance: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.tenant, str(self.period_start_us), repr(self.fraction))


class AdminEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="admin"):
    """A change made through the management API (docs/budgets.md, "Management API"): who
    made it, what, and the holder's overlay entry (or freeze mark) before and after, as
    JSON ("" when there was none)."""

    at_us: int
    who: str  # the admin credential's identity: "admin-token", or "loopback <address>"
    action: str  # set, delete, delete_overlay, freeze, unfreeze
    holder: str
    before: str
    after: str
    version: int  # the overlay's version after the change
    instance: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.holder, str(self.version), self.action)


class AnomalyEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                   tag="anomaly"):
    """A tenant's token-rate anomaly flag started (``flagged``) or cleared
    (sidecar/anomaly.py, policy ``anomaly:``): when, the rates it was judged on, and what
    the policy did about it meanwhile."""

    tenant: str
    flagged: bool
    at_us: int
    tokens_per_minute: int  # the tenant's rate now, rounded (at a clear: what it fell to)
    baseline_per_minute: int  # its usual rate, rounded
    factor: float  # the policy's anomaly.factor then
    action: str  # the policy's anomaly.action then: flag, downgrade, refuse
    instance: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.tenant, str(self.at_us), "flagged" if self.flagged else "cleared",
                self.instance)


Event = Union[UsageEvent, RefusalsEvent, ThresholdEvent, AdminEvent, AnomalyEvent]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_line(event: Event) -> bytes:
    return _encoder.encode(event) + b"\n"


def encode_lines(events) -> bytes:
    """Each event's line, joined: ``encode_line`` of each, in one call (0.9 -> 0.4 µs an
    event: msgspec writes the batch into one buffer)."""
    return _encoder.encode_lines(events)


def decode_line(line: bytes) -> Event:
    """One event from its JSON line; raises msgspec.DecodeError / ValidationError."""
    return _decoder.decode(line)
