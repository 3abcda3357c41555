"""What a request whose usage cannot be read is charged: what the provider could have billed.

A reply the sidecar cannot read (no usage in it, compressed, over the usage filter's
limits, the client gone before the usage chunk, no access-log entry within the
reservation's life) would otherwise leave the admission estimate charged, and the client
controls the estimate: without max_tokens it assumes 256 output tokens, and a client that
wants a cheap month makes its usage unreadable. So such a reservation is settled at a
bound of the provider's bill instead (docs/usage.md, "When usage cannot be read"):

- input: the estimate's, from the whole body (its size and its images);
- output: the request's max_tokens / max_completion_tokens / max_output_tokens, else the
  served model's `max_output_tokens` (policy `pricing`; DEFAULT_MAX_OUTPUT_TOKENS when
  absent), never more than that maximum, times the choices (`n`, `best_of`).
- a request without a body (a GET of a model list): no provider generates from it; its
  bound is what its estimate charged.

The reply's size as Envoy saw it is not used to lower the bound: reasoning models bill
output tokens that never appear in the reply, so its bytes bound nothing.

The settlement is the ordinary one (sidecar/settlement/service.py, charge_at_bound):
idempotent per reservation id, it moves the budget, the tenant's token bucket and the
provider's bucket from the estimate to the bound, and records the tokens and their price
in the ledger and the durable spend, whatever the budget's unit. When the backend cannot take it, the
estimate stays charged and is recorded as such, with its tokens and price.
"""
from __future__ import annotations

from sidecar.model import Estimate
from sidecar.policy.load import CompiledPolicy
from sidecar.settlement.book import Reservation

# Output tokens one choice may bill when neither the request nor the policy says: the
# largest output current models allow (OpenAI's gpt-5 and o-series, Anthropic's with
# extended output: 128,000). An operator sets each model's own in `pricing`.
DEFAULT_MAX_OUTPUT_TOKENS = 128_000
# kt_settlements_total{source} of a settlement at the bound
SOURCE = "bound"
# the most tokens of one kind a settlement takes (settle_usage): a bound beyond it (a
# huge n without max_tokens, which the core's trimming admitted) is charged at it rather
# than refused, which would leave only the estimate charged
MAX_BOUND_TOKENS = 10**9


def max_output_tokens(policy: CompiledPolicy, model: str) -> int:
    price = policy.pricing.get(model)
    most = price.max_output_tokens if price is not None else None
    return DEFAULT_MAX_OUTPUT_TOKENS if most is None else most


def output_bound(policy: CompiledPolicy, model: str, est: Estimate,
                 charged_tokens: int) -> int:
    """The most output the provider could bill for ``est``'s request served by ``model``
    (``charged_tokens``: what the decision charged, the bound of a request without body)."""
    if not est.shown:
        return max(charged_tokens - est.input_tokens, 0)
    most = max_output_tokens(policy, model)
    per_choice = most if est.asked_output < 0 else min(est.asked_output, most)
    return min(per_choice * est.choices, MAX_BOUND_TOKENS)


def tokens(res: Reservation) -> tuple[int, int]:
    """(input, output) tokens a reservation is charged at when its usage cannot be read.
    A reservation made without a bound (a decision Redis applied after its timeout, kept
    because the request may have gone on) stays at what it charged: whether the request
    reached a provider at all is unknown (Envoy's failure mode may have refused it, and
    then no usage ever comes), so its model's whole output would charge a refused request."""
    if res.bound_output >= 0:
        return min(res.bound_input, MAX_BOUND_TOKENS), res.bound_output
    return estimate_tokens(res)


def estimate_tokens(res: Reservation) -> tuple[int, int]:
    """(input, output) of the estimate a reservation charged: its input is the request's
    estimated input (the core trims only the output to fit a bucket)."""
    inp = min(res.bound_input, res.charged_tokens)
    return inp, res.charged_tokens - inp
