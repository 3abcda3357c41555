"""What a request whose usage cannot be read is charged: what the provider could have billed.

A reply the sidecar cannot read (no usage in it, compressed, over the usage filter's
limits, the client gone before the usage chunk, no access-log entry within the
reservation's life) would otherwise leave the admission estimate charged, and the client
controls the estimate: without max_tokens it assumes 256 output tokens, and a client that
wants a cheap month makes its usage unreadable. So such a reservation is settled at a
bound of the provider's bill instead (docs/usage.md, "When usage cannot be read"):

- input: the estimate's, from the whole body (its size and its images); when the provider
  adds input it stored (a Responses `previous_response_id` or `conversation`), which the
  body does not show, the served model's `max_input_tokens` (its context window; policy
  `pricing`; DEFAULT_MAX_INPUT_TOKENS when absent) if that is larger;
- output: the request's max_tokens / max_completion_tokens / max_output_tokens, else the
  served model's `max_output_tokens` (policy `pricing`; DEFAULT_MAX_OUTPUT_TOKENS when
  absent), never more than that maximum, times the choices (`n`, `best_of`).
- a request without a body (a GET of a model list): no provider generates from it; its
  bound is what its estimate charged.

The decision sees at most the first part of a body (ext_authz's max_request_bytes, 64 KiB):
a field written beyond it (`n`, a max-output field, `previous_response_id`) is read by
Envoy's usage filter (lua/envoy_usage.lua), which sees the whole body as it streams and
leaves those fields, verbatim, in its dynamic metadata (key BODY_METADATA_KEY) for a body
over that part; the access log and ext_proc bring them to the settlement, where they
replace the decision's view of the output and add to its input (``with_body_seen``). A
field written twice counts as the last one (what JSON parsers, and so providers, keep);
a value the filter could not read (over its size limit, not a number) counts at its
most: a max-output field as absent (the model's maximum), a count of choices as
MAX_BOUND_TOKENS of output; so does every field of a report that cannot be read.

The reply's size as Envoy saw it is not used to lower the bound: reasoning models bill
output tokens that never appear in the reply, so its bytes bound nothing.

The settlement is the ordinary one (sidecar/service.py, settle_usage): idempotent per
reservation id, it moves the budget, the tenant's token bucket and the provider's bucket
from the estimate to the bound, and records the tokens and their price in the ledger and
the durable spend, whatever the budget's unit. When the backend cannot take it, the
estimate stays charged and is recorded as such, with its tokens and price.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import msgspec

from sidecar.backends.base import BackendError
from sidecar.model import Estimate
from sidecar.settle_outcome import SettlementPending

if TYPE_CHECKING:
    from sidecar.policy.load import CompiledPolicy
    from sidecar.service import DecisionService, Reservation

log = logging.getLogger("kt.bound")

# Output tokens one choice may bill when neither the request nor the policy says: the
# largest output current models allow (OpenAI's gpt-5 and o-series, Anthropic's with
# extended output: 128,000). An operator sets each model's own in `pricing`.
DEFAULT_MAX_OUTPUT_TOKENS = 128_000
# Input tokens one request may bill when the provider adds a stored conversation and the
# policy does not say: the largest context window of current models (OpenAI's gpt-4.1,
# Gemini's: about 1M). An operator sets each model's own in `pricing` (gpt-4o: 128,000).
DEFAULT_MAX_INPUT_TOKENS = 1_000_000
# the usage filter's view of a whole request body, in its dynamic metadata (namespace
# contract.USAGE_METADATA_NAMESPACE): a JSON object of the fields below, values verbatim
BODY_METADATA_KEY = "request"
# longer text is not the filter's (it keeps seven values of at most 2 KiB and their keys)
BODY_SEEN_MAX = 16 * 1024
# kt_settlements_total{source} of a settlement at the bound
SOURCE = "bound"
# the most tokens of one kind a settlement takes (sidecar/service.py, settle_usage): a
# bound beyond it (a huge n without max_tokens, which the core's trimming admitted) is
# charged at it rather than refused, which would leave only the estimate charged
MAX_BOUND_TOKENS = 10**9


def max_output_tokens(policy: "CompiledPolicy", model: str) -> int:
    price = policy.pricing.get(model)
    most = price.max_output_tokens if price is not None else None
    return DEFAULT_MAX_OUTPUT_TOKENS if most is None else most


def max_input_tokens(policy: "CompiledPolicy", model: str) -> int:
    price = policy.pricing.get(model)
    most = price.max_input_tokens if price is not None else None
    return DEFAULT_MAX_INPUT_TOKENS if most is None else most


def _output(policy: "CompiledPolicy", model: str, asked_output: int, choices: int) -> int:
    most = max_output_tokens(policy, model)
    per_choice = most if asked_output < 0 else min(asked_output, most)
    return min(per_choice * max(choices, 1), MAX_BOUND_TOKENS)


def output_bound(policy: "CompiledPolicy", model: str, est: Estimate,
                 charged_tokens: int) -> int:
    """The most output the provider could bill for ``est``'s request served by ``model``
    (``charged_tokens``: what the decision charged, the bound of a request without body)."""
    if not est.shown:
        return max(charged_tokens - est.input_tokens, 0)
    return _output(policy, model, est.asked_output, est.choices)


def stored_input_bound(policy: "CompiledPolicy", model: str, est: Estimate) -> int:
    """The input a stored conversation may add to ``est``'s request: the model's context
    window when the body names one (0: none named, the body's input is the bound)."""
    return max_input_tokens(policy, model) if est.stored_input else 0


class _BodySeen(msgspec.Struct):
    """The usage filter's report (lua/envoy_usage.lua, REQUEST_PATHS): each value verbatim,
    or the string "?" when it could not keep it."""

    n: msgspec.Raw = msgspec.Raw()
    best_of: msgspec.Raw = msgspec.Raw()
    max_tokens: msgspec.Raw = msgspec.Raw()
    max_completion_tokens: msgspec.Raw = msgspec.Raw()
    max_output_tokens: msgspec.Raw = msgspec.Raw()
    previous_response_id: msgspec.Raw = msgspec.Raw()
    conversation: msgspec.Raw = msgspec.Raw()


_decode_seen = msgspec.json.Decoder(_BodySeen).decode
_decode_any = msgspec.json.Decoder().decode
_UNREAD = -2  # a value present that cannot be read as a count


class BodySeen(NamedTuple):
    """What a whole request body says the provider may bill, as the usage filter read it."""

    asked_output: int  # the most output per choice it names; -1: none (the model's most)
    choices: int
    stored_input: bool  # a previous_response_id or conversation


def _count(raw: msgspec.Raw) -> Optional[int]:
    """A count as a provider may read it: None when absent (or null), _UNREAD when it is
    not a number (or a string of digits) the filter could keep; fractions round up."""
    if len(raw) == 0:
        return None
    try:
        value = _decode_any(raw)
    except (msgspec.DecodeError, RecursionError):
        return _UNREAD
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit() and value.isascii():
        value = int(value.strip()) if len(value) <= 18 else MAX_BOUND_TOKENS
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _UNREAD
    if isinstance(value, float):
        if not math.isfinite(value):
            return _UNREAD
        value = math.ceil(value)
    if value < 0:  # refused by a provider, as by the decision: no count we can use
        return _UNREAD
    return min(value, MAX_BOUND_TOKENS)


# a report that cannot be read: every field at its most (a valid JSON body never makes one;
# a body the provider's parser took and ours did not, NaN say, must not leave one choice)
_UNREAD_BODY = BodySeen(-1, MAX_BOUND_TOKENS, True)


def body_seen(text: Optional[str]) -> Optional[BodySeen]:
    """The usage filter's report, or None when it made none (a body the decision saw
    whole); one that cannot be read counts every field at its most."""
    if text is None:
        return None
    if len(text) > BODY_SEEN_MAX:
        return _UNREAD_BODY
    try:
        seen = _decode_seen(text.encode())
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return _UNREAD_BODY
    asked, unread = -1, False
    for raw in (seen.max_tokens, seen.max_completion_tokens, seen.max_output_tokens):
        n = _count(raw)
        unread = unread or n == _UNREAD
        if n is not None and n >= 0:  # several named: the largest, as the estimate
            asked = max(asked, n)
    if unread:
        asked = -1  # one it could not read: the model's most
    choices = 1
    for raw in (seen.n, seen.best_of):
        n = _count(raw)
        if n == _UNREAD:
            choices = MAX_BOUND_TOKENS  # unreadable: at its most
        elif n is not None:
            choices = max(choices, n)
    # the filter reports these two as true (present, not null)
    stored = any(len(raw) > 0 and bytes(raw).strip() not in (b"null", b"false")
                 for raw in (seen.previous_response_id, seen.conversation))
    return BodySeen(asked, choices, stored)


def with_body_seen(policy: "CompiledPolicy", res: "Reservation",
                   text: Optional[str]) -> "Reservation":
    """``res`` with its bound from the usage filter's view of the whole body, when the
    filter reported one: that view replaces the decision's output (the decision saw only
    the first part of such a body: no n, no max_tokens) and adds a stored conversation's
    input. A reservation without a bound (bound_output -1) stays as it is."""
    seen = body_seen(text)
    if seen is None or res.bound_output < 0:
        return res
    out = _output(policy, res.model, seen.asked_output, seen.choices)
    stored = max(res.stored_input, max_input_tokens(policy, res.model) if seen.stored_input
                 else 0)
    return dataclasses.replace(res, bound_output=out, stored_input=stored)


def tokens(res: "Reservation") -> tuple[int, int]:
    """(input, output) tokens a reservation is charged at when its usage cannot be read.
    A reservation made without a bound (a decision Redis applied after its timeout, kept
    because the request may have gone on) stays at what it charged: whether the request
    reached a provider at all is unknown (Envoy's failure mode may have refused it, and
    then no usage ever comes), so its model's whole output would charge a refused request."""
    if res.bound_output >= 0:
        return min(max(res.bound_input, res.stored_input), MAX_BOUND_TOKENS), res.bound_output
    return estimate_tokens(res)


def estimate_tokens(res: "Reservation") -> tuple[int, int]:
    """(input, output) of the estimate a reservation charged: its input is the request's
    estimated input (the core trims only the output to fit a bucket)."""
    inp = min(res.bound_input, res.charged_tokens)
    return inp, res.charged_tokens - inp


async def charge(service: "DecisionService", request_id: str, res: "Reservation",
                 outcome: str, why: str, local: bool = True) -> None:
    """Settle ``res`` (already out of the book, or taken from another replica's shared
    record: ``local`` False) at the bound; never raises. ``outcome`` is the ledger's
    (``kept``, ``expired``), ``why`` its settled_by and the metric's reason."""
    from sidecar.service import UsageError

    inp, out = tokens(res)
    try:
        settled = await service.settle_usage(request_id, res.tenant, res.model, inp, out,
                                             SOURCE, settled_by=why, reservation=res,
                                             outcome=outcome, reservation_local=local)
    except SettlementPending as exc:
        # sent, its reply lost: the store is asked whether it was applied, and the answer
        # recorded then (settled at the bound; kept, with the estimate, if it never comes)
        log.warning("charge at the bound of request %s of tenant %s not confirmed yet: %s",
                    request_id, res.tenant, exc)
        return
    except (UsageError, BackendError) as exc:
        log.warning("request %s of tenant %s not charged at its bound (%d input, %d output "
                    "tokens): %s; its estimate stays charged", request_id, res.tenant, inp,
                    out, exc)
        service.metrics.reservations_closed.labels("kept_" + why).inc()
        service.keep_estimate(request_id, res, outcome, why)
        return
    if settled.applied:  # else this id was settled before: nothing changed, nothing counted
        service.metrics.reservations_closed.labels("bound_" + why).inc()


def charge_soon(service: "DecisionService", request_id: str, res: "Reservation",
                outcome: str, why: str) -> None:
    """``charge`` in the background, for callers that cannot wait (the reservation book's
    expiry, ext_proc's stream end); kept referenced until done."""
    try:
        task = asyncio.get_running_loop().create_task(
            charge(service, request_id, res, outcome, why))
    except RuntimeError:  # not on the event loop: never in the sidecar itself
        log.error("request %s of tenant %s not charged at its bound: called off the event "
                  "loop; its estimate stays charged", request_id, res.tenant)
        service.keep_estimate(request_id, res, outcome, why)
        return
    service.track(task)
