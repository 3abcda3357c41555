"""A request for a model its policy does not price: the provider would serve and bill it at
its own price, which the gateway cannot know (the red team's o1-pro on the gpt-4o tier
was charged 1.7% of its bill at the dearest listed price). A policy that prices models
refuses such requests unless it says `unpriced_models: dearest`."""
from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.backends.memory import MemoryBackend
from sidecar.model import Kind, Request
from sidecar.policy.load import parse_policy
from sidecar.service import DecisionService

PRICED = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers:
  - {name: default, model: gpt-4o}
  - {name: compact, model: house-model}
pricing: {gpt-4o: {input: 2.5, output: 10}}
defaults: {limits: {rpm: 100, tpm: 100000}}
%s
"""
UNPRICED = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
defaults: {limits: {rpm: 100, tpm: 100000}, budget: {tokens: 1000000, period: day}}
"""


def decide(policy_text: str, model: str):
    svc = DecisionService(parse_policy(policy_text.encode(), "<test>"), MemoryBackend())
    body = json.dumps({"model": model, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    return asyncio.run(svc.decide(Request(headers={"x-tenant-id": "t"}, body=body)))


@pytest.mark.parametrize("policy, model, kind", [
    (PRICED % "", "o1-pro", Kind.BAD_REQUEST),  # refused by default
    (PRICED % "", "gpt-4o", Kind.ALLOW),  # priced
    (PRICED % "", "house-model", Kind.ALLOW),  # a tier's model: the operator's choice
    (PRICED % "unpriced_models: dearest", "o1-pro", Kind.ALLOW),  # charged at the dearest
    (UNPRICED, "anything", Kind.ALLOW),  # no pricing at all: token budgets need no price
])
def test_a_model_the_policy_does_not_price_is_refused_unless_it_says_otherwise(policy, model,
                                                                                kind):
    d = decide(policy, model)
    assert d.kind is kind
    if kind is Kind.BAD_REQUEST:
        assert "no price for it" in d.message and model in d.message


def test_the_setting_is_checked():
    from sidecar.policy.load import PolicyError

    with pytest.raises(PolicyError, match="unpriced_models"):
        parse_policy((PRICED % "unpriced_models: cheapest").encode(), "<test>")
