"""What a request's usage costs under the policy: an unpriced model is never free."""
from __future__ import annotations

from sidecar.policy.load import CompiledPolicy
from sidecar.settlement.usage import ModelPrice, Usage, cost_nano, model_price


def price(policy: CompiledPolicy, model: str, usage: Usage) -> tuple[int, bool]:
    """(nano-USD, unpriced) of the usage: a model the policy has no price for is charged
    at its dearest listed price (docs/usage.md)."""
    listed = policy.pricing.get(model)
    if listed is not None:
        return cost_nano(usage, model_price(listed)), False
    inp, out = policy.dearest_price()
    return cost_nano(usage, ModelPrice(inp, out, inp, inp)), True
