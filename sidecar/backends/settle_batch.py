"""Settlements queued within one event-loop tick go to Redis as one script call.

Usage comes back in batches (Envoy's access log delivers many entries per message, and
the receiver settles them together), so the Redis backend sends the settlements one tick
queued as one EVALSHA of lua/settle_batch.lua (at most BATCH_MAX each), owed on the
link's watch (link_watch.py: given up on when the store falls silent or the batch misses
its deadline), instead of a call, a reply and an ``asyncio.wait_for`` each. The batch script
runs settle.lua's own text as a function, so the settlement rule exists once in Lua.
Single node only (in cluster mode a batch would span slots; each settlement goes alone).
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from typing import TYPE_CHECKING, Any

import hiredis

from sidecar.backends.base import BackendError

if TYPE_CHECKING:
    from sidecar.backends.redis import RedisBackend

BATCH_MAX = 64


class _Owed:
    """A batch of settlements on the link's watch (link_watch.Owed)."""
    __slots__ = ("batcher", "items", "written_at", "deadline", "reply")

    def __init__(self, batcher: "SettleBatcher", items: list, now: float,
                 reply: asyncio.Future) -> None:
        self.batcher = batcher
        self.items = items
        self.written_at = now
        self.deadline = now + batcher.backend.deadline_s
        self.reply = reply  # the link's future of its reply

    def answered(self) -> bool:
        return self.reply.done() or all(it[2].done() for it in self.items)

    def give_up(self, store_silent: bool, silent_for: float) -> None:
        # either way a timeout: the service resends a settlement whose reply did not come
        # (its marker makes a second application a no-op)
        why = (f"nothing read from the store for {silent_for * 1000:.0f} ms" if store_silent
               else f"not settled within {self.batcher.backend.deadline_s * 1000:.0f} ms")
        self.batcher._fail(self.items, self.batcher.backend._failed(
            f"no reply: {why}", timed_out=True))


def batch_script():
    """lua/common.lua and lua/ledger_spend.lua, then settle.lua as the body of
    ``settle_one(KEYS, ARGV)``, then lua/settle_batch.lua (Redis scripts cannot call one
    another: joined at load)."""
    from sidecar.backends.redis import _Script, load_script

    script = _Script("settle_batch.lua", "settle_batch.lua")
    script.source = "\n".join([
        load_script("common.lua"), load_script("ledger_spend.lua"),
        "local function settle_one(KEYS, ARGV)", load_script("settle.lua"), "end",
        load_script("settle_batch.lua")])
    script.sha = hashlib.sha1(script.source.encode()).hexdigest()
    return script


def _bulk(arg: Any) -> bytes:
    b = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


class SettleBatcher:
    def __init__(self, backend: "RedisBackend") -> None:
        self.backend = backend
        self.script = batch_script()
        self._queued: list[tuple[list[str], list[Any], asyncio.Future]] = []
        self.batches = 0

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future:
        """settle.lua's reply for these KEYS and ARGV (a BackendError on failure)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queued.append((keys, args, fut))
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for i in range(0, len(queued), BATCH_MAX):
            self._send(queued[i:i + BATCH_MAX], attempt=1)

    def _send(self, items: list, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        conn = self.backend.conn
        if conn is None:
            self._fail(items, BackendError("redis backend not started"))
            return
        if not conn.connected:
            loop.create_task(self._connect_then_send(items, attempt))
            return
        n = len(items)
        parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (
            4 + 4 * n + n + sum(len(it[1]) for it in items), self.script.sha.encode()),
            _bulk(4 * n)]  # settle.lua's four keys each (the fourth: the ledger's spend)
        parts += [_bulk(k) for it in items for k in it[0]]
        parts.append(_bulk(n))
        for _, args, _ in items:
            parts.append(_bulk(len(args)))
            parts += [_bulk(a) for a in args]
        self.batches += 1
        reply = conn.submit(b"".join(parts))
        reply.add_done_callback(lambda fut: self._replied(items, attempt, fut))
        self.backend.watch.owe(_Owed(self, items, time.monotonic(), reply))

    async def _connect_then_send(self, items: list, attempt: int) -> None:
        assert self.backend.conn is not None
        try:
            await self.backend.conn.connect()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail(items, self.backend._failed(f"{type(exc).__name__}: {exc}"))
            return
        self._send(items, attempt)

    def _replied(self, items: list, attempt: int, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            exc = fut.exception() if not fut.cancelled() else None
            self._fail(items, self.backend._failed(f"{type(exc).__name__}: {exc}"))
            return
        reply = fut.result()
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT") and attempt == 1:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load, resend
                asyncio.get_running_loop().create_task(self._reload_then_send(items))
                return
            self._fail(items, self.backend._failed(f"{self.script.name}: {reply}"))
            return
        if not (isinstance(reply, list) and len(reply) == len(items)):
            self._fail(items, self.backend._failed(
                f"{self.script.name}: unexpected reply {str(reply)[:120]}"))
            return
        self.backend._last_ok_at = time.monotonic()
        for (_, _, one_fut), one in zip(items, reply, strict=True):
            if one_fut.done():
                continue
            if isinstance(one, hiredis.ReplyError):
                one_fut.set_exception(self.backend._failed(f"settle.lua: {one}"))
            else:
                one_fut.set_result(one)

    async def _reload_then_send(self, items: list) -> None:
        try:
            await self.backend._load_scripts()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail(items, self.backend._failed(f"NOSCRIPT, and reloading failed: {exc!r}"))
            return
        self._send(items, attempt=2)

    @staticmethod
    def _fail(items: list, exc: BackendError) -> None:
        for _, _, fut in items:
            if not fut.done():
                fut.set_exception(exc)
