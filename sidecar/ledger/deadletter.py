"""Events no sink will take, kept with the reason, so one bad event never blocks the rest.

A dead letter is an event the sink refused on its own (isolated by splitting the batch
that held it) or one no sink can store (an integer outside 64 bits). It is written to a
JSON Lines file of its own, one record per event, never replayed by the sidecar: an
operator reads it, fixes the cause and loads the events (``event`` is the event exactly
as the event files hold it), or ``kt events dead-letters --load`` (``load``) writes
them to the sink once the cause is fixed. The file is bounded like the spill file; past
its limit a dead letter is lost, counted and logged, never silent.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import msgspec

from sidecar.ledger.events import Event
from sidecar.ledger.sinks import FileSink, Sink, SinkError, SinkRefused, SpillFull, write_all


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


def read_dead_letters(path: Path) -> Iterator[DeadLetter]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield decode_dead_letter(line)


def summary(path: Path) -> dict[str, int]:
    """How many dead letters, per reason and error (the first 160 characters)."""
    return dict(Counter(f"{d.reason}: {d.error[:160]}" for d in read_dead_letters(path)))


def load(path: Path, directory: Optional[str], dsn: Optional[str]) -> tuple[dict[str, int], str]:
    """Write the dead letters to the sink (PostgreSQL for a dsn, else the file sink in
    ``directory``), one event per call so a refusal stays alone. Returns the counts
    (loaded, refused, not_tried) and the sink's error when it failed part way.

    The file is first moved aside, so a sidecar setting new letters aside meanwhile starts
    a new one; the letters still refused, or not tried because the sink failed, are
    appended back to it. A letter loaded twice (a rerun after a crash) is ignored by the
    sink like any replayed event."""
    from sidecar.ledger.storable import Unstorable, storable

    sink: Sink
    if dsn:
        from sidecar.ledger.postgres import PostgresSink

        sink = PostgresSink(dsn)
    else:
        sink = FileSink(directory or str(path.parent))
    taken = path.with_name(f"{path.name}.loading-{os.getpid()}")
    os.replace(path, taken)
    counts = {"loaded": 0, "refused": 0, "not_tried": 0}
    kept: list[DeadLetter] = []
    failure = ""
    try:
        for letter in read_dead_letters(taken):
            if failure:
                kept.append(letter)
                counts["not_tried"] += 1
                continue
            try:
                sink.write([storable(letter.event)])
            except (Unstorable, SinkRefused) as exc:
                kept.append(msgspec.structs.replace(letter, error=str(exc)))
                counts["refused"] += 1
            except SinkError as exc:
                failure = str(exc)
                kept.append(letter)
                counts["not_tried"] += 1
            else:
                counts["loaded"] += 1
    except BaseException:
        # every letter is still in the moved file: nothing is removed
        raise RuntimeError(f"loading stopped; every letter is still in {taken}") from None
    finally:
        sink.close()
    if kept:
        DeadLetterFile(path, max_bytes=1 << 62).append(kept)
    taken.unlink()
    return counts, failure
