"""One pipelined connection to Redis for the decision hot path.

Redis answers the commands of one connection in the order it received them, so
commands can be written the moment they are ready and replies matched to callers
first-in, first-out. Commands queued in one event-loop tick go out in one write.
Replies are parsed by hiredis (the C parser redis-py itself uses).

A link counts as connected only once the server has answered its setup (AUTH, SELECT,
and whatever the owner adds: the backend loads its scripts and reads the server's
clock there). A server that accepts TCP connections but does not answer (stopped,
hung; its kernel still completes the handshake) therefore never gets a command queued
on a fresh link. A failed attempt backs off exponentially, with jitter, up to a cap;
until the next attempt is due, ``connect`` fails at once instead of opening another
connection (one new connection per caller is what a wrong password used to cost).

Why not redis-py's client here: its asyncio path checks a connection out of a pool,
runs a pipeline object and awaits each reply in turn for every batch; measured in
the bench harness, that cost ~100 µs of sidecar CPU per decision, more than the
whole decision. redis-py still does cluster mode.
"""
from __future__ import annotations

import asyncio
import collections
import random
import select
import ssl
import time
from typing import Any, Callable, Optional

import hiredis


class ConnectionLost(ConnectionError):
    """The connection closed (or never opened) with replies outstanding."""


# reconnect backoff: the first retry after a failed attempt within BACKOFF_BASE_S, then
# doubling up to BACKOFF_CAP_S, each delay drawn from [half, all] of its step (jitter:
# sidecars that lost one server together do not come back in lockstep)
BACKOFF_BASE_S = 0.025
BACKOFF_CAP_S = 1.0


def backoff_delay(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``failures``-th failed attempt in a row (1, 2, ...)."""
    step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(failures - 1, 30))
    return step * (0.5 + rand() / 2)


class _Protocol(asyncio.Protocol):
    """One link's replies. Once its owner has dropped it (``current`` is False), whatever
    it still receives belongs to calls already failed, and its close is no news: it must
    touch neither the owner's pending calls nor the link that replaced it."""

    def __init__(self, owner: "PipelinedConnection") -> None:
        self.owner = owner
        self.reader = hiredis.Reader()
        self.current = True

    def data_received(self, data: bytes) -> None:
        if not self.current:
            return
        self.reader.feed(data)
        pending = self.owner.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # garbage from the server: drop the link
                self.owner.lose(ConnectionLost(f"protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:
                self.owner.lose(ConnectionLost("a reply nobody asked for"))
                return
            fut = pending.popleft()
            self.owner.last_reply_at = time.monotonic()
            if not fut.done():  # its caller may have timed out already
                fut.set_result(reply)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.current:
            self.owner.lose(ConnectionLost(f"connection closed: {exc!r}"))


class PipelinedConnection:
    def __init__(self, host: str, port: int, connect_timeout_s: float,
                 setup: tuple[bytes, ...] = (), unix_path: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 on_setup: Optional[Callable[[list, float, float], None]] = None) -> None:
        """``setup``: pre-encoded commands sent first on every (re)connect (AUTH, SELECT,
        ...), all answered before the link counts as connected; an error reply fails the
        attempt. ``on_setup(replies, sent_at, answered_at)`` (monotonic seconds) then sees
        the replies and may raise to fail the attempt.
        ``unix_path``: connect to a Unix socket instead of host:port; ``ssl_context``: TLS."""
        self.host, self.port = host, port
        self.unix_path = unix_path
        self.ssl_context = ssl_context
        self.connect_timeout_s = connect_timeout_s
        self.setup = setup
        self.on_setup = on_setup
        self._ready = False  # the setup of the current link has been answered
        self.failures = 0  # failed attempts in a row
        self.retry_at = 0.0  # monotonic time before which no new attempt is made
        self.last_failure = ""
        self.opened = 0  # attempts that gave a working link
        self.failed = 0  # attempts that did not
        self.pending: collections.deque[asyncio.Future] = collections.deque()
        self.transport: Optional[asyncio.Transport] = None
        self.protocol: Optional[_Protocol] = None
        self._connecting: Optional[asyncio.Task] = None
        self._outbox: list[bytes] = []
        self._outbox_counted = False  # a command in the outbox counts as a round trip
        self._flush_scheduled = False
        self.writes = 0  # one write = one round trip for everything in it
        self.last_reply_at = time.monotonic()

    @property
    def connected(self) -> bool:
        return self._ready and self.transport is not None and not self.transport.is_closing()

    @property
    def connecting(self) -> bool:
        return self._connecting is not None

    def backing_off(self) -> float:
        """Seconds until the next connection attempt is allowed (0: now)."""
        return max(0.0, self.retry_at - time.monotonic())

    async def call(self, packed: bytes, counted: bool = True) -> Any:
        """Send one pre-encoded command; its reply (a hiredis.ReplyError for an error reply).
        ``counted=False``: housekeeping (the heartbeat), left out of ``writes`` unless it
        shares a write with counted commands."""
        if not self.connected:
            await self.connect()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._owe(fut)
        self._outbox.append(packed)
        self._outbox_counted |= counted
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def submit(self, packed: bytes) -> asyncio.Future:
        """Write one pre-encoded command now (with anything already queued ahead of it, so
        replies stay in order); the future of its reply. The connection must be open."""
        fut = asyncio.get_running_loop().create_future()
        self._owe(fut)
        self._outbox.append(packed)
        self._outbox_counted = True
        self._flush()
        return fut

    def _owe(self, fut: asyncio.Future) -> None:
        # silence is counted from the last reply or from the moment a reply became owed,
        # whichever is later: after an idle spell the first slow reply is not a stall
        if not self.pending:
            self.last_reply_at = time.monotonic()
        self.pending.append(fut)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        data, self._outbox = b"".join(self._outbox), []
        counted, self._outbox_counted = self._outbox_counted, False
        if self.transport is None or self.transport.is_closing():
            self.lose(ConnectionLost("not connected"))
            return
        self.transport.write(data)
        self.writes += counted

    async def connect(self) -> None:
        """Open the link unless it is open: a caller that saw it closed may get here after
        another opened it, and a second link would split the replies from their callers.
        The opening runs as its own task, so a caller cancelled while it waits (its
        request given up on) does not abort the connect the other callers wait for.
        While backing off after a failed attempt, fails at once (ConnectionLost)."""
        if self._connecting is None:
            if self.connected:
                return
            wait = self.retry_at - time.monotonic()
            if wait > 0:
                raise ConnectionLost(f"{self.last_failure}; next attempt in {wait * 1000:.0f} ms")
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(self._opened)
        await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have been cancelled

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            if self.unix_path:
                opening = loop.create_unix_connection(lambda: _Protocol(self), self.unix_path)
            else:
                opening = loop.create_connection(lambda: _Protocol(self), self.host, self.port,
                                                 ssl=self.ssl_context)
            transport, protocol = await asyncio.wait_for(opening, self.connect_timeout_s)
            self.transport, self.protocol = transport, protocol  # type: ignore[assignment]
            self.last_reply_at = time.monotonic()
            # the setup goes out in one write and is answered before any call is written:
            # nothing is queued on a link whose server has not answered yet
            setup = [loop.create_future() for _ in self.setup]
            self.pending.extend(setup)
            sent_at = time.monotonic()
            if self.setup:
                transport.write(b"".join(self.setup))
            left = self.connect_timeout_s - (sent_at - started)
            replies = await asyncio.wait_for(asyncio.gather(*setup), max(left, 0.001))
            answered_at = time.monotonic()
            for reply in replies:
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionLost(f"connection setup refused: {reply}")
            if self.on_setup is not None:
                self.on_setup(replies, sent_at, answered_at)
            self._ready = True
        except asyncio.CancelledError:
            self.lose(ConnectionLost("connect cancelled"))
            raise
        except BaseException as exc:
            self.lose(exc if isinstance(exc, ConnectionError) else ConnectionLost(repr(exc)))
            where = self.unix_path or f"{self.host}:{self.port}"
            if isinstance(exc, asyncio.TimeoutError):
                exc = ConnectionLost(f"no answer within {self.connect_timeout_s * 1000:.0f} ms")
            self.failures += 1
            self.failed += 1
            self.retry_at = time.monotonic() + backoff_delay(self.failures)
            self.last_failure = f"cannot connect to {where}: {exc}"
            raise ConnectionLost(self.last_failure) from None
        self.failures = 0
        self.retry_at = 0.0
        self.opened += 1

    def lose(self, exc: BaseException) -> None:
        """Close the link and fail every outstanding call; the next call reconnects."""
        self._ready = False
        if self.protocol is not None:
            self.protocol.current = False
            self.protocol = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self._outbox.clear()
        self._outbox_counted = False
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def bytes_waiting(self) -> bool:
        """Bytes from the server wait in the socket, not read yet: the server answered,
        and only this process (descheduled, or busy) has not read it. A silence measured
        while this is true is this process's, not the server's."""
        t = self.transport
        if t is None or not t.is_reading():  # paused: nothing would read them
            return False
        sock = t.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):  # closed meanwhile
            return False
        return bool(readable)

    def stalled(self, silence_s: float) -> bool:
        """Replies are owed but none came for ``silence_s``: the server (or the link) hangs.
        A single slow reply while others keep flowing is not a stall."""
        return bool(self.pending) and time.monotonic() - self.last_reply_at > silence_s

    def close(self) -> None:
        if self._connecting is not None:  # a link opened after close would be left open
            self._connecting.cancel()
        self.lose(ConnectionLost("closed"))
