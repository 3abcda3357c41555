"""Red team, round 2: budget holders through the decision flow, in process (embedded
backend, the suite's manual clock): what a client can choose about its own path."""
from __future__ import annotations


from sidecar.model import Kind
from tests.decision.test_holders import ask, flows, spent


def test_a_models_cap_is_not_escaped_by_the_providers_dated_name_for_that_model():
    alias = "gpt-4o-2024-08-06"  # what OpenAI serves as gpt-4o, and names in its usage
    f, backend, _ = flows()
    assert ask(f, "batch-key", "gpt-4o", 1500).kind is Kind.ALLOW  # its 1,500 a day of gpt-4o
    assert ask(f, "batch-key", "gpt-4o", 100).kind is Kind.DENY_BUDGET
    # the same model under another name reaches the provider as the client wrote it (only a
    # downgrade rewrites the body) and is routed to the tier of gpt-4o
    d = ask(f, "batch-key", alias, 1000)
    assert d.kind is not Kind.ALLOW, (d.kind, d.model)
    assert spent(backend, "batch-key", "batch-key{m:gpt-4o}") == [1500, 1500]
