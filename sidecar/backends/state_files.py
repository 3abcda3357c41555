"""The embedded backend's files on disk: the spend snapshot and the settlement journal.

Their format and the checks a value read back must pass live here; what the backend does
with them (when it writes, what it replays) lives in memory.py. Split out so a change to
the file format and a change to the decision's state are two different files.

- **Snapshot**: budget spend of every tenant, a JSON file replaced atomically (temp file,
  fsync, rename, fsync of the directory), written by a thread from a mirror of the spend
  that only the thread reads, encoded in chunks between writes (each releases the GIL).
- **Journal**: settlements appended with the tenant's spend after each, in segments that
  another thread fsyncs in groups.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from itertools import islice
from typing import Any, Callable, Optional

import msgspec

from sidecar.backends.base import BackendError


STATE_VERSION = 2  # 1: snapshot only (still read); 2: snapshot + journal
# (tenant, request id) pairs remembered for idempotent settlement; older ones fall out first
SETTLED_IDS_MAX = 200_000
# a spend or period start beyond this is not one this sidecar wrote (int64 with headroom)
MAX_STATE_VALUE = 2**62
# journal segments: a new one every SEGMENT_RECORDS settlements (and at each start); the
# oldest is deleted once the newer ones hold SETTLED_IDS_MAX records and a snapshot holds
# its spend
SEGMENT_RECORDS = 50_000
# tenants encoded per chunk of a snapshot: each chunk holds the GIL ~0.1 ms
SNAPSHOT_CHUNK = 1024


class TenantSpend(msgspec.Struct, frozen=True, gc=False):
    """One tenant's budget in the snapshot: its period's start (µs) and spend in it."""

    period_start: int
    spent: int


_encode = msgspec.json.Encoder().encode


def valid_int(value: Any, low: int) -> bool:
    return type(value) is int and low <= value <= MAX_STATE_VALUE


def refuse(where: str, what: str) -> BackendError:
    """A state file (or journal) this sidecar will not start from, in one line."""
    return BackendError(f"{where}: {what}; refusing to start rather than reset spend (fix "
                        "it, or move it aside to start with zero spend)")


def check_spend(where: str, tenant: Any, period_start: Any, spent: Any,
                 no_budget_ok: bool = False) -> None:
    """Raise BackendError naming ``where``, the tenant and the field that is not a spend.
    ``no_budget_ok`` (journal records): period_start -1 is a tenant without a budget
    period, and with it spent -1, which journals written before the state's own spend was
    journalled hold for a tenant without a budget (settle's "no budget" reply)."""
    if not isinstance(tenant, str) or not tenant:
        raise refuse(where, f"tenant name {json.dumps(tenant)[:40]} is not a non-empty string")
    no_budget = no_budget_ok and period_start == -1
    for field, value, low in (("period_start", period_start, -1 if no_budget_ok else 0),
                              ("spent", spent, -1 if no_budget else 0)):
        if not valid_int(value, low):
            raise refuse(where, f"tenant {tenant!r}: {field} must be an integer in "
                                 f"{low}..{MAX_STATE_VALUE}, not {json.dumps(value)[:40]}")


def fsync_directory(directory: str) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, temp_prefix: str, write: Callable[[int], None],
                  before_replace: Optional[Callable[[], None]] = None) -> None:
    """Replace ``path`` by what ``write(fd)`` writes, atomically and durably: a temporary
    file beside it (named ``temp_prefix``...), fsync, ``before_replace()``, rename, fsync
    of the directory; the temporary file removed if any step fails. A crash leaves the
    old file or the new one, never a part of either."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix, dir=directory)
    try:
        try:
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(directory)


class StateFiles:
    """The snapshot and the journal on disk. Touched only from the backend's two writer
    threads (snapshot, journal) and from ``load`` before they start."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))
        self.journal_prefix = os.path.basename(path) + ".journal."
        # temporary snapshots: named after the file, so one left by a crash is recognised
        self.temp_prefix = f".{os.path.basename(path)}.tmp-"
        self.mirror: dict[str, TenantSpend] = {}  # snapshot thread only
        self.spend_mirror: dict[str, dict[str, list[int]]] = {}  # snapshot thread only
        self.snapshot_seq = 0  # journal records the durable snapshot includes
        # journal thread only:
        self._segment_fd: Optional[int] = None
        self._segments: list[list] = []  # [first seq, path, records], oldest first
        self._broken = False  # the last append failed: the next one starts a new segment
        # records fsynced (read by the snapshot thread before it publishes a snapshot)
        self.durable_seq = 0
        self._durable = threading.Condition()

    # --- start ---------------------------------------------------------------
    def check_writable(self) -> None:
        """Raise OSError now if the state file's directory cannot take a file: better a
        refusal to start than a sidecar that serves and persists nothing."""
        os.makedirs(self.directory, exist_ok=True)
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory")
        for name in os.listdir(self.directory):  # a snapshot a crash left half-written
            if name.startswith(self.temp_prefix):
                os.unlink(os.path.join(self.directory, name))
        fd, tmp = tempfile.mkstemp(prefix=self.temp_prefix, dir=self.directory)
        try:
            os.write(fd, b"{}")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)

    def segment_paths(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.directory):
            if name.startswith(self.journal_prefix):
                suffix = name[len(self.journal_prefix):]
                if suffix.isdigit():
                    out.append((int(suffix), os.path.join(self.directory, name)))
        return sorted(out)

    # --- snapshot (snapshot thread) --------------------------------------------
    def write_snapshot(self, changed: dict[str, TenantSpend], removed: list[str], seq: int,
                       written_at_us: int, spend_changed: Optional[dict] = None
                       ) -> tuple[int, float]:
        """Apply the changes to the mirror and write all of it; (tenants, seconds)."""
        started = time.perf_counter()
        mirror = self.mirror
        mirror.update(changed)
        self.spend_mirror.update(spend_changed or {})  # the ledger's, whole tenants
        for tenant in removed:
            mirror.pop(tenant, None)
        def write(fd: int) -> None:
            os.write(fd, b'{"version":%d,"written_at_us":%d,"journal_seq":%d,"tenants":{'
                     % (STATE_VERSION, written_at_us, seq))
            items = iter(mirror.items())  # only this thread changes the mirror
            sep = b""
            while chunk := dict(islice(items, SNAPSHOT_CHUNK)):
                body = _encode(chunk)  # C, the GIL held for well under a millisecond
                # os.write releases the GIL: the event loop runs between chunks
                os.write(fd, sep + body[1:-1])
                sep = b","
            # the ledger's spend per tenant: {"<day>|<model>": [six counts]}
            os.write(fd, b'},"spend":{')
            cells = iter(self.spend_mirror.items())
            sep = b""
            while spend_chunk := dict(islice(cells, SNAPSHOT_CHUNK)):
                os.write(fd, sep + _encode(spend_chunk)[1:-1])
                sep = b","
            os.write(fd, b"}}")

        def journal_durable() -> None:
            # the journal records this snapshot includes must be durable before it replaces
            # the last one, or a crash between the two would keep their effect but forget
            # their ids (a retried report would then apply twice)
            with self._durable:
                if not self._durable.wait_for(lambda: self.durable_seq >= seq, timeout=10):
                    raise OSError(f"the journal is not written up to record {seq}")

        write_durably(self.path, self.temp_prefix, write, journal_durable)
        self.snapshot_seq = seq
        return len(mirror), time.perf_counter() - started

    def _fsync_directory(self) -> None:
        fsync_directory(self.directory)

    # --- journal (journal thread) ----------------------------------------------
    def open_journal(self, next_seq: int, segments: list[list]) -> None:
        """After load: appends go to a new segment (an old one may end in a torn line)."""
        self._segments = [seg for seg in segments if seg[0] != next_seq]
        self._new_segment(next_seq)

    def _new_segment(self, first_seq: int) -> None:
        if self._segment_fd is not None:
            os.close(self._segment_fd)
            self._segment_fd = None
        path = os.path.join(self.directory, f"{self.journal_prefix}{first_seq}")
        self._segment_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segments.append([first_seq, path, 0])
        self._fsync_directory()
        # the oldest segment goes once the newer ones remember SETTLED_IDS_MAX settlements
        # and a snapshot holds its spend (its records are all below the next one's first)
        segs = self._segments
        while (len(segs) > 1 and segs[1][0] - 1 <= self.snapshot_seq
               and sum(seg[2] for seg in segs[1:]) >= SETTLED_IDS_MAX):
            try:
                os.unlink(segs.pop(0)[1])
            except FileNotFoundError:
                pass

    def append(self, records: list[tuple]) -> None:
        """Write and fsync settlement records: (seq, tenant, request id, period start, spent)."""
        if not records:
            return
        if self._segment_fd is None or self._broken or self._segments[-1][2] >= SEGMENT_RECORDS:
            # after a failed write the segment may end in a torn record: start a new one,
            # so a torn record is only ever a segment's last line
            self._new_segment(records[0][0])
            self._broken = False
        assert self._segment_fd is not None
        try:
            os.write(self._segment_fd, b"".join(_encode(r) + b"\n" for r in records))
            os.fsync(self._segment_fd)
        except BaseException:
            self._broken = True
            raise
        self._segments[-1][2] += len(records)
        with self._durable:
            self.durable_seq = records[-1][0]
            self._durable.notify_all()

    def close_journal(self) -> None:
        if self._segment_fd is not None:
            os.close(self._segment_fd)
            self._segment_fd = None
