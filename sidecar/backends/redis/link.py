"""The link to Redis: the connection, its set-up (scripts loaded, Redis's clock read), the
heartbeat, the store marker, and the one seam where every failure becomes a BackendError.

- Single node: one pipelined connection (sidecar/backends/resp.py), replies matched in
  order; nothing opens a connection per call. Every new link loads the scripts and reads
  Redis's clock before any call is written on it, so after a restart (scripts gone) the
  first calls are sent as they are, and a server that accepts connections without
  answering (stopped) never has a call queued on a fresh link. On NOSCRIPT (SCRIPT FLUSH
  while connected) the scripts are loaded again and the call retried once.
- Redis Cluster: redis-py's cluster client routes each command to the node owning its
  key's slot; the scripts are loaded on every primary, and each primary's clock is read.
- A heartbeat every HEARTBEAT_S reads Redis's clock (for the calls' deadlines), checks
  the store marker (marker.py) and reconnects, with backoff, when the link is down.
- One watch over the link (link_watch.py) gives a call up by the failure mode only when
  the store has sent nothing for ``timeout_ms``; a link silent for longer than a call's
  deadline is dropped.

Public interface (what the backend, the batcher, the leases and the spend index use):
``call`` (a script), ``plain`` and ``commands`` (plain commands), ``send_unawaited``,
``submit``/``submit_all`` (encoded commands on the pipelined link, for the batcher),
``load_scripts``, ``connect``/``connected``, ``deadline_on``/``clocks``, ``failed``,
``answered`` and ``status`` (health), ``watch``, ``marker``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from sidecar.backends.base import BackendError, BackendStatus, BackendTimeout
from sidecar.backends.link_watch import LinkWatch, deadline_s
from sidecar.backends.redis.clock import ClockOffsets, mono_us
from sidecar.backends.redis.marker import StoreMarker
from sidecar.backends.redis.scripts import Script, pack
from sidecar.backends.resp import ConnectionLost, PipelinedConnection
from sidecar.policy import schema
from sidecar.policy.tls import tls_context
from sidecar.policy.url import check_redis_url

log = logging.getLogger("kt.redis")
# how often the link is checked while connected (Redis's clock, the store marker) and a
# reconnect tried while it is down (the backoff still applies)
HEARTBEAT_S = 1.0


def redact(url: str) -> str:
    """The URL without its user and password, for logs, errors and /readyz."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, ""))


def ignore_reply(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a lost write only means the local book is the record


class RedisLink:
    def __init__(self, cfg: schema.RedisBackend, scripts: Sequence[Script], marker_key: str,
                 on_beat: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        """``scripts``: loaded on every new link (every primary of a cluster). ``on_beat``:
        run first on each heartbeat while the link is usable."""
        self.cfg = cfg
        self.cluster = cfg.cluster
        self.where = redact(cfg.url)  # for messages: never the password
        # silence of the link (replies owed, nothing read) that shows the store is not
        # answering: the calls owed then are answered by the failure mode
        self.timeout_s = cfg.timeout_ms / 1000.0
        # how long a call may wait while the store answers (its caller's wait; link_watch)
        self.deadline_s = deadline_s(cfg.timeout_ms)
        # silence after which the link is dropped: longer than a call's deadline, so a
        # server that is only slow keeps its link and its late replies still arrive (and
        # are put right), and anything it runs after the drop is past its deadline
        # (lua/deadline.lua); a dead one is dropped within half a second
        self.stall_s = max(10 * self.timeout_s, 2 * self.deadline_s, 0.5)
        self.watch = LinkWatch(lambda: self.conn, self.timeout_s, self.drop_if_hung)
        self.scripts = tuple(scripts)
        self.clocks = ClockOffsets()
        self.marker = StoreMarker(marker_key, self.where)
        self._on_beat = on_beat
        self._client: Any = None  # redis-py: cluster mode only
        self.conn: Optional[PipelinedConnection] = None
        self.errors = 0
        self._last_error = ""
        self._last_error_at = 0.0
        self._last_ok_at = 0.0
        self._cluster_round_trips = 0
        self._heartbeat: Optional[asyncio.Task] = None
        self._heartbeat_due: Optional[asyncio.Event] = None

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        opts: dict[str, Any] = dict(socket_timeout=max(self.timeout_s, 0.001),
                                    socket_connect_timeout=max(self.timeout_s, 0.05))
        tls = self.cfg.tls
        if tls is not None:  # only with rediss:// (the policy checks)
            opts.update(ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file,
                        ssl_keyfile=tls.key_file)
        try:
            check_redis_url(self.cfg.url)  # the policy loader checked it; built by hand, not
        except ValueError as exc:
            raise BackendError(f"redis url {self.where}: {exc}") from None
        if self.cluster:
            self._client = RedisCluster.from_url(self.cfg.url, **opts)
            try:
                await asyncio.wait_for(self.load_scripts(), max(self.timeout_s * 20, 1.0))
                await self._read_node_clocks()
            except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
                # Start anyway: calls follow the failure mode until Redis answers (the
                # heartbeat learns the nodes then). redis-py's "cannot be connected" is a
                # RedisClusterException, not a RedisError: it used to end `kt serve` here.
                self.failed(f"cannot load scripts: {exc!r}")
                log.error("redis at %s not available at start: %r", self.where, exc)
            # the nodes' clocks read again every beat (drift, new primaries after a failover)
            self._start_heartbeat()
            return
        client = aioredis.Redis.from_url(self.cfg.url, **opts)
        kw = client.connection_pool.connection_kwargs
        await client.aclose()  # it only parsed the URL: nothing else uses it here
        setup = []
        if kw.get("password"):
            setup.append(pack("AUTH", *([kw["username"]] if kw.get("username") else []),
                              kw["password"]))
        if kw.get("db"):
            setup.append(pack("SELECT", kw["db"]))
        setup += [pack("SCRIPT", "LOAD", s.source) for s in self.scripts]
        setup.append(pack("TIME"))
        self.conn = PipelinedConnection(kw.get("host", "127.0.0.1"), int(kw.get("port", 6379)),
                                        max(self.stall_s, 0.25), tuple(setup),
                                        unix_path=kw.get("path"),
                                        ssl_context=tls_context(self.cfg),
                                        on_setup=self._link_ready)
        self._start_heartbeat()
        try:
            await self.conn.connect()
        except ConnectionLost as exc:
            # Start anyway: calls follow the failure mode until Redis answers (the
            # heartbeat reconnects, with backoff).
            self.failed(str(exc))
            log.error("redis at %s not available at start: %s", self.where, exc)

    def _start_heartbeat(self) -> None:
        self._heartbeat_due = asyncio.Event()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except asyncio.CancelledError:
                pass
            self._heartbeat = None
        self.watch.close()
        if self.conn is not None:
            self.conn.close()
        if self._client is not None:
            try:
                await self._client.aclose()
            except (RedisError, OSError):
                pass
            self._client = None

    @property
    def started(self) -> bool:
        return self._client is not None or self.conn is not None

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.connected

    @property
    def usable(self) -> bool:
        """Worth a write now: a cluster (redis-py routes and reconnects), or a link up."""
        return self.cluster or self.connected

    async def connect(self) -> None:
        assert self.conn is not None
        await self.conn.connect()

    # --- scripts -----------------------------------------------------------------
    async def load_scripts(self) -> None:
        if self.cluster:
            for script in self.scripts:
                await self._client.script_load(script.source)  # sent to every primary
            return
        assert self.conn is not None
        replies = await asyncio.gather(*(self.conn.call(pack("SCRIPT", "LOAD", s.source))
                                         for s in self.scripts))
        self._check_loaded(replies)

    def _check_loaded(self, replies: list) -> None:
        for script, sha in zip(self.scripts, replies, strict=True):
            if sha != script.sha.encode():
                raise BackendError(f"SCRIPT LOAD {script.name} returned {sha!r}, "
                                   f"expected {script.sha}")

    # --- set-up, Redis's clock, the heartbeat ----------------------------------------
    def _link_ready(self, replies: list, sent_at: float, answered_at: float) -> None:
        """A new link's setup was answered: scripts loaded, Redis's clock read."""
        n = len(self.scripts)
        self._check_loaded(replies[-1 - n:-1])
        self.clocks.observe(replies[-1], int(sent_at * 1e6), int(answered_at * 1e6))
        self._last_ok_at = max(self._last_ok_at, sent_at)
        if self._heartbeat_due is not None:
            self._heartbeat_due.set()  # check the store marker on this link now

    async def _read_node_clocks(self) -> None:
        """Cluster mode: read every primary's clock (its TIME), as the single node's link
        does on set-up and heartbeat, so that calls carry deadlines there too. A node
        that does not answer keeps its last reading (or none: no deadline on it)."""
        async def read(node: Any) -> None:
            sent = mono_us()
            reply = await self._client.execute_command("TIME", target_nodes=node)
            self.clocks.observe(reply, sent, mono_us(), node.name)

        if not self._client.get_primaries():
            # the cluster did not answer at start: learn its nodes (and load the scripts)
            # now, so a sidecar started before its Redis becomes ready without traffic
            setup = asyncio.ensure_future(self.load_scripts())
            done, _ = await asyncio.wait({setup}, timeout=max(self.stall_s, 1.0))
            if not done:
                setup.cancel()
                self.failed("the cluster did not answer")
                return
            if setup.exception() is not None:
                self.failed(f"cannot load scripts: {setup.exception()!r}")
                return
        reads = [asyncio.ensure_future(read(n)) for n in self._client.get_primaries()]
        if not reads:
            return
        asked_at = time.monotonic()
        done, pending = await asyncio.wait(reads, timeout=self.stall_s)
        for fut in pending:
            fut.cancel()
        failed = [fut.exception() for fut in done if fut.exception() is not None]
        if pending or failed:
            self.failed(f"reading the nodes' clocks: {len(pending)} node(s) did not answer"
                        + (f", {failed[0]!r}" if failed else ""))
        else:
            # every node answered: healthy as of when they were asked (as the single node's
            # heartbeat; without it a sidecar without traffic stayed not ready after a node
            # came back, and a readiness probe would keep the traffic away for good)
            self._last_ok_at = max(self._last_ok_at, asked_at)

    async def _heartbeat_loop(self) -> None:
        # no asyncio.wait_for here: on Python < 3.12 it can swallow the cancellation that
        # close() (or the loop's shutdown) sends, and this loop would then never end
        due = self._heartbeat_due
        assert due is not None
        loop = asyncio.get_running_loop()
        while True:
            timer = loop.call_later(HEARTBEAT_S, due.set)
            try:
                await due.wait()
            finally:
                timer.cancel()
            due.clear()
            try:
                await self._beat()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive any failure
                log.warning("redis heartbeat: %r", exc)

    async def _calls(self, *packed: bytes) -> Optional[list]:
        """Commands on the link, written together; their replies, or None if they did not
        all come within the stall window (then the link is dropped if it is stalled)."""
        assert self.conn is not None
        replies = asyncio.gather(*(self.conn.call(p, counted=False) for p in packed))
        replies.add_done_callback(ignore_reply)  # retrieved even if this task is cancelled
        done, _ = await asyncio.wait({replies}, timeout=self.stall_s)
        if not done:
            replies.cancel()
            if self.conn.stalled(self.stall_s):
                self.conn.lose(ConnectionLost("no reply to the heartbeat"))
            return None
        return replies.result()

    async def _beat(self) -> None:
        if self._on_beat is not None and self.usable:
            await self._on_beat()
        if self.cluster:
            await self._read_node_clocks()
            return
        conn = self.conn
        assert conn is not None
        if not conn.connected:
            if conn.connecting or conn.backing_off():
                return
            try:
                await conn.connect()  # its setup wakes the next beat (the marker check)
            except ConnectionLost as exc:
                self.failed(str(exc))
            return
        sent = mono_us()
        sent_at = time.monotonic()
        try:
            replies = await self._calls(pack("TIME"), pack("GET", self.marker.key))
        except ConnectionError as exc:
            self.failed(f"heartbeat: {exc}")
            return
        if replies is None:
            self.failed(f"no reply to the heartbeat within {self.stall_s * 1000:.0f} ms")
            return
        clock, marker = replies
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                self.failed(f"heartbeat: {reply}")
                return
        self.clocks.observe(clock, sent, mono_us())
        # healthy as of when it was asked: a failure seen since then still counts
        self._last_ok_at = max(self._last_ok_at, sent_at)
        await self.marker.check(marker, self._calls)

    def deadline_on(self, key: str) -> int:
        """Cluster mode: when a call sent now stops being waited for, in the clock of the
        node that holds ``key`` (0: that node's clock not read yet, no deadline)."""
        try:
            node = self._client.get_node_from_key(key)
        except (RedisError, RedisClusterException, IndexError):  # slots not known yet
            return 0
        if node is None:
            return 0
        return self.clocks.deadline_us(time.monotonic() + self.deadline_s, node.name)

    # --- calls -------------------------------------------------------------------
    async def call(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One script call, bounded by the deadline; NOSCRIPT reloads and retries once.
        Every failure is a BackendError."""
        if not self.started:
            raise BackendError("redis backend not started")
        try:
            reply = await asyncio.wait_for(self._send(script, keys, args), self.deadline_s)
        except asyncio.TimeoutError:
            self.drop_if_hung()
            raise self.failed(f"no reply within {self.deadline_s * 1000:.0f} ms") from None
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise self.failed(f"{type(exc).__name__}: {exc}") from None
        self.answered()
        return reply

    async def _send(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        packed = None if self.cluster else pack("EVALSHA", script.sha, len(keys), *keys, *args)
        for attempt in (1, 2):
            if self.cluster:
                # redis-py routes EVALSHA to the node owning the tenant's slot
                self._cluster_round_trips += 1
                try:
                    return await self._client.evalsha(script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    if attempt == 2:
                        raise
            else:
                assert self.conn is not None and packed is not None
                reply = await self.conn.call(packed)
                if not isinstance(reply, hiredis.ReplyError):
                    return reply
                if not str(reply).startswith("NOSCRIPT") or attempt == 2:
                    raise self.failed(f"{script.name}: {reply}")
            # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load, retry once
            await self.load_scripts()
        raise AssertionError("unreachable")

    async def plain(self, *command: Any) -> Any:
        """One plain command (not a script), bounded by the deadline (a single node: on
        the pipelined link, after what was written before it) or the timeout (a cluster,
        routed by its key). Every failure, an error reply included, is a BackendError."""
        if not self.started:
            raise BackendError("redis backend not started")
        if self.cluster:
            try:
                return await asyncio.wait_for(self._client.execute_command(*command),
                                              self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - the one seam
                raise self.failed(f"{command[0]}: {type(exc).__name__}: {exc}") from None
        assert self.conn is not None
        try:
            reply = await asyncio.wait_for(self.conn.call(pack(*command)), self.deadline_s)
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise self.failed(f"{type(exc).__name__}: {exc}") from None
        if isinstance(reply, hiredis.ReplyError):
            raise self.failed(str(reply))
        return reply

    async def commands(self, commands: Sequence[Sequence[Any]]) -> list:
        """Plain commands, each bounded by the timeout (a single node: all written
        together); their replies. Raises what failed, without counting it against the
        link's health (for writes that must never fail the call they go with)."""
        if self.cluster:
            return [await asyncio.wait_for(self._client.execute_command(*c), self.timeout_s)
                    for c in commands]
        assert self.conn is not None
        return await asyncio.wait_for(asyncio.gather(
            *(self.conn.call(pack(*c)) for c in commands)), self.timeout_s)

    def send_unawaited(self, *command: Any) -> bool:
        """A command written on the single node's link if it is up, its reply ignored (a
        lost write only means the caller's own copy is the record); False if not sent."""
        if self.conn is None or not self.conn.connected:
            return False
        self.conn.submit(pack(*command)).add_done_callback(ignore_reply)
        return True

    def submit(self, packed: bytes) -> asyncio.Future:
        """An encoded command on the single node's link (connected): the future of its reply."""
        assert self.conn is not None
        return self.conn.submit(packed)

    def submit_all(self, commands: Sequence[Sequence[Any]]) -> asyncio.Future:
        """Plain commands on the single node's link (connected), not awaited here: the
        future of their replies (an exception in place of a reply that failed)."""
        assert self.conn is not None
        return asyncio.gather(*(self.conn.submit(pack(*c)) for c in commands),
                              return_exceptions=True)

    @property
    def round_trips(self) -> int:
        """Writes to Redis: each carries every command queued in one event-loop tick."""
        return self.conn.writes if self.conn is not None else self._cluster_round_trips

    @property
    def connection_attempts(self) -> tuple[int, int]:
        """(attempts that opened a working link, attempts that failed) since start."""
        return (self.conn.opened, self.conn.failed) if self.conn is not None else (0, 0)

    # --- health ------------------------------------------------------------------
    def failed(self, message: str, timed_out: bool = False) -> BackendError:
        """Record a failure (readiness, the last error) and return the error to raise."""
        self.errors += 1
        self._last_error = message
        self._last_error_at = time.monotonic()
        text = f"redis {self.where}: {message}"
        return BackendTimeout(text) if timed_out else BackendError(text)

    def answered(self) -> None:
        """A call was answered: healthy as of now."""
        self._last_ok_at = time.monotonic()

    def drop_if_hung(self) -> None:
        if self.conn is not None and self.conn.stalled(self.stall_s):
            # nothing at all has come back for a long while: drop the link (failing the
            # calls queued on it) so the backlog stays bounded and the next call reconnects
            self.conn.lose(ConnectionLost(
                f"nothing read from the store for {self.stall_s * 1000:.0f} ms"))

    def status(self, note: str = "") -> BackendStatus:
        if self._last_error_at and self._last_error_at >= self._last_ok_at:
            return BackendStatus(False, f"redis: {self._last_error}{note}")
        return BackendStatus(True, f"redis {self.where}{note}")
