"""Reading actual usage out of a provider's response, and pricing it exactly.

Formats read, buffered (JSON) or streamed (server-sent events):
- OpenAI chat/completions: ``usage.prompt_tokens`` / ``completion_tokens``, cached
  prompt tokens in ``usage.prompt_tokens_details.cached_tokens`` (included in
  ``prompt_tokens``); in a stream, the last data chunk carries ``usage``
  (``stream_options.include_usage``).
- OpenAI responses: ``usage.input_tokens`` / ``output_tokens`` with
  ``input_tokens_details.cached_tokens`` (included in ``input_tokens``); in a stream,
  the ``response.completed`` event carries ``response.usage``.
- Anthropic messages: ``usage.input_tokens`` (the uncached part only),
  ``output_tokens``, ``cache_read_input_tokens``, ``cache_creation_input_tokens``; in
  a stream, ``message_start`` carries ``message.usage`` and each ``message_delta``
  carries the cumulative ``usage`` so far (the last one wins, field by field).

Every format becomes one ``Usage``: ``prompt_tokens`` is ALL input tokens (uncached,
cache reads and cache writes), of which ``cached_tokens`` were read from a cache and
``cache_write_tokens`` written to one; ``completion_tokens`` the output. The SSE
scanner reads chunks as they pass and never holds the stream back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import msgspec

# A JSON response larger than this is not buffered for usage: its reservation stands.
MAX_JSON_BYTES = 4 * 1024 * 1024
# An SSE line longer than this is skipped (usage chunks are a few hundred bytes).
MAX_SSE_LINE = 1024 * 1024
# A count above this is not usage a provider reports for one request: the reply is malformed.
MAX_USAGE_TOKENS = 1_000_000_000
# USD per 1K tokens -> nano-USD per token (as sidecar/policy/load.py)
NANO_PER_USD_PER_1K = 1_000_000


class UsageError(ValueError):
    """A usage report that cannot be applied; the message says why."""


class Usage(msgspec.Struct, frozen=True):
    """Normalised usage of one request (see the module docstring)."""

    prompt_tokens: int = 0  # every input token, cached and cache writes included
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0  # of prompt_tokens: written to it

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


class ModelPrice(NamedTuple):
    """Exact nano-USD per token of one model, by kind of token."""

    input: int
    output: int
    cached_input: int
    cache_write: int


def model_price(price) -> ModelPrice:
    """A policy ``pricing`` entry (USD per 1K tokens) as nano-USD per token. A cached or
    cache-write price the policy does not give is the input price: never cheaper than
    the operator said."""
    inp = round(price.input * NANO_PER_USD_PER_1K)
    cached = getattr(price, "cached_input", None)
    write = getattr(price, "cache_write", None)
    return ModelPrice(
        input=inp, output=round(price.output * NANO_PER_USD_PER_1K),
        cached_input=inp if cached is None else round(cached * NANO_PER_USD_PER_1K),
        cache_write=inp if write is None else round(write * NANO_PER_USD_PER_1K))


def cost_nano(usage: Usage, price: ModelPrice) -> int:
    """What the usage costs, in nano-USD, exactly (integers only)."""
    return (usage.uncached_tokens * price.input + usage.cached_tokens * price.cached_input
            + usage.cache_write_tokens * price.cache_write + usage.completion_tokens * price.output)


# --- wire shapes: every field optional, every format in one struct --------
class _Details(msgspec.Struct):
    cached_tokens: Optional[int] = None


class _WireUsage(msgspec.Struct):
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    prompt_tokens_details: Optional[_Details] = None
    input_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    input_tokens_details: Optional[_Details] = None
    cache_read_input_tokens: Optional[int] = None
    cache_creation_input_tokens: Optional[int] = None


class _Inner(msgspec.Struct):
    """``message`` of Anthropic's message_start, ``response`` of OpenAI's response.* events."""

    model: Optional[str] = None
    usage: Optional[_WireUsage] = None


class _Reply(msgspec.Struct):
    model: Optional[str] = None
    usage: Optional[_WireUsage] = None
    type: Optional[str] = None
    message: Optional[_Inner] = None
    response: Optional[_Inner] = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


def _count(v: Optional[int]) -> int:
    if v is None:
        return 0
    if not 0 <= v <= MAX_USAGE_TOKENS:
        raise ValueError(v)
    return v


def _normalise(w: _WireUsage) -> Optional[Usage]:
    """One Usage from any provider's usage block; None when it holds no counts or a bad one."""
    try:
        if w.prompt_tokens is not None or w.completion_tokens is not None:
            # OpenAI chat: cached tokens are part of prompt_tokens
            prompt = _count(w.prompt_tokens)
            cached = _count(w.prompt_tokens_details.cached_tokens
                            if w.prompt_tokens_details is not None else None)
            return Usage(prompt, _count(w.completion_tokens), min(cached, prompt), 0)
        if w.input_tokens is None and w.output_tokens is None:
            return None
        if w.input_tokens_details is not None:
            # OpenAI responses: cached tokens are part of input_tokens
            inp = _count(w.input_tokens)
            cached = min(_count(w.input_tokens_details.cached_tokens), inp)
            return Usage(inp, _count(w.output_tokens), cached, 0)
        # Anthropic: input_tokens counts only what was neither read from nor written to a cache
        read = _count(w.cache_read_input_tokens)
        write = _count(w.cache_creation_input_tokens)
        return Usage(_count(w.input_tokens) + read + write, _count(w.output_tokens), read, write)
    except ValueError:
        return None


def usage_from_json(body: bytes) -> tuple[Optional[str], Optional[Usage]]:
    """(model, usage) of a buffered reply; (None, None) when it is not such a reply."""
    try:
        reply = _decode_reply(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None, None
    inner = reply.message or reply.response
    model = reply.model or (inner.model if inner is not None else None)
    wire = reply.usage or (inner.usage if inner is not None else None)
    return model, _normalise(wire) if wire is not None else None


class UsageScanner:
    """Fed with response body chunks as they pass; knows the usage at the end."""

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed
        self.model: Optional[str] = None
        self.usage: Optional[Usage] = None
        self.overflow = False
        self._buf = bytearray()
        # Anthropic's stream: what message_start said, overlaid by each message_delta
        self._anthropic: Optional[dict] = None
        self._anthropic_final = False  # a message_delta's usage came (the final counts)

    @property
    def format(self) -> str:
        """How the usage was read: ``ext_proc_sse`` or ``ext_proc_json`` (the ledger's
        ``settled_by``)."""
        return "ext_proc_sse" if self.streamed else "ext_proc_json"

    def feed(self, chunk: bytes) -> None:
        if self.overflow or not chunk:
            return
        self._buf += chunk
        if not self.streamed:
            if len(self._buf) > MAX_JSON_BYTES:
                self.overflow = True
                self._buf.clear()
            return
        # SSE: consume complete lines, keep the partial tail
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_SSE_LINE:
                    self._buf.clear()
                return
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            return
        try:
            reply = _decode_reply(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if reply.type in ("message_start", "message_delta"):
            self._anthropic_event(reply)
            return
        inner = reply.response if reply.type and reply.type.startswith("response.") else None
        model = reply.model or (inner.model if inner is not None else None)
        if model and self.model is None:
            self.model = model
        wire = reply.usage or (inner.usage if inner is not None else None)
        if wire is not None:
            usage = _normalise(wire)
            if usage is not None:
                self.usage = usage

    def _anthropic_event(self, reply: _Reply) -> None:
        if reply.type == "message_delta" and reply.usage is not None:
            self._anthropic_final = True
        if reply.type == "message_start" and reply.message is not None:
            if reply.message.model and self.model is None:
                self.model = reply.message.model
            wire = reply.message.usage
        else:
            wire = reply.usage
        if wire is None:
            return
        fields = self._anthropic if self._anthropic is not None else {}
        for name in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                     "cache_creation_input_tokens"):
            value = getattr(wire, name)
            if value is not None:  # counts are cumulative: the latest one stands
                fields[name] = value
        self._anthropic = fields
        usage = _normalise(_WireUsage(**fields))
        if usage is not None:
            self.usage = usage

    def read_whole(self, data: bytes) -> None:
        """The whole body at once (the access log's text, which Envoy's usage filter cut
        out in whole lines): what ``feed(data)`` then ``finish()`` read, without copying
        the text through the line buffer."""
        if not self.streamed:
            self.feed(data)
            self.finish()
            return
        lines = data.split(b"\n")
        if len(lines[-1]) > MAX_SSE_LINE:  # an unfinished line feed() would have dropped
            lines.pop()
        for line in lines:
            self._line(line.rstrip(b"\r"))
        if self._anthropic is not None and not self._anthropic_final:
            self.usage = None  # as finish(): a stream cut before its message_delta

    def finish(self) -> None:
        if self.overflow:
            return
        if self.streamed:
            if self._buf:
                self._line(bytes(self._buf).rstrip(b"\r"))
            if self._anthropic is not None and not self._anthropic_final:
                # message_start's usage is the input and 1 output token, not the bill: a
                # stream cut before its message_delta (the client left, the provider
                # reset) has no usage to settle with, and is charged at its bound
                self.usage = None
        else:
            self.model, self.usage = usage_from_json(bytes(self._buf))
        self._buf.clear()
