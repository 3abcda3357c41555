"""Reading actual usage out of an OpenAI-compatible response.

Two shapes: a buffered JSON body (``{"model": ..., "usage": {"prompt_tokens",
"completion_tokens"}}``) and a server-sent-events stream whose last data chunk
carries ``usage`` (``stream_options.include_usage``). The SSE scanner reads
chunks as they pass and never holds the stream back.
"""
from __future__ import annotations

from typing import Optional

import msgspec

# A JSON response larger than this is not buffered for usage: its reservation stands.
MAX_JSON_BYTES = 4 * 1024 * 1024
# An SSE line longer than this is skipped (usage chunks are a few hundred bytes).
MAX_SSE_LINE = 1024 * 1024


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Reply(msgspec.Struct):
    model: Optional[str] = None
    usage: Optional[Usage] = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


def usage_from_json(body: bytes) -> tuple[Optional[str], Optional[Usage]]:
    """(model, usage) of a buffered reply; (None, None) when it is not such a reply."""
    try:
        reply = _decode_reply(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, None
    if reply.usage is not None and (reply.usage.prompt_tokens < 0 or reply.usage.completion_tokens < 0):
        return reply.model, None
    return reply.model, reply.usage


class UsageScanner:
    """Fed with response body chunks as they pass; knows the usage at the end."""

    def __init__(self, streamed: bool) -> None:
        self.streamed = streamed
        self.model: Optional[str] = None
        self.usage: Optional[Usage] = None
        self.overflow = False
        self._buf = bytearray()

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
        model, usage = usage_from_json(data)
        if model and self.model is None:
            self.model = model
        if usage is not None:
            self.usage = usage

    def finish(self) -> None:
        if self.overflow:
            return
        if self.streamed:
            if self._buf:
                self._line(bytes(self._buf).rstrip(b"\r"))
        else:
            self.model, self.usage = usage_from_json(bytes(self._buf))
        self._buf.clear()
