"""Events no sink will take, kept with the reason, so one bad event never blocks the rest.

A dead letter is an event the sink refused on its own (isolated by splitting the batch
that held it) or one no sink can store (an integer outside 64 bits). It is written to a
JSON Lines file of its own, one record per event, never replayed by the sidecar: an
operator reads it, fixes the cause and loads the events (``event`` is the event exactly
as the event files hold it). The file is bounded like the spill file; past its limit a
dead letter is lost, counted and logged, never silent.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import msgspec

from sidecar.ledger.events import Event
from sidecar.ledger.sinks import SpillFull, write_all


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    at_us: int  # when it was set aside (µs since the epoch, UTC)
    sink: str  # the sink that refused it ("" when no sink could store it)
    reason: str  # refused (the sink said no to this event alone) | unstorable
    error: str  # the sink's own error, or what made the event unstorable
    event: Event


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetter)


def decode_dead_letter(line: bytes) -> DeadLetter:
    return _decoder.decode(line)


class DeadLetterFile:
    def __init__(self, path: str | os.PathLike, max_bytes: int = 1 << 30) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes

    def append(self, letters: Sequence[DeadLetter]) -> None:
        """Raises OSError (SpillFull past the limit): then the letters are lost (counted)."""
        data = b"".join(_encoder.encode(d) + b"\n" for d in letters)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size + len(data) > self.max_bytes:
                raise SpillFull(f"the dead-letter file {self.path} is full "
                                f"(limit {self.max_bytes / (1 << 20):g} MiB)")
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
