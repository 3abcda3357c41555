"""Request → Estimate: how many tokens a request will use, before it runs.

Evidence (docs/contract.md): the OpenAI-style JSON body Envoy forwards
(`with_request_body`: prompt size and `max_tokens`), an explicit count (the
`x-kt-estimated-tokens` header, or RLS `hits_addend`) only when the policy says a
trusted filter sets it (`estimate: {trusted: true}`), then the policy's default.
The body counts whole (docs/contract.md, "Token estimate"): its size and its images as
input, each choice (`n`) its `max_tokens` of output. Every byte of it is the client's
until a filter vouches for it, so an explicit count never lowers the estimate below what
the body shows, and no estimate is ever zero: a request is never free. A malformed count or body is the caller's error (400), never a
guess.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import msgspec

from sidecar import _core
from sidecar.model import Estimate, Request
from sidecar.policy.load import CompiledPolicy

MAX_TOKENS = 1_000_000_000  # an estimate above this is a malformed request, not a big one
# the least any request is estimated at: 0 would admit it against an exhausted budget
MIN_TOKENS = 1


class EstimateError(ValueError):
    """The request carries an estimate or body that cannot be read; the message says which."""


class LengthRequired(EstimateError):
    """A body larger than what Envoy passes on, sent without content-length: its size, and
    whatever it says after the part Envoy passed (max_tokens, n), cannot be known (411)."""


class _ChatBody(msgspec.Struct):
    """The fields of an OpenAI chat/completions/responses/embeddings or Anthropic messages
    body that say how much output may be billed. The input is the whole body's size: every
    field a provider bills as input (messages, prompt, input, instructions, system, tools
    and their schemas, response formats) is in it, and so are fields no list here names."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    max_output_tokens: Optional[int] = None  # the Responses API
    n: Optional[int] = None  # choices, each billed its own output
    best_of: Optional[int] = None  # completions: generated server-side, each billed


_decode_body = msgspec.json.Decoder(_ChatBody).decode
# content parts a provider prices as images: OpenAI chat ("image_url"), responses
# ("input_image"), Anthropic ("image")
IMAGE_PART_TYPES = frozenset(("image_url", "input_image", "image"))


# JSON escapes of the characters an image part's "type" is spelled with (a-z, "_"): a
# decoded "\u0069mage_url" is "image_url". Text escapes (accents, CJK) are others.
_ESCAPED_NAME_CHARS = (rb"\u005", rb"\u006", rb"\u007")


def _image_parts(body: bytes) -> int:
    """How many image parts the body holds, wherever they are nested (messages, tool
    results, input items). Read only when the bytes could name one: "image" in clear, or
    an escape that could spell it."""
    if b"image" not in body and not any(e in body for e in _ESCAPED_NAME_CHARS):
        return 0
    n = 0
    stack = [msgspec.json.decode(body)]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") in IMAGE_PART_TYPES:
                n += 1
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return n


def _parse_count(value: Union[str, int], what: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise EstimateError(f"{what} must be a non-negative integer, got {str(value)[:40]!r}") from None
    if n < 0 or n > MAX_TOKENS:
        raise EstimateError(f"{what} must be between 0 and {MAX_TOKENS}, got {n}")
    return n


# content-length digits read at most: more is beyond the cap whatever they say (and int()
# of thousands of digits is slow, or refused by Python)
_LENGTH_DIGITS_MAX = 18


def _content_length_tokens(req: Request, chars_per_token: float) -> int:
    """Prompt tokens of a partial body, sized from what arrived and from content-length
    (the client's claim: it can only make its own estimate larger). Capped at one more
    than the core counts (_core.MAX_TOKENS + 1), so a claim beyond it is refused as too
    large (413) and no product of it can wrap: a claimed 2e16 bytes once became 5e15
    tokens and a negative cost."""
    cap = _core.MAX_TOKENS + 1
    size = len(req.body)
    length = req.headers.get("content-length", "").strip()
    if not (length.isascii() and length.isdigit()):
        # sent in chunks: how much more comes after the part Envoy passed is unknown, and
        # so is what it says (max_tokens, n): refused rather than guessed
        raise LengthRequired(
            f"a request body larger than the {size} bytes the gateway reads before deciding "
            "must be sent with content-length (a body sent in chunks beyond that cannot be "
            "counted)")
    if len(length) > _LENGTH_DIGITS_MAX:
        return cap
    size = max(size, int(length))
    tokens = size / chars_per_token
    return math.ceil(tokens) if tokens < cap else cap


def estimate(policy: CompiledPolicy, req: Request) -> Estimate:
    cfg = policy.estimate
    body: Optional[_ChatBody] = None
    images = 0
    if req.body and not req.body_truncated:
        try:
            body = _decode_body(req.body)
            images = _image_parts(req.body)
        except msgspec.ValidationError as exc:
            raise EstimateError(f"request body: {exc}") from None
        except msgspec.DecodeError:
            raise EstimateError("request body is not valid JSON") from None
        except RecursionError:
            # msgspec bounds its depth by the interpreter's recursion limit and says so
            raise EstimateError("request body is nested too deeply") from None
    model = req.model or (body.model if body is not None else None)

    explicit: Optional[int] = None
    if cfg.trusted:  # else the count is the client's own word: ignored
        if req.tokens is not None:
            explicit = _parse_count(req.tokens, "token count")
        else:
            header = req.headers.get(cfg.header)
            if header is not None:
                explicit = _parse_count(header.strip(), f"header {cfg.header}")
        if explicit == 0:
            explicit = None  # "no estimate" (Envoy's RLS config sends 0 for an absent header)

    # what the body shows: its whole size and images as input; if it names one, the most
    # each choice may answer, times the choices
    input_tokens = 0
    asked: Optional[int] = None
    choices = 1
    if body is not None:
        input_tokens = math.ceil(len(req.body) / cfg.chars_per_token)
        input_tokens = min(input_tokens + images * cfg.image_tokens, _core.MAX_TOKENS + 1)
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = getattr(body, name)
            if value is not None:  # several named: the provider's choice is not ours to guess
                n = _parse_count(value, name)
                asked = n if asked is None else max(asked, n)
        for name in ("n", "best_of"):
            value = getattr(body, name)
            if value is not None:
                choices = max(choices, _parse_count(value, name))
    elif req.body_truncated:
        # Envoy sent only the first part of a large body: size it from content-length.
        input_tokens = _content_length_tokens(req, cfg.chars_per_token)
    shown = body is not None or req.body_truncated

    if asked is not None:  # all of it firm: the prompt and the most it may answer
        out = min(asked * choices, _core.MAX_TOKENS + 1)
        if explicit is not None:
            out = max(out, explicit - input_tokens)
        out = max(out, MIN_TOKENS - input_tokens)
        return Estimate(input_tokens, out, input_tokens + out, model, "body", asked, choices)
    if explicit is not None:
        # a trusted count, never below the prompt the body shows; the part beyond the
        # prompt counts as output, the dearer side of every price list
        out = max(explicit - input_tokens, 0)
        return Estimate(input_tokens, out, input_tokens + out, model,
                        "header" if req.tokens is None else "transport", -1, choices)
    if shown:  # the prompt is firm; the output a default, trimmed to fit a small bucket
        out = min(cfg.default_output_tokens * choices, _core.MAX_TOKENS + 1)
        return Estimate(input_tokens, max(out, MIN_TOKENS - input_tokens),
                        input_tokens, model, "body", -1, choices)
    return Estimate(0, max(cfg.default_request_tokens, MIN_TOKENS), 0, model, "default")
