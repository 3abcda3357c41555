"""Where events go. Every method here runs on the writer thread, never on the event loop.

- ``FileSink``: append-only JSON Lines; the current file ``events.jsonl`` is rotated to
  ``events-<UTC time>.jsonl`` past a size, and rotated files older than the retention
  are deleted. The embedded default: nothing to run beside the sidecar.
- ``SpillFile``: where events wait, on local disk, while the sink fails; replayed in
  order when it answers again (the PostgreSQL sink ignores what it already has, so a
  replay after a crash never counts twice). Bounded: past its limit events are lost,
  counted.

A sink tells two failures apart: ``SinkError`` (it cannot take anything now: down,
hung, disk full; the batch spills and is retried) and ``SinkRefused`` (it refuses
something in this batch; the writer splits the batch to find the event, which goes to
the dead-letter file, and writes the rest).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import msgspec

from sidecar.ledger.events import Event, decode_line, encode_lines

log = logging.getLogger("kt.ledger")
CURRENT = "events.jsonl"


class SinkError(Exception):
    """The sink could not take a batch; the batch is spilled, nothing is lost."""


class SinkRefused(SinkError):
    """The sink refuses this batch's content (a value it cannot store): trying the same
    batch again fails again, so the writer isolates the event instead of retrying."""


class SpillFull(OSError):
    """A local file for events that wait (spill, dead letters) reached its size limit."""


class Sink(Protocol):
    name: str

    def write(self, events: Sequence[Event]) -> None:
        """Store the batch (all of it, or raise SinkError and store none that counts twice)."""

    def interrupt(self) -> None:
        """Make a write blocked in another thread return now (it is past its deadline)."""

    def close(self) -> None: ...


class FileSink:
    name = "file"

    def __init__(self, directory: str | os.PathLike, rotate_bytes: int = 64 << 20,
                 retention_s: float = 90 * 86400.0, fsync: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(directory)
        self.rotate_bytes = rotate_bytes
        self.retention_s = retention_s
        self.fsync = fsync
        self.clock = clock
        self._fd: Optional[int] = None
        self._size = 0
        self._last_sweep = 0.0
        self.bytes_written = 0

    def _open(self) -> int:
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.dir / CURRENT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def write(self, events: Sequence[Event]) -> None:
        try:
            data = encode_lines(events)
        except (UnicodeError, msgspec.EncodeError, OverflowError) as exc:
            raise SinkRefused(f"event file: an event cannot be encoded: {exc}") from None
        try:
            fd = self._open()
            write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
            self._size += len(data)
            self.bytes_written += len(data)
            if self._size >= self.rotate_bytes:
                self.rotate()
            if self.clock() - self._last_sweep >= 3600:
                self.sweep()
        except OSError as exc:
            self._close_fd()
            raise SinkError(f"event file {self.dir / CURRENT}: {exc}") from None

    def rotate(self) -> Optional[Path]:
        """Close the current file under a name that sorts by time; a new one starts."""
        self._close_fd()
        cur = self.dir / CURRENT
        if not cur.exists() or cur.stat().st_size == 0:
            return None
        t = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t * 1e6) % 10**6:06d}Z"
        dest = self.dir / f"events-{stamp}.jsonl"
        os.replace(cur, dest)
        self.sweep()
        return dest

    def sweep(self) -> int:
        """Delete rotated files older than the retention (by the time in their name's mtime)."""
        self._last_sweep = self.clock()
        limit = self._last_sweep - self.retention_s
        gone = 0
        for p in self.dir.glob("events-*.jsonl"):
            try:
                if p.stat().st_mtime < limit:
                    p.unlink()
                    gone += 1
            except FileNotFoundError:
                pass
        if gone:
            log.info("event files: %d past the retention of %.0f days deleted", gone,
                     self.retention_s / 86400)
        return gone

    def interrupt(self) -> None:
        """A write to a local file cannot be interrupted; its caller stops waiting."""

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def close(self) -> None:
        self._close_fd()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def event_files(directory: str | os.PathLike) -> list[Path]:
    """A file sink's files, oldest first (rotated files, then the current one)."""
    d = Path(directory)
    files = sorted(d.glob("events-*.jsonl"))
    if (d / CURRENT).exists():
        files.append(d / CURRENT)
    return files


def read_events(paths: Sequence[Path], bad: Optional[list[str]] = None) -> Iterator[Event]:
    """Every event in the files; a line that is not an event (a torn last line after a
    crash) is skipped and named in ``bad``."""
    for path in paths:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield decode_line(line)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    if bad is not None:
                        bad.append(f"{path}:{n}: {exc}")


class SpillFile:
    """Events the sink could not take, kept on local disk (fsync'd) until replayed, at
    most ``max_bytes`` of them (appends past it raise SpillFull: those events are lost,
    counted by the writer)."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 1 << 30) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._offset = 0  # bytes replayed so far (in this process)
        self.malformed = 0  # torn lines skipped at replay (events lost to a crash)
        self._repair()

    def _repair(self) -> None:
        """A process killed in the middle of an append leaves a torn last line: end it,
        so the next event starts a line of its own (the torn one is skipped at replay)."""
        try:
            with open(self.path, "rb+") as f:
                if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                    f.write(b"\n")
        except FileNotFoundError:
            pass
        except OSError as exc:  # appends will fail too, and be counted as lost
            log.error("spill file %s: %s", self.path, exc)

    def waiting_bytes(self) -> int:
        """Bytes of events waiting for the sink."""
        try:
            return max(0, self.path.stat().st_size - self._offset)
        except OSError:  # no spill file (or none possible: then appends fail, counted)
            return 0

    def pending(self) -> bool:
        return self.waiting_bytes() > 0

    def append(self, events: Sequence[Event]) -> None:
        """Raises OSError (SpillFull past the limit): then the events are lost (the caller
        counts them)."""
        data = encode_lines(events)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            if os.fstat(fd).st_size + len(data) > self.max_bytes:
                raise SpillFull(f"the spill file {self.path} is full "
                                f"(limit {self.max_bytes / (1 << 20):g} MiB)")
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def adopt_orphans(self, pattern: str = "spill-*.jsonl") -> int:
        """Take over the spill files of processes that are gone (a SIGKILLed worker's), so
        their events are replayed too: appended to this file, then deleted. Each process
        spills to a file of its own (spill-<pid>.jsonl), so workers never share one."""
        adopted = 0
        for other in self.path.parent.glob(pattern):
            if other == self.path:
                continue
            try:
                pid = int(other.stem.rsplit("-", 1)[1])
                os.kill(pid, 0)
                continue  # alive: its own process replays it
            except (ValueError, IndexError):
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
            try:
                data = other.read_bytes()
                if data and not data.endswith(b"\n"):
                    data += b"\n"
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                other.unlink()
                adopted += 1
            except OSError as exc:
                log.error("cannot adopt the spill file %s: %s", other, exc)
        return adopted

    def replay(self, write: Callable[[list[Event]], int], batch: int) -> tuple[int, bool]:
        """Hand spilled events to ``write`` in order, ``batch`` at a time; ``write``
        returns how many of them (a prefix) it dealt with (stored or set aside), fewer
        than all when the sink failed part way. Returns (events dealt with, whether the
        spill is done); the file is removed once it is. A torn line (a crash in the
        middle of an append) is skipped, logged and counted in ``malformed``."""
        done = 0
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            while True:
                events: list[Event] = []
                ends: list[int] = []  # bytes consumed once each event's line is read
                torn: list[int] = []  # the same for each malformed line
                consumed = 0
                for line in f:
                    consumed += len(line)
                    try:
                        events.append(decode_line(line))
                        ends.append(consumed)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        torn.append(consumed)
                        log.error("spill file %s: skipping a malformed line at byte %d",
                                  self.path, self._offset + consumed - len(line))
                    if len(events) >= batch:
                        break
                if not events and not consumed:
                    break
                handled = write(events) if events else 0
                done += handled
                if handled < len(events):
                    advance = ends[handled - 1] if handled else 0
                    self.malformed += sum(1 for t in torn if t <= advance)
                    self._offset += advance
                    return done, False
                self.malformed += len(torn)
                self._offset += consumed
        if not self.pending():
            self.path.unlink(missing_ok=True)
            self._offset = 0
        return done, True
