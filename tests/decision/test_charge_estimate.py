"""The estimate counts everything a provider bills for (docs/contract.md, "Token
estimate"): the whole body (instructions, tools and their schemas, system prompts: every
byte), each image part at the policy's bound, every choice's output; a body Envoy passed
only in part and without content-length is refused with 411, never sized from its first
part."""
from __future__ import annotations

import json
import math

import pytest

from sidecar import contract
from sidecar.decision.estimate import EstimateError, LengthRequired, estimate
from sidecar.model import Kind, Request
from sidecar.policy.load import PolicyError, parse_policy
from tests.support.inproc import RunningSidecar

POLICY = b"""
tiers: [{name: default, model: gpt-4o}]
estimate: {image_tokens: 1500}
"""


def est(doc: object, **kw):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return estimate(parse_policy(POLICY, "<test>"), Request(headers={}, body=body, **kw))


def body_tokens(doc: dict) -> int:
    return math.ceil(len(json.dumps(doc).encode()) / 4)


@pytest.mark.parametrize("doc", [
    # the Responses API's instructions, a chat request's tools and their schemas, an
    # Anthropic system prompt: billed as input, none of them a prompt field
    {"model": "gpt-4o", "input": "hi", "instructions": "z" * 17_000},
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {
         "type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 200}
                                          for i in range(20)}}}}]},
    {"model": "claude", "max_tokens": 10, "system": "s" * 9000,
     "messages": [{"role": "user", "content": "hi"}]},
])
def test_every_byte_of_the_body_counts_as_input(doc):
    assert est(doc).input_tokens == body_tokens(doc)


def test_each_image_part_counts_its_bound_wherever_it_is_and_however_it_is_spelled():
    url = {"url": "https://example.invalid/cat.png"}
    doc = {"model": "gpt-4o", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is it"},
                                     {"type": "image_url", "image_url": url},
                                     {"type": "image_url", "image_url": url}]},
        {"role": "tool", "content": [{"type": "image", "source": {"type": "url", **url}}]}]}
    assert est(doc).input_tokens == body_tokens(doc) + 3 * 1500
    responses = {"model": "gpt-4o", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url["url"]}]}]}
    assert est(responses).input_tokens == body_tokens(responses) + 1500
    # a JSON escape spells "image_url" to the provider's parser: still an image
    raw = (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": '
           b'[{"type": "\\u0069mage_url", "image_url": {"url": "https://example.invalid/x"}}]}]}')
    assert est(raw).input_tokens == math.ceil(len(raw) / 4) + 1500


@pytest.mark.parametrize("fields, output", [
    ({"n": 8}, 8 * 256),  # no maximum named: the default, per choice
    ({"n": 8, "max_tokens": 100}, 800),
    ({"max_completion_tokens": 300}, 300),
    ({"max_output_tokens": 900}, 900),  # the Responses API
    ({"max_tokens": 100, "max_completion_tokens": 300}, 300),  # both: the larger
    ({"best_of": 5, "max_tokens": 20}, 100),  # completions: every candidate is billed
])
def test_the_output_counts_every_choice_and_every_maximum(fields, output):
    doc = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}
    e = est(doc)
    assert e.output_tokens == output
    assert e.choices == max(fields.get("n", 1), fields.get("best_of", 1))


@pytest.mark.parametrize("fields", [{"n": -1}, {"max_output_tokens": "lots"}, {"n": 1.5}])
def test_a_malformed_count_is_the_callers_error(fields):
    with pytest.raises(EstimateError):
        est({"model": "gpt-4o", **fields})


def test_a_partial_body_without_content_length_is_refused_411():
    head = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 65_000
    with pytest.raises(LengthRequired):
        est(head, body_truncated=True)
    # with content-length, it is sized from it (the whole body, not its first part)
    e = estimate(parse_policy(POLICY, "<test>"), Request(
        headers={"content-length": "1000000"}, body=head, body_truncated=True))
    assert e.input_tokens == 250_000


def test_the_411_answer_is_openai_shaped():
    policy = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
defaults: {limits: {tpm: 1000000}}
"""
    with RunningSidecar(policy) as sc:
        d = sc.run(sc.sidecar.service.decider.decide(Request(
            headers={"x-tenant-id": "acme"}, body=b'{"model": "gpt-4o", "messages": "' + b"x" * 1000,
            body_truncated=True)))
    assert d.kind is Kind.LENGTH_REQUIRED and not d.admitted
    ans = contract.answer(d)
    err = json.loads(ans.body)["error"]
    assert ans.status == 411 and err["code"] == "length_required"
    assert "content-length" in err["message"]


@pytest.mark.parametrize("fragment, error", [
    ("pricing: {gpt-4o: {input: 0.1, output: 0.1, max_output_tokens: 0}}",
     "$.pricing.gpt-4o.max_output_tokens: must be in 1..1000000000, got 0"),
    ("estimate: {image_tokens: -1}", "$.estimate.image_tokens: must be in 0..1000000000, got -1"),
])
def test_the_bounds_settings_are_checked(fragment, error):
    with pytest.raises(PolicyError) as exc:
        parse_policy(f"tiers: [{{name: default, model: gpt-4o}}]\n{fragment}\n".encode(), "p.yaml")
    assert any(error in line for line in exc.value.errors), exc.value.errors


def test_images_are_found_where_the_schemas_nest_them_and_nothing_else_counts():
    url = "https://example.invalid/x.png"
    cases = [
        # an Anthropic tool result's content, a Responses tool output
        ({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "image", "source": {"type": "url", "url": url}}]}]}]}, 1),
        ({"model": "gpt-4o", "input": [{"type": "function_call_output", "call_id": "c",
                                        "output": [{"type": "input_image", "image_url": url}]}]},
         1),
        # text that says "image", token ids, a "type" that is no string: no image
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": 'a "type": "image"'}]}, 0),
        ({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4, 5]]}, 0),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": 7}]}]}, 0),
    ]
    for doc, images in cases:
        assert est(doc).input_tokens == body_tokens(doc) + images * 1500, doc


@pytest.mark.parametrize("headers,body,fragment", [
    ({"content-encoding": "gzip"}, b"\x1f\x8b\x08\x00", "sent uncompressed"),
    ({"content-encoding": " BR "}, b"{}", "sent uncompressed"),
    ({}, json.dumps({"model": "gpt-4o", "n": 8}).encode("utf-16-le"), "UTF-8"),
    ({}, json.dumps({"model": "gpt-4o"}).encode("utf-16"), "UTF-8"),  # with its BOM
    ({}, json.dumps({"model": "gpt-4o"}).encode("utf-32-be"), "UTF-8"),
])
def test_a_body_the_gateway_cannot_read_as_the_provider_will_is_refused(headers, body, fragment):
    """A compressed or UTF-16/32 body hides its n, max-output fields and "stream" from the
    decision and Envoy's usage filter while the provider reads them: refused, 400."""
    with pytest.raises(EstimateError, match=fragment):
        estimate(parse_policy(POLICY, "<test>"), Request(headers=headers, body=body,
                                                         body_truncated=True))
    # identity and plain UTF-8 JSON are what every client sends
    e = estimate(parse_policy(POLICY, "<test>"), Request(
        headers={"content-encoding": "identity"}, body=b'{"model": "gpt-4o"}'))
    assert e.input_tokens > 0
