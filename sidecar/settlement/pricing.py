"""What a request's usage costs under the policy: an unpriced model is never free."""
from __future__ import annotations

import functools

from sidecar.policy.load import CompiledPolicy
from sidecar.settlement.usage import ModelPrice, Usage, cost_nano, model_price

# a policy price (a frozen Struct: equal prices, one entry) in nano-USD per token, converted
# once rather than at every settlement (1.2 -> 0.2 µs); bounded by the prices policies list
_nano_price = functools.lru_cache(maxsize=4096)(model_price)


def price(policy: CompiledPolicy, model: str, usage: Usage) -> tuple[int, bool]:
    """(nano-USD, unpriced) of the usage: a model the policy has no price for is charged
    at its dearest listed price (docs/usage.md)."""
    listed = policy.pricing.get(model)
    if listed is not None:
        return cost_nano(usage, _nano_price(listed)), False
    inp, out = policy.dearest_price()
    return cost_nano(usage, ModelPrice(inp, out, inp, inp)), True
