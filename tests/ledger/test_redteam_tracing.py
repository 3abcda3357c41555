"""Red team of the traces (sidecar/tracing.py): a client's own words end up in span
attributes; none may make a span, queued until the collector takes it, as large as its
request body."""
from __future__ import annotations

import json

from sidecar.model import Kind, Request
from sidecar.tracing import MAX_ATTRIBUTE_CHARS
from tests.ledger.test_tracing import POLICY, Receiver, attributes
from tests.support.inproc import RunningSidecar


def test_a_clients_huge_model_name_is_cut_in_the_span_it_makes():
    """Finding 6 (fixed here): under `unpriced_models: dearest` a request may name any
    model, ~64 KiB of it; the span carried it whole (twice: the name and
    gen_ai.request.model), so 8,192 queued spans of a stalled collector held ~1 GB."""
    policy = POLICY.replace("tenant: {", "unpriced_models: dearest\ntenant: {")
    asked = "m" * 60_000
    body = json.dumps({"model": asked, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with Receiver() as receiver:
        with RunningSidecar(policy, config={"otlp_endpoint": receiver.url}) as sc:
            flows = sc.sidecar.service

            async def main():
                d = await flows.decider.decide(Request(headers={"x-tenant-id": "acme"},
                                                       body=body))
                assert d.kind is Kind.ALLOW and d.reservation_id
                await flows.settlement.settle_usage(d.reservation_id, "acme", None, 10, 5,
                                                    "report")

            sc.run(main())
    assert len(receiver.spans) == 1
    _, span = receiver.spans[0]
    got = attributes(span)
    assert got["gen_ai.request.model"] == asked[:MAX_ATTRIBUTE_CHARS]
    assert span.name == "chat " + asked[:MAX_ATTRIBUTE_CHARS]
    assert got["kt.tenant"] == "acme" and got["gen_ai.usage.input_tokens"] == 10
