"""Calls queued within one event-loop tick go to Redis as one script call.

Decisions and settlements both arrive many at a time (a burst of requests; Envoy's access
log delivers many entries per message), and a script call's fixed cost in Redis (lookup,
set-up, reply) is several times a small call's own. So each call is queued as a
``BatchItem``; at the end of the tick every lane's queue goes out as script calls of at
most BATCH_MAX items each (a lone decision as its ``_one`` entry), on the pipelined link,
owed on the link's watch (link_watch.py): given up on when the store falls silent, or
when the batch misses its callers' deadline on a link that keeps answering (decisions are
then shed as overloaded, BackendOverloaded; other calls time out). No timer per call.

A batch's reply is handed out item by item; an item's own error reply stands for it alone
(lua/batch.lua runs each under pcall). A whole-batch failure (the link lost, an error
reply, a reply that is not one per item) fails every item still waiting. On NOSCRIPT the
scripts are loaded again and the batch sent once more. A decision's batch carries its
callers' deadline in Redis's clock (lua/deadline.lua): past it Redis applies nothing and
answers KTEXPIRED. An item whose caller stopped waiting but whose reply came all the same
goes to its LateReply (the service puts the charge right).

Single node only: in cluster mode a batch would span slots, and each call goes alone.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import hiredis

from sidecar.backends.base import BackendError, BackendOverloaded, LateReply
from sidecar.backends.redis.link import RedisLink
from sidecar.backends.redis.scripts import Script, bulk, evalsha_head

# items sent in one script call at most: bounds how long one call holds Redis (an item's
# script work is a few µs)
BATCH_MAX = 64


@dataclass(slots=True)
class BatchItem:
    """One call in a batch: its KEYS and ARGV already encoded (bulk strings), their
    counts, the future its caller awaits, and where a reply that comes after its caller
    stopped waiting goes (decisions only)."""

    keys: bytes
    nkeys: int
    args: bytes
    nargs: int
    reply: asyncio.Future
    late: Optional[LateReply] = None


@dataclass(frozen=True, slots=True, eq=False)  # compared (and hashed) by identity
class Lane:
    """One kind of call and how a batch of it is framed (lua/batch.lua).

    ``one``: the entry for a lone item (None: the batch entry even for one); ``many``: the
    batch entry; ``keys_each``: the key count of every item (None: each item's count is
    sent before its arguments); ``deadline``: the callers' deadline goes last in ARGV
    (decisions); ``sheds``: a batch late while the store answers is shed as overloaded,
    else it times out; ``sends_answered``: a batch sent after a reconnect even when its
    callers were all answered meanwhile (a settlement applies once, and stands)."""

    one: Optional[Script]
    many: Script
    keys_each: Optional[int]
    deadline: bool
    sheds: bool
    sends_answered: bool = False


class _Batch:
    """Items sent in one script call, owed on the link's watch (link_watch.Owed)."""
    __slots__ = ("batcher", "lane", "items", "attempt", "deadline", "written_at", "reply")

    def __init__(self, batcher: "TickBatcher", lane: Lane, items: list[BatchItem],
                 now: float) -> None:
        self.batcher = batcher
        self.lane = lane
        self.items = items
        self.attempt = 1
        self.written_at = now  # when it went to the link
        self.deadline = now + batcher.link.deadline_s  # when its callers stop waiting
        self.reply: Optional[asyncio.Future] = None  # the link's future of its reply

    def answered(self) -> bool:
        return (self.reply is not None and self.reply.done()) or all(
            it.reply.done() for it in self.items)

    def give_up(self, store_silent: bool, silent_for: float) -> None:
        # the callers are answered now; the batch stays owed on the link and, if its reply
        # still comes, its items' LateReply get the outcomes
        self.batcher.give_up(self.lane, self.items, store_silent, silent_for)


class TickBatcher:
    def __init__(self, link: RedisLink, lanes: Sequence[Lane],
                 on_late: Optional[Callable[[LateReply, Any], None]] = None) -> None:
        """``lanes``: flushed together, in this order, at the end of the tick the first
        of them was queued in. ``on_late``: an item's reply that came after its caller
        stopped waiting, with the item's LateReply."""
        self.link = link
        self.lanes = tuple(lanes)
        self._queues: dict[Lane, list[BatchItem]] = {lane: [] for lane in self.lanes}
        self._flush_due = False
        self._on_late = on_late
        self.batches = 0  # script calls sent
        self.expired = 0  # items Redis refused to apply: they came after their deadline
        self.shed = 0  # items given up on past their deadline while the store answered
        self.shed_at = 0.0

    def submit(self, lane: Lane, keys: bytes, nkeys: int, args: bytes, nargs: int,
               late: Optional[LateReply] = None) -> asyncio.Future:
        """Queue one call (encoded KEYS and ARGV); the future of its reply (the script's
        reply for it, an error reply included), or a BackendError."""
        if not self.link.started:
            raise BackendError("redis backend not started")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._flush)
        self._queues[lane].append(BatchItem(keys, nkeys, args, nargs, fut, late))
        return fut

    def _flush(self) -> None:
        self._flush_due = False
        now = time.monotonic()
        for lane in self.lanes:
            queued, self._queues[lane] = self._queues[lane], []
            for i in range(0, len(queued), BATCH_MAX):
                batch = _Batch(self, lane, queued[i:i + BATCH_MAX], now)
                self.link.watch.owe(batch)
                self._send(batch)

    def _frame(self, batch: _Batch) -> bytes:
        lane, items = batch.lane, batch.items
        tail = b""
        if lane.deadline:
            # the callers' deadline in Redis's clock (lua/deadline.lua): past it, Redis
            # applies nothing, for its callers have been answered
            tail = bulk(self.link.clocks.deadline_us(batch.deadline))
        extra = 1 if lane.deadline else 0
        if len(items) == 1 and lane.one is not None:
            it = items[0]
            return (evalsha_head(lane.one.sha, 1 + it.nkeys + it.nargs + extra)
                    + bulk(it.nkeys) + it.keys + it.args + tail)
        n = len(items)
        per = 1 if lane.keys_each is not None else 2  # counts sent before each item's ARGV
        nkeys = sum(it.nkeys for it in items)
        parts = [evalsha_head(lane.many.sha, 2 + nkeys + per * n
                              + sum(it.nargs for it in items) + extra), bulk(nkeys)]
        parts += [it.keys for it in items]
        parts.append(bulk(n))
        for it in items:
            if lane.keys_each is None:
                parts.append(bulk(it.nkeys))
            parts.append(bulk(it.nargs))
            parts.append(it.args)
        parts.append(tail)
        return b"".join(parts)

    def _send(self, batch: _Batch) -> None:
        if not self.link.connected:
            asyncio.get_running_loop().create_task(self._connect_then_send(batch))
            return
        self.batches += 1
        batch.reply = self.link.submit(self._frame(batch))
        batch.reply.add_done_callback(lambda fut: self._replied(batch, fut))
        # after submit, which restarts the link's silence when nothing else was owed
        batch.written_at = time.monotonic()

    async def _connect_then_send(self, batch: _Batch) -> None:
        try:
            await self.link.connect()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail(batch, f"{type(exc).__name__}: {exc}")
            return
        if batch.lane.sends_answered or any(not it.reply.done() for it in batch.items):
            self._send(batch)

    def _name(self, batch: _Batch) -> str:
        lane = batch.lane
        return lane.one.name if len(batch.items) == 1 and lane.one is not None \
            else lane.many.name

    def _replied(self, batch: _Batch, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._fail(batch, "cancelled")
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(batch, f"{type(exc).__name__}: {exc}")
            return
        reply = fut.result()
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("KTEXPIRED"):
                # it reached Redis after its callers' deadline: nothing was applied. Redis
                # answered it, so callers still waiting were held up by the work in front
                # of them, not by a store that is down: shed, not the failure mode
                self.expired += len(batch.items)
                self.give_up(batch.lane, batch.items, False, 0.0)
                return
            if str(reply).startswith("NOSCRIPT") and batch.attempt == 1:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load, resend
                batch.attempt = 2
                asyncio.get_running_loop().create_task(self._reload_then_send(batch))
                return
            self._fail(batch, f"{self._name(batch)}: {reply}")
            return
        self.link.answered()
        items = batch.items
        if len(items) == 1 and batch.lane.one is not None:
            replies = [reply]
        elif isinstance(reply, list) and len(reply) == len(items):
            replies = reply
        else:
            self._fail(batch, f"{batch.lane.many.name}: unexpected reply {str(reply)[:120]}")
            return
        loop = asyncio.get_running_loop()
        for it, one in zip(items, replies, strict=True):
            if not it.reply.done():
                it.reply.set_result(one)
            elif it.late is not None and self._on_late is not None:
                # its caller timed out and was answered by the failure mode, or was
                # cancelled, yet Redis applied the call: the service puts the charge
                # right. Looked at on the next turn: a caller cancelled just now has its
                # future cancelled at once, but sets its handler only when its task runs,
                # which is already queued ahead of this
                loop.call_soon(self._on_late, it.late, one)

    async def _reload_then_send(self, batch: _Batch) -> None:
        try:
            await self.link.load_scripts()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail(batch, f"NOSCRIPT, and reloading failed: {exc!r}")
            return
        self._send(batch)

    def give_up(self, lane: Lane, items: list[BatchItem], store_silent: bool,
                silent_for: float) -> None:
        """Answer the callers still waiting in ``items``: BackendTimeout when the store has
        not answered (the failure mode decides), else, for a lane that sheds,
        BackendOverloaded."""
        waiting = [it.reply for it in items if not it.reply.done()]
        if not waiting:
            return
        link = self.link
        if store_silent:
            exc: BackendError = link.failed(
                f"no reply: nothing read from the store for {silent_for * 1000:.0f} ms "
                f"(timeout_ms {link.cfg.timeout_ms})", timed_out=True)
        elif lane.sheds:
            self.shed += len(waiting)
            self.shed_at = time.monotonic()
            exc = BackendOverloaded(
                f"redis {link.where}: not decided within {link.deadline_s * 1000:.0f} ms "
                "while the store kept answering: this sidecar is overloaded")
        else:
            exc = link.failed(f"no reply: not answered within {link.deadline_s * 1000:.0f} ms",
                              timed_out=True)
        for fut in waiting:
            fut.set_exception(exc)

    def _fail(self, batch: _Batch, message: str) -> None:
        waiting = [it.reply for it in batch.items if not it.reply.done()]
        if waiting:
            exc = self.link.failed(message)
            for fut in waiting:
                fut.set_exception(exc)
