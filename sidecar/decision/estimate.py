"""Request → Estimate: how many tokens a request will use, before it runs.

Evidence (docs/contract.md): the OpenAI-style JSON body Envoy forwards
(`with_request_body`: prompt size and `max_tokens`), an explicit count (the
`x-kt-estimated-tokens` header, or RLS `hits_addend`) only when the policy says a
trusted filter sets it (`estimate: {trusted: true}`), then the policy's default.
The body counts whole (docs/contract.md, "Token estimate"): its size and its images as
input, each choice (`n`) its `max_tokens` of output. A stored conversation the provider
adds as input (a Responses `previous_response_id` or `conversation`) is not estimated (a
context window per turn would refuse every conversation against a small TPM): it is
flagged for the bound of a reply whose usage cannot be read (sidecar/settlement/bound.py). Every byte of it is the client's
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
    body that say how much output may be billed, and where image parts may be. The input
    is the whole body's size: every field a provider bills as input (messages, prompt,
    input, instructions, system, tools and their schemas, response formats) is in it, and
    so are fields no list here names."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    max_output_tokens: Optional[int] = None  # the Responses API
    n: Optional[int] = None  # choices, each billed its own output
    best_of: Optional[int] = None  # completions: generated server-side, each billed
    messages: msgspec.Raw = msgspec.Raw()  # chat, Anthropic: kept raw, read for images only
    input: msgspec.Raw = msgspec.Raw()  # responses (items), embeddings (text or token ids)
    # the Responses API: the provider adds a stored conversation to the input it bills
    previous_response_id: msgspec.Raw = msgspec.Raw()
    conversation: msgspec.Raw = msgspec.Raw()


class _Part(msgspec.Struct):
    """A message, an input item or a content part: its type, and where parts nest in it
    (a message's or an Anthropic tool result's `content`, a Responses tool output)."""

    type: Optional[str] = None
    content: msgspec.Raw = msgspec.Raw()
    output: msgspec.Raw = msgspec.Raw()


class _ChatBodyParts(_ChatBody):
    """The usual shape, read in one pass: messages a list of objects."""

    messages: Optional[list[_Part]] = None  # type: ignore[assignment]


_decode_body = msgspec.json.Decoder(_ChatBody).decode
_decode_body_parts = msgspec.json.Decoder(_ChatBodyParts).decode
_decode_parts = msgspec.json.Decoder(list[_Part]).decode
_decode_items = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_part = msgspec.json.Decoder(_Part).decode
# content parts a provider prices as images: OpenAI chat ("image_url"), responses
# ("input_image"), Anthropic ("image")
IMAGE_PART_TYPES = frozenset(("image_url", "input_image", "image"))
# how deep parts are looked for (messages > content > a tool result's content > parts is 3)
_PARTS_DEPTH_MAX = 6


_LIST, _OBJECT = ord("["), ord("{")


def _starts(value: msgspec.Raw, byte: int) -> bool:
    return len(value) > 0 and memoryview(value)[0] == byte


def _image_parts(value: msgspec.Raw, depth: int = 0) -> int:
    """How many image parts a list of messages, items or parts holds, at any depth where
    the providers' schemas put them. Read by msgspec without materialising the text (a
    "type" spelled with JSON escapes is decoded as the provider would read it); text and
    token ids are skipped."""
    if depth > _PARTS_DEPTH_MAX or not _starts(value, _LIST):
        return 0  # absent, or a string: text
    try:
        parts = _decode_parts(value)  # the usual shape: a list of objects, in one pass
    except msgspec.ValidationError:
        parts = []
        if b"{" in bytes(value):  # a mixed list: its objects one by one
            for item in _decode_items(value):
                if _starts(item, _OBJECT):
                    try:
                        parts.append(_decode_part(item))
                    except msgspec.ValidationError:
                        pass  # a "type" that is not a string: no part a provider takes
    return _images_of(parts, depth)


def _images_of(parts: list[_Part], depth: int) -> int:
    n = 0
    for part in parts:
        if part.type in IMAGE_PART_TYPES:
            n += 1
        n += _image_parts(part.content, depth + 1) + _image_parts(part.output, depth + 1)
    return n


def _named(value: msgspec.Raw) -> bool:
    """A field present with a value other than null."""
    return len(value) > 0 and bytes(value).strip() != b"null"


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


def _readable_body(req: Request) -> None:
    """Refuse a body the gateway cannot count as the provider will read it. A compressed
    body (the provider decompresses it) would be sized by its compressed bytes and its n,
    max-output fields and stored conversation unseen by the decision and Envoy's usage
    filter; a UTF-16 or UTF-32 body (Python providers' json.loads reads those too) hides
    the same fields and "stream" from both. JSON between systems is UTF-8 (RFC 8259): its
    first four bytes never hold a NUL, and a UTF-16/32 one's always do (or a BOM)."""
    encoding = req.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise EstimateError(
            f"request bodies must be sent uncompressed, not with content-encoding "
            f"{encoding[:40]!r}: the gateway counts what the provider bills from the body")
    head = req.body[:4]
    if b"\x00" in head or head.startswith((b"\xfe\xff", b"\xff\xfe")):
        raise EstimateError("the request body must be JSON in UTF-8 (RFC 8259), not UTF-16 "
                            "or UTF-32")


def estimate(policy: CompiledPolicy, req: Request) -> Estimate:
    cfg = policy.estimate
    _readable_body(req)
    body: Optional[_ChatBody] = None
    images = 0
    if req.body and not req.body_truncated:
        try:
            try:  # the usual shape in one pass; any other is read again, raw
                typed = _decode_body_parts(req.body)
                body, images = typed, _images_of(typed.messages or [], 0)
            except msgspec.ValidationError:
                body = _decode_body(req.body)
                images = _image_parts(body.messages)
            images += _image_parts(body.input)
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
        for value, name in ((body.max_tokens, "max_tokens"),
                            (body.max_completion_tokens, "max_completion_tokens"),
                            (body.max_output_tokens, "max_output_tokens")):
            if value is not None:  # several named: the provider's choice is not ours to guess
                n = _parse_count(value, name)
                asked = n if asked is None else max(asked, n)
        if body.n is not None or body.best_of is not None:
            choices = max(_parse_count(body.n or 1, "n"), _parse_count(body.best_of or 1,
                                                                      "best_of"), 1)
    elif req.body_truncated:
        # Envoy sent only the first part of a large body: size it from content-length.
        input_tokens = _content_length_tokens(req, cfg.chars_per_token)
    shown = body is not None or req.body_truncated
    # input the provider adds from what it stored (not null: the Responses API's own
    # "absent"); a truncated body's are read by the usage filter (sidecar/settlement/bound.py)
    stored = body is not None and (_named(body.previous_response_id)
                                   or _named(body.conversation))

    if asked is not None:  # all of it firm: the prompt and the most it may answer
        out = min(asked * choices, _core.MAX_TOKENS + 1)
        if explicit is not None:
            out = max(out, explicit - input_tokens)
        out = max(out, MIN_TOKENS - input_tokens)
        return Estimate(input_tokens, out, input_tokens + out, model, "body", asked, choices,
                        True, stored)
    if explicit is not None:
        # a trusted count, never below the prompt the body shows; the part beyond the
        # prompt counts as output, the dearer side of every price list
        out = max(explicit - input_tokens, 0)
        return Estimate(input_tokens, out, input_tokens + out, model,
                        "header" if req.tokens is None else "transport", -1, choices, shown,
                        stored)
    if shown:  # the prompt is firm; the output a default, trimmed to fit a small bucket
        out = min(cfg.default_output_tokens * choices, _core.MAX_TOKENS + 1)
        return Estimate(input_tokens, max(out, MIN_TOKENS - input_tokens),
                        input_tokens, model, "body", -1, choices, True, stored)
    return Estimate(0, max(cfg.default_request_tokens, MIN_TOKENS), 0, model, "default")
