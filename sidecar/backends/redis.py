"""Shared backend: one truth across replicas in Redis / Valkey, changed only by the
Lua scripts in lua/ (decide.lua mirrors the Cython core; settle.lua reconciles).

- One script call per batch of decisions: the decisions queued in one event-loop tick
  go out as one EVALSHA of decide_batch.lua (up to BATCH_MAX each; a lone decision as
  decide_one.lua) on one pipelined connection (sidecar/backends/resp.py), replies
  matched in order; nothing opens a connection per decision. No timer per batch: one
  watch over the link (link_watch.py) gives a call up by the failure mode only when the
  store has sent nothing for ``timeout_ms``, and sheds it (BackendOverloaded) when it
  misses its caller's deadline on a link that keeps answering.
- The EVALSHA commands are encoded here, with the per-tenant and per-limits parts
  encoded once and cached: redis-py's generic pack_command costs ~50 µs for a
  20-argument call. redis-py does SCRIPT LOAD and the whole cluster mode
  (docs/redis.md says why the hot path does not go through it).
- Scripts are loaded (SCRIPT LOAD) on every new link, before any decision is written
  on it, and called by SHA; on NOSCRIPT (SCRIPT FLUSH while connected) they are
  loaded again and the call retried once.
- A decision carries its deadline in Redis's clock (lua/deadline.lua): Redis refuses
  to apply one that reaches it after its caller was answered by the failure mode, so
  a decision stuck behind a stalled server is never applied blind (docs/redis.md).
- A heartbeat every HEARTBEAT_S reads Redis's clock (for those deadlines), checks the
  store marker (a store that lost its data is reported, not silently trusted) and
  reconnects, with backoff, when the link is down.
- Every failure (refused, reset, silence, NOSCRIPT that will not reload, a reply
  that is not what the script returns) is raised as BackendError: the service then
  applies the configured failure mode. A call late behind the sidecar's own work is
  BackendOverloaded: the service sheds it, and says so.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
import hiredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from sidecar.backends.resp import ConnectionLost, PipelinedConnection
from sidecar.backends.lease import LeaseManager
from sidecar.backends.link_watch import LinkWatch, deadline_s
from sidecar.backends.settle_batch import SettleBatcher
from sidecar.backends.spend_index import SpendIndex, read_spend_cells
from sidecar.backends.tls import tls_context
from sidecar.backends.url import check_redis_url

from sidecar import _core
from sidecar.backends.base import (TAKEN_RESERVATION, BackendError, BackendOverloaded,
                                   BackendStatus, BackendTimeout, Candidate, LateReply,
                                   Settlement)
from sidecar.ledger.spend import LAST_DAY, SpendCell, SpendRecord, day_of
from sidecar.policy import schema

log = logging.getLogger("kt.redis")
# how long a settled request id is remembered (a repeated report within it is a no-op)
SETTLED_TTL_MS = 7 * 24 * 3600 * 1000
# a shared reservation outlives the local one (sidecar/service.py RESERVATION_TTL_S, 600 s,
# expired within seconds of it), so the deciding replica's expiry finds the record (never
# settled: it records the expiry) or the mark of the replica that took it (settled there)
RESERVATION_TTL_MS = 900 * 1000
# how often the link is checked while connected (Redis's clock, the store marker) and a
# reconnect tried while it is down (the backoff still applies)
HEARTBEAT_S = 1.0
# how fast the offset between this host's monotonic clock and Redis's TIME may drift
# (a bound, 100 ppm: NTP keeps both far closer); see RedisBackend._clock_offset
CLOCK_DRIFT = 1e-4
# how long /readyz mentions decisions shed as overloaded after the last one
SHED_NOTE_S = 60.0
# the key whose disappearance shows the store lost its data (docs/redis.md, persistence);
# under the key prefix, outside every tenant's {hash tag}
MARKER_KEY = "store-marker"


def _ignore_reply(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a lost write only means the local book is the record


def load_script(name: str) -> str:
    """lua/<name> from the source tree when running from a checkout, else the packaged copy."""
    repo = Path(__file__).resolve().parents[2] / "lua" / name
    if repo.is_file():
        return repo.read_text()
    return resources.files("sidecar").joinpath("lua", name).read_text()


def redact(url: str) -> str:
    """The URL without its user and password, for logs, errors and /readyz."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, "***@" + netloc, parts.path, parts.query, ""))


def _bulk(arg: Any) -> bytes:
    b = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def pack(*args: Any) -> bytes:
    """One command in RESP: *N, then each argument as a bulk string."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


# decisions sent in one script call at most: bounds how long one call holds Redis
# (a decision's script work is a few µs)
BATCH_MAX = 64


class _Script:
    def __init__(self, name: str, *files: str) -> None:
        """A script made of lua/common.lua and ``files`` (Redis scripts cannot import
        one another, so the shared parts are joined at load)."""
        self.name = name
        self.source = "\n".join(load_script(f) for f in ("common.lua", *(files or (name,))))
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


def _mono_us() -> int:
    return time.monotonic_ns() // 1000


def _is_outcome(reply: Any) -> bool:
    # decide.lua: 17 integers; routed.lua: 20 (the provider's fields after them)
    return (isinstance(reply, list) and len(reply) in (17, 20)
            and all(isinstance(x, int) for x in reply))


class _Batch:
    """Decisions sent in one script call: (encoded KEYS, KEYS count, encoded ARGV, ARGV
    count, future, LateReply). ``deadline``: when its callers stop waiting (monotonic s),
    ``written_at``: when it went to the link (link_watch.Owed). ``routed``: decisions
    with providers (routed.lua, docs/providers.md), whose key counts vary; else each has
    the tenant's three keys (decide.lua)."""
    __slots__ = ("items", "attempt", "deadline", "written_at", "routed", "backend", "reply")

    def __init__(self, backend: "RedisBackend", items: list, now: float,
                 routed: bool = False) -> None:
        self.backend = backend
        self.items = items
        self.attempt = 1
        self.written_at = now
        self.deadline = now + backend.deadline_s
        self.routed = routed
        self.reply: Optional[asyncio.Future] = None  # the link's future of its reply

    def answered(self) -> bool:
        return (self.reply is not None and self.reply.done()) or all(
            it[4].done() for it in self.items)

    def give_up(self, store_silent: bool, silent_for: float) -> None:
        # the callers are answered now; the batch stays owed on the link and, if its reply
        # still comes, _batch_replied hands the outcomes to their LateReply
        self.backend._give_up(self.items, store_silent, silent_for)


class RedisBackend:
    name = "redis"

    def __init__(self, cfg: schema.RedisBackend,
                 clock_override: Optional[Callable[[], int]] = None) -> None:
        """``clock_override`` (tests only) passes a time to the scripts instead of Redis's TIME."""
        self.cfg = cfg
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
        self._stall_s = max(10 * self.timeout_s, 2 * self.deadline_s, 0.5)
        self.watch = LinkWatch(lambda: self.conn, self.timeout_s, self._drop_if_hung)
        self.shed = 0  # calls given up on past their deadline while the store answered
        self._shed_at = 0.0
        self.clock_override = clock_override
        self.prefix = cfg.key_prefix
        self.shares_reservations = cfg.shared_reservations and not cfg.cluster
        self.decide_script = _Script("decide.lua", "decide.lua", "deadline.lua", "decide_one.lua")
        self.batch_script = _Script("decide_batch.lua", "decide.lua", "deadline.lua",
                                    "decide_batch.lua")
        # the ledger's spend per tenant, day and model rides on settle (lua/ledger_spend.lua)
        self.settle_script = _Script("settle.lua", "ledger_spend.lua", "settle.lua")
        self.record_spend_script = _Script("record_spend.lua", "ledger_spend.lua",
                                           "record_spend.lua")
        # which tenants spent on which day, for /v1/spend over a range (spend_index.py)
        self.spend_index = SpendIndex(self.prefix)
        # settlements of one loop tick as one script call (single node; settle_batch.py)
        self._settles = SettleBatcher(self)
        # provider quotas (docs/providers.md): one node decides tenant and provider in one
        # script; a cluster takes the provider first, then decides the tenant
        self.routed_script = _Script("routed.lua", "provider.lua", "decide.lua", "routed.lua",
                                     "deadline.lua", "routed_one.lua")
        self.routed_batch_script = _Script("routed_batch.lua", "provider.lua", "decide.lua",
                                           "routed.lua", "deadline.lua", "routed_batch.lua")
        self.provider_take_script = _Script("provider_take.lua", "provider.lua",
                                            "provider_take.lua")
        self.provider_settle_script = _Script("provider_settle.lua", "provider.lua",
                                              "provider_settle.lua")
        self._queued_routed: list[tuple[bytes, int, bytes, int, asyncio.Future, LateReply]] = []
        self.provider_refunds = {"ok": 0, "failed": 0}  # cluster: holds given back
        # cluster: whether each tenant's last decision found it below its low-water mark,
        # to guess the tier whose providers to hold first
        self._below_low_water: dict[str, bool] = {}
        self._candidates_packed: dict[tuple, tuple[bytes, bytes]] = {}
        # capacity leases for hot tenants (single node or cluster; lease.py)
        # (not with a test clock for the scripts: the leases need the same clock, lease.py)
        self.leases: Optional[LeaseManager] = LeaseManager(self) if (
            cfg.leases and clock_override is None) else None
        self.client: Any = None  # redis-py: cluster mode only (and URL parsing)
        self.conn: Optional[PipelinedConnection] = None
        # cached encodings: per tenant (its three keys), per Limits (their ARGV)
        self._tenant_keys: dict[str, bytes] = {}
        self._queued: list[tuple[bytes, int, bytes, int, asyncio.Future, LateReply]] = []
        self.late_replies = 0  # replies that came after their decision had timed out
        self._limit_args: dict[_core.Limits, tuple[bytes, int]] = {}
        self._last_error = ""
        self._last_error_at = 0.0
        self._last_ok_at = 0.0
        self._cluster_round_trips = 0
        self.decisions = 0
        self.errors = 0
        self.expired = 0  # decisions Redis refused to apply: they came after their deadline
        # lower bound of (Redis's TIME - this host's monotonic clock) in µs, and when it
        # was measured (monotonic µs), per node ("" on a single node, a node's name on a
        # cluster: each primary has its own clock); absent until first read
        self._offsets: dict[str, tuple[int, int]] = {}
        self.marker_key = f"{self.prefix}:{MARKER_KEY}"
        self._marker: Optional[bytes] = None  # the store marker as last seen
        self.store_resets = 0  # times the store was found to have lost its data
        self._store_reset_note = ""
        self._heartbeat: Optional[asyncio.Task] = None
        self._heartbeat_due: Optional[asyncio.Event] = None

    # --- lifecycle ---------------------------------------------------------
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
        if self.cfg.cluster:
            self.client = RedisCluster.from_url(self.cfg.url, **opts)
        else:
            self.client = aioredis.Redis.from_url(self.cfg.url, **opts)
            kw = self.client.connection_pool.connection_kwargs
            setup = []
            if kw.get("password"):
                setup.append(pack("AUTH", *([kw["username"]] if kw.get("username") else []),
                                  kw["password"]))
            if kw.get("db"):
                setup.append(pack("SELECT", kw["db"]))
            # every new link loads the scripts and reads Redis's clock before any decision
            # is written on it: after a restart (scripts gone) the first decisions are sent
            # as they are, and a server that accepts connections without answering (stopped)
            # never has a decision queued on a fresh link
            setup += [pack("SCRIPT", "LOAD", s.source) for s in self._scripts()]
            setup.append(pack("TIME"))
            self.conn = PipelinedConnection(kw.get("host", "127.0.0.1"), int(kw.get("port", 6379)),
                                            max(self._stall_s, 0.25), tuple(setup),
                                            unix_path=kw.get("path"),
                                            ssl_context=tls_context(self.cfg),
                                            on_setup=self._link_ready)
            await self.client.aclose()  # it only parsed the URL: nothing else uses it here
            self.client = None
            self._heartbeat_due = asyncio.Event()
            self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())
            try:
                await self.conn.connect()
            except ConnectionLost as exc:
                # Start anyway: decisions follow the failure mode until Redis answers (the
                # heartbeat reconnects, with backoff).
                self._failed(str(exc))
                log.error("redis at %s not available at start: %s", self.where, exc)
            return
        try:
            await asyncio.wait_for(self._load_scripts(), max(self.timeout_s * 20, 1.0))
            await self._read_node_clocks()
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
            # Start anyway: decisions follow the failure mode until Redis answers (the
            # heartbeat learns the nodes then). redis-py's "cannot be connected" is a
            # RedisClusterException, not a RedisError: it used to end `kt serve` here.
            self._failed(f"cannot load scripts: {exc!r}")
            log.error("redis at %s not available at start: %r", self.where, exc)
        # the nodes' clocks read again every beat (drift, new primaries after a failover)
        self._heartbeat_due = asyncio.Event()
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def _scripts(self) -> tuple[_Script, ...]:
        scripts = (self.decide_script, self.batch_script, self.settle_script,
                   self._settles.script, self.routed_script, self.routed_batch_script,
                   self.provider_take_script, self.provider_settle_script,
                   self.record_spend_script)
        return scripts + self.leases.scripts if self.leases is not None else scripts

    async def close(self) -> None:
        if self.leases is not None:
            await self.leases.close()  # what the leases hold goes back to the pool
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
        if self.client is not None:
            try:
                await self.client.aclose()
            except (RedisError, OSError):
                pass
            self.client = None

    async def _load_scripts(self) -> None:
        if self.cfg.cluster:
            for script in self._scripts():
                await self.client.script_load(script.source)  # sent to every primary
            return
        assert self.conn is not None
        replies = await asyncio.gather(*(self.conn.call(pack("SCRIPT", "LOAD", s.source))
                                         for s in self._scripts()))
        self._check_loaded(replies)

    def _check_loaded(self, replies: list) -> None:
        for script, sha in zip(self._scripts(), replies, strict=True):
            if sha != script.sha.encode():
                raise BackendError(f"SCRIPT LOAD {script.name} returned {sha!r}, "
                                   f"expected {script.sha}")

    # --- the link: set-up, Redis's clock, the store marker ------------------------
    def _link_ready(self, replies: list, sent_at: float, answered_at: float) -> None:
        """A new link's setup was answered: scripts loaded, Redis's clock read."""
        n = len(self._scripts())
        self._check_loaded(replies[-1 - n:-1])
        self._observe_clock(replies[-1], int(sent_at * 1e6), int(answered_at * 1e6))
        self._last_ok_at = max(self._last_ok_at, sent_at)
        if self._heartbeat_due is not None:
            self._heartbeat_due.set()  # check the store marker on this link now

    def _observe_clock(self, reply: Any, sent_us: int, answered_us: int,
                       node: str = "") -> None:
        """One reading of Redis's TIME, taken between ``sent_us`` and ``answered_us`` on
        this host's monotonic clock. Keeps the best lower bound of the offset between the
        two clocks: a decision's deadline is its caller's (monotonic) deadline plus that
        bound, so Redis may refuse a decision a little early (by the reading's round
        trip, ~0.1 ms on a LAN) but never applies one after its caller gave up on it."""
        redis_us = int(reply[0]) * 1_000_000 + int(reply[1])
        lo, hi = redis_us - answered_us, redis_us - sent_us
        current = self._clock_offset(answered_us, node)
        # a tighter bound, or Redis's clock was set back (the old bound is then too high)
        if current is None or lo > current or hi < current:
            self._offsets[node] = (lo, answered_us)

    def _clock_offset(self, now_us: int, node: str = "") -> Optional[int]:
        """The offset's lower bound now: the last one, less the drift it may have had since."""
        known = self._offsets.get(node)
        if known is None:
            return None
        return known[0] - int(CLOCK_DRIFT * (now_us - known[1]))

    async def _read_node_clocks(self) -> None:
        """Cluster mode: read every primary's clock (its TIME), as the single node's link
        does on set-up and heartbeat, so that decisions carry deadlines there too. A node
        that does not answer keeps its last reading (or none: no deadline on it)."""
        async def read(node: Any) -> None:
            sent = _mono_us()
            reply = await self.client.execute_command("TIME", target_nodes=node)
            self._observe_clock(reply, sent, _mono_us(), node.name)

        if not self.client.get_primaries():
            # the cluster did not answer at start: learn its nodes (and load the scripts)
            # now, so a sidecar started before its Redis becomes ready without traffic
            setup = asyncio.ensure_future(self._load_scripts())
            done, _ = await asyncio.wait({setup}, timeout=max(self._stall_s, 1.0))
            if not done:
                setup.cancel()
                self._failed("the cluster did not answer")
                return
            if setup.exception() is not None:
                self._failed(f"cannot load scripts: {setup.exception()!r}")
                return
        reads = [asyncio.ensure_future(read(n)) for n in self.client.get_primaries()]
        if not reads:
            return
        asked_at = time.monotonic()
        done, pending = await asyncio.wait(reads, timeout=self._stall_s)
        for fut in pending:
            fut.cancel()
        failed = [fut.exception() for fut in done if fut.exception() is not None]
        if pending or failed:
            self._failed(f"reading the nodes' clocks: {len(pending)} node(s) did not answer"
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
        replies.add_done_callback(_ignore_reply)  # retrieved even if this task is cancelled
        done, _ = await asyncio.wait({replies}, timeout=self._stall_s)
        if not done:
            replies.cancel()
            if self.conn.stalled(self._stall_s):
                self.conn.lose(ConnectionLost("no reply to the heartbeat"))
            return None
        return replies.result()

    async def _beat(self) -> None:
        if self.spend_index.has_failed() and (self.cfg.cluster or (
                self.conn is not None and self.conn.connected)):
            await self._resend_spend_index()
        if self.cfg.cluster:
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
                self._failed(str(exc))
            return
        sent = _mono_us()
        sent_at = time.monotonic()
        try:
            replies = await self._calls(pack("TIME"), pack("GET", self.marker_key))
        except ConnectionError as exc:
            self._failed(f"heartbeat: {exc}")
            return
        if replies is None:
            self._failed(f"no reply to the heartbeat within {self._stall_s * 1000:.0f} ms")
            return
        clock, marker = replies
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                self._failed(f"heartbeat: {reply}")
                return
        self._observe_clock(clock, sent, _mono_us())
        # healthy as of when it was asked: a failure seen since then still counts
        self._last_ok_at = max(self._last_ok_at, sent_at)
        if marker is None or marker != self._marker:
            await self._marker_changed(marker)

    async def _marker_changed(self, marker: Optional[bytes]) -> None:
        """The store marker is missing, or not the one this sidecar saw: the store lost its
        data (restart without persistence, FLUSHALL, failover to an empty replica) — unless
        this sidecar never saw one (its first look at a new store)."""
        assert self.conn is not None
        if marker is None:
            made = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {uuid.uuid4().hex}"
            # one marker for every replica: the first SET NX wins, all read the winner
            replies = await self._calls(pack("SET", self.marker_key, made, "NX"),
                                        pack("GET", self.marker_key))
            if replies is None or not isinstance(replies[1], bytes):
                return  # the next beat looks again
            marker = replies[1]
        if self._marker is not None:
            self.store_resets += 1
            self._store_reset_note = (
                f"the store lost its data at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
                f" ({self.store_resets} time(s) since start): its marker {self.marker_key} was "
                "gone or replaced, so budgets and buckets started again from zero "
                "(docs/redis.md, persistence)")
            log.error("redis %s: %s", self.where, self._store_reset_note)
        elif isinstance(marker, bytes):
            log.info("redis %s: store marker %s = %s", self.where, self.marker_key,
                     marker.decode(errors="replace"))
        self._marker = marker if isinstance(marker, bytes) else None

    # --- decisions ---------------------------------------------------------
    def keys(self, tenant: str) -> tuple[str, str, str]:
        tag = f"{self.prefix}:{{{tenant}}}"  # one hash tag: one cluster slot per tenant
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:budget"

    def _now_arg(self) -> int:
        return self.clock_override() if self.clock_override is not None else 0

    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                     late: Optional[LateReply] = None) -> _core.Outcome:
        if self.leases is not None:  # a hot tenant: within a lease, decided here (lease.py)
            leased = await self.leases.decide(tenant, limits, tier, input_tokens, output_tokens,
                                              firm_tokens, commit_on_deny)
            if leased is not None:
                self.decisions += 1
                return leased
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        if self.cfg.cluster:
            # redis-py routes each EVALSHA to the tenant's node (no batching across slots),
            # with the deadline in that node's clock (lua/deadline.lua; 0 = not read yet)
            keys = list(self.keys(tenant))
            reply = await self._call(self.decide_script, keys, request
                                     + self._limit_args_of(limits) + [self._deadline_on(keys[0])],
                                     None)
        else:
            limits_packed, n_limit_args = self._limits_packed(limits)
            late = late or LateReply()
            fut = self._queue_decision(
                self._keys_packed(tenant), 3, b"".join([_bulk(a) for a in request])
                + limits_packed, len(request) + n_limit_args, late)
            try:
                reply = await fut
            except asyncio.CancelledError:
                # cancelled after the reply had arrived but before this resumed: the
                # decision was applied, so its outcome goes to the LateReply, whose handler
                # the caller sets as the cancellation passes through it (soon after this)
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    asyncio.get_running_loop().call_soon(self._late_after_cancel, late,
                                                         fut.result())
                raise
        if isinstance(reply, hiredis.ReplyError):  # this decision failed in its batch
            raise self._failed(f"decide.lua: {reply}")
        if not _is_outcome(reply):
            raise self._failed(f"decide.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _core.Outcome(*reply)

    def _deadline_on(self, key: str) -> int:
        """Cluster mode: when this call's caller stops waiting, in the clock of the node
        that holds ``key`` (0: that node's clock not read yet, no deadline)."""
        now = _mono_us()
        try:
            node = self.client.get_node_from_key(key)
        except (RedisError, RedisClusterException, IndexError):  # slots not known yet
            return 0
        offset = self._clock_offset(now, node.name) if node is not None else None
        return now + int(self.deadline_s * 1e6) + offset if offset is not None else 0

    def _late_after_cancel(self, late: LateReply, reply: Any) -> None:
        if late.on_outcome is not None and _is_outcome(reply):
            self.late_replies += 1
            late.on_outcome(_core.Outcome(*reply))

    # --- provider quotas (docs/providers.md) -------------------------------------
    def provider_keys(self, provider: str) -> tuple[str, str, str]:
        # "kt:prov:{id}:..." can never be a tenant's key: those start "kt:{"
        tag = f"{self.prefix}:prov:{{{provider}}}"
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:rpd"

    @staticmethod
    def _quota_args_of(quota: _core.Quota) -> list:
        return [quota.rpm, quota.tpm, quota.rpd, repr(quota.burst),
                *(repr(f) for f in quota.floors)]

    def _candidate_packed(self, c: Candidate) -> tuple[bytes, bytes]:
        """A candidate's three keys and its 8 arguments (tier, quota), encoded once."""
        key = (c.provider, c.tier, c.quota)
        packed = self._candidates_packed.get(key)
        if packed is None:
            if len(self._candidates_packed) > 10_000:
                self._candidates_packed.clear()
            packed = self._candidates_packed[key] = (
                b"".join(_bulk(k) for k in self.provider_keys(c.provider)),
                b"".join(_bulk(a) for a in [c.tier, *self._quota_args_of(c.quota)]))
        return packed

    async def decide_routed(self, tenant: str, limits: _core.Limits, tier: int,
                            input_tokens: int, output_tokens: int, firm_tokens: int,
                            commit_on_deny: bool, priority: int, spill: int,
                            candidates: Sequence[Candidate],
                            late: Optional[LateReply] = None) -> _core.Outcome:
        if self.cfg.cluster:
            return await self._decide_routed_cluster(
                tenant, limits, tier, input_tokens, output_tokens, firm_tokens, commit_on_deny,
                priority, spill, candidates)
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        limits_packed, n_limit_args = self._limits_packed(limits)
        keys = [self._keys_packed(tenant)]
        args = [b"".join([_bulk(a) for a in request]), limits_packed,
                _bulk(priority), _bulk(spill), _bulk(len(candidates))]
        for c in candidates:
            ckeys, cargs = self._candidate_packed(c)
            keys.append(ckeys)
            args.append(cargs)
        late = late or LateReply()
        fut = self._queue_decision(
            b"".join(keys), 3 + 3 * len(candidates), b"".join(args),
            len(request) + n_limit_args + 3 + 8 * len(candidates), late, routed=True)
        try:
            reply = await fut
        except asyncio.CancelledError:
            # as decide(): applied, but its caller is gone; the outcome goes to its LateReply
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                asyncio.get_running_loop().call_soon(self._late_after_cancel, late, fut.result())
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise self._failed(f"routed.lua: {reply}")
        if not (_is_outcome(reply) and len(reply) == 20):
            raise self._failed(f"routed.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _core.Outcome(*reply)

    async def _provider_take(self, c: Candidate, priority: int, tokens: int) -> list:
        keys = list(self.provider_keys(c.provider))
        args = [self._now_arg(), priority, tokens, *self._quota_args_of(c.quota)]
        reply = await self._call(self.provider_take_script, keys, args, None if self.cfg.cluster
                                 else pack("EVALSHA", self.provider_take_script.sha, 3, *keys,
                                           *args))
        if not (isinstance(reply, list) and len(reply) == 3
                and all(isinstance(x, int) for x in reply)):
            raise self._failed(f"provider_take.lua: unexpected reply {str(reply)[:120]}")
        return reply

    async def _give_back(self, c: Candidate, tokens: int) -> None:
        """Return a provider hold whose tenant step did not stand (a fresh marker: applied
        once). A failure leaves the hold to refill: capacity over-counted, never lost."""
        try:
            await self.settle_provider(c.provider, c.quota, f"refund:{uuid.uuid4().hex}",
                                       -tokens, -1)
            self.provider_refunds["ok"] += 1
        except BackendError as exc:
            self.provider_refunds["failed"] += 1
            log.warning("could not give back a hold of provider %s (1 request, %d tokens stay "
                        "taken until they refill): %s", c.provider, tokens, exc)

    async def _decide_routed_cluster(self, tenant: str, limits: _core.Limits, tier: int,
                                     input_tokens: int, output_tokens: int, firm_tokens: int,
                                     commit_on_deny: bool, priority: int, spill: int,
                                     candidates: Sequence[Candidate]) -> _core.Outcome:
        """Redis Cluster: a tenant's keys and a provider's are in different slots, and a
        script touches one slot. Step 1 holds provider capacity (provider_take.lua on the
        provider's slot, candidates in order, the tier guessed from the tenant's last
        decision); step 2 decides the tenant (decide.lua) at the held provider's tier. Only
        a provider hold is ever given back (the tenant refused, or went to another tier
        than guessed): a tenant's spend is refunded only if, in that last case, no provider
        of its tier has room (docs/providers.md)."""
        tokens = input_tokens + output_tokens
        ntiers = limits.ntiers
        shift = 1 if self._below_low_water.get(tenant) and tier + 1 < ntiers else 0
        t0 = tier + shift

        async def hold(tiers: range) -> tuple[int, list, int]:
            """The first candidate of ``tiers`` that takes the request (its index and
            provider_take.lua's reply), or -1 and the soonest wait."""
            wait = -1
            for t in tiers:
                for i, c in enumerate(candidates):
                    if c.tier != t:
                        continue
                    r = await self._provider_take(c, priority, tokens)
                    if r[0] == 0:
                        return i, r, wait
                    if r[0] > 0 and (wait < 0 or r[0] < wait):
                        wait = r[0]
            return -1, [], wait

        held, took, best = await hold(range(t0, min(ntiers, t0 + spill + 1)))
        if held < 0:
            return _refusal(t0, best)
        c = candidates[held]
        asked = tier + (c.tier - t0)
        out = await self.decide(tenant, limits, asked, input_tokens, output_tokens, firm_tokens,
                                commit_on_deny)
        if asked + 1 < ntiers:  # low water moves a request one tier down, where there is one
            if len(self._below_low_water) > 100_000:
                self._below_low_water.clear()
            self._below_low_water[tenant] = out.tier > asked
        if not (out.admitted or commit_on_deny):
            await self._give_back(c, tokens)
            return out
        if out.tier == c.tier:
            if out.charged_tokens != tokens:  # the tenant trimmed a defaulted output size
                await self.settle_provider(c.provider, c.quota, f"trim:{uuid.uuid4().hex}",
                                           out.charged_tokens - tokens)
            return _with_provider(out, held, took[1], took[2], tier, spilled=c.tier > t0)
        # the tenant's low-water state changed since its last decision: it was charged at
        # out.tier, whose providers serve another model
        await self._give_back(c, tokens)
        tokens = out.charged_tokens
        held, took, best = await hold(range(out.tier, out.tier + 1))
        if held >= 0:
            return _with_provider(out, held, took[1], took[2], tier, spilled=False)
        # the one case that refunds a tenant: its charge, made for a request no provider
        # of its tier can take (the RPM slot is not given back: refused, never over-admitted)
        await self.settle(tenant, limits, f"provider-refund:{uuid.uuid4().hex}",
                          -out.charged_tokens, -out.charged_cost, out.period_start_us)
        return _refusal(out.tier, best)

    async def settle_provider(self, provider: str, quota: _core.Quota, marker: str,
                              delta_tokens: int, delta_requests: int = 0) -> bool:
        keys = [*self.provider_keys(provider), f"{self.prefix}:prov:{{{provider}}}:settled:{marker}"]
        args = [self._now_arg(), delta_tokens, delta_requests, *self._quota_args_of(quota),
                SETTLED_TTL_MS]
        packed = None if self.cfg.cluster else pack(
            "EVALSHA", self.provider_settle_script.sha, 4, *keys, *args)
        reply = await self._call(self.provider_settle_script, keys, args, packed)
        if reply not in (0, 1):
            raise self._failed(f"provider_settle.lua: unexpected reply {str(reply)[:120]}")
        return reply == 1

    # --- batching (single node) ------------------------------------------------
    def _queue_decision(self, keys: bytes, nkeys: int, args: bytes, nargs: int,
                        late: LateReply, routed: bool = False) -> asyncio.Future:
        if self.client is None and self.conn is None:
            raise BackendError("redis backend not started")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self._queued and not self._queued_routed:
            loop.call_soon(self._flush_decisions)
        (self._queued_routed if routed else self._queued).append(
            (keys, nkeys, args, nargs, fut, late))
        return fut

    def _flush_decisions(self) -> None:
        now = time.monotonic()
        for routed in (False, True):
            if routed:
                queued, self._queued_routed = self._queued_routed, []
            else:
                queued, self._queued = self._queued, []
            for i in range(0, len(queued), BATCH_MAX):
                batch = _Batch(self, queued[i:i + BATCH_MAX], now, routed)
                self.watch.owe(batch)
                self._send_batch(batch)

    def _send_batch(self, batch: _Batch) -> None:
        assert self.conn is not None
        if not self.conn.connected:
            asyncio.get_running_loop().create_task(self._connect_then_send(batch))
            return
        items = batch.items
        # the callers' deadline in Redis's clock (lua/deadline.lua): past it, Redis applies
        # nothing, for its callers have been answered
        offset = self._clock_offset(_mono_us())
        deadline = _bulk(int(batch.deadline * 1e6) + offset if offset is not None else 0)
        if len(items) == 1:
            keys, nkeys, args, nargs, _, _ = items[0]
            one = self.routed_script if batch.routed else self.decide_script
            packed = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (
                4 + nkeys + nargs, one.sha.encode()) + _bulk(nkeys) + keys + args + deadline
        else:
            n = len(items)
            per = 2 if batch.routed else 1  # counts sent before each decision's ARGV
            many = self.routed_batch_script if batch.routed else self.batch_script
            nkeys = sum(it[1] for it in items)
            parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (
                5 + nkeys + per * n + sum(it[3] for it in items), many.sha.encode()),
                _bulk(nkeys)]
            parts += [it[0] for it in items]
            parts.append(_bulk(n))
            for _, nk, args, nargs, _, _ in items:
                if batch.routed:
                    parts.append(_bulk(nk))
                parts.append(_bulk(nargs))
                parts.append(args)
            parts.append(deadline)
            packed = b"".join(parts)
        batch.reply = self.conn.submit(packed)
        batch.reply.add_done_callback(lambda fut: self._batch_replied(batch, fut))
        # after submit, which restarts the link's silence when nothing else was owed
        batch.written_at = time.monotonic()

    async def _connect_then_send(self, batch: _Batch) -> None:
        assert self.conn is not None
        try:
            await self.conn.connect()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail_batch(batch, f"{type(exc).__name__}: {exc}")
            return
        if any(not it[4].done() for it in batch.items):
            self._send_batch(batch)

    def _batch_replied(self, batch: _Batch, fut: asyncio.Future) -> None:
        if fut.cancelled():
            self._fail_batch(batch, "cancelled")
            return
        exc = fut.exception()
        if exc is not None:
            self._fail_batch(batch, f"{type(exc).__name__}: {exc}")
            return
        reply = fut.result()
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("KTEXPIRED"):
                # it reached Redis after its callers' deadline: nothing was applied. Redis
                # answered it, so callers still waiting were held up by the work in front
                # of them, not by a store that is down: shed, not the failure mode
                self.expired += len(batch.items)
                self._give_up(batch.items, False, 0.0)
                return
            if str(reply).startswith("NOSCRIPT") and batch.attempt == 1:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load, resend
                batch.attempt = 2
                asyncio.get_running_loop().create_task(self._reload_then_send(batch))
                return
            if batch.routed:
                name = "routed.lua" if len(batch.items) == 1 else "routed_batch.lua"
            else:
                name = "decide.lua" if len(batch.items) == 1 else "decide_batch.lua"
            self._fail_batch(batch, f"{name}: {reply}")
            return
        self._last_ok_at = time.monotonic()
        items = batch.items
        if len(items) == 1:
            replies = [reply]
        elif isinstance(reply, list) and len(reply) == len(items):
            replies = reply
        else:
            self._fail_batch(batch, f"decide_batch.lua: unexpected reply {str(reply)[:120]}")
            return
        loop = asyncio.get_running_loop()
        for it, one in zip(items, replies, strict=True):
            if not it[4].done():
                it[4].set_result(one)
            else:
                # its caller timed out and was answered by the failure mode, or was
                # cancelled, yet Redis applied the decision: the service puts the charge
                # right. Looked at on the next turn: a caller cancelled just now has its
                # future cancelled at once, but sets its handler only when its task runs,
                # which is already queued ahead of this
                loop.call_soon(self._late_after_cancel, it[5], one)

    async def _reload_then_send(self, batch: _Batch) -> None:
        try:
            await self._load_scripts()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail_batch(batch, f"NOSCRIPT, and reloading failed: {exc!r}")
            return
        self._send_batch(batch)

    def _give_up(self, items: list, store_silent: bool, silent_for: float) -> None:
        """Answer the callers still waiting in ``items``: BackendTimeout when the store has
        not answered (the failure mode decides), else BackendOverloaded (shed)."""
        waiting = [it[4] for it in items if not it[4].done()]
        if not waiting:
            return
        if store_silent:
            exc: BackendError = self._failed(
                f"no reply: nothing read from the store for {silent_for * 1000:.0f} ms "
                f"(timeout_ms {self.cfg.timeout_ms})", timed_out=True)
        else:
            self.shed += len(waiting)
            self._shed_at = time.monotonic()
            exc = BackendOverloaded(
                f"redis {self.where}: not decided within {self.deadline_s * 1000:.0f} ms while "
                "the store kept answering: this sidecar is overloaded")
        for fut in waiting:
            fut.set_exception(exc)

    def _drop_if_hung(self) -> None:
        if self.conn is not None and self.conn.stalled(self._stall_s):
            # nothing at all has come back for a long while: drop the link (failing the
            # calls queued on it) so the backlog stays bounded and the next call reconnects
            self.conn.lose(ConnectionLost(
                f"nothing read from the store for {self._stall_s * 1000:.0f} ms"))

    def _fail_batch(self, batch: _Batch, message: str) -> None:
        for it in batch.items:
            if not it[4].done():
                it[4].set_exception(self._failed(message))

    @staticmethod
    def _limit_args_of(limits: _core.Limits) -> list:
        args: list = [limits.rpm, limits.tpm, repr(limits.burst), limits.budget,
                      1 if limits.budget_in_usd else 0, limits.period, repr(limits.low_water),
                      limits.ntiers]
        for pin, pout in limits.prices:
            args += [pin, pout]
        return args

    def _keys_packed(self, tenant: str) -> bytes:
        """The tenant's three keys as bulk strings: encoded once per tenant."""
        packed = self._tenant_keys.get(tenant)
        if packed is None:
            if len(self._tenant_keys) > 100_000:
                self._tenant_keys.clear()
            packed = self._tenant_keys[tenant] = b"".join(_bulk(k) for k in self.keys(tenant))
        return packed

    def _limits_packed(self, limits: _core.Limits) -> tuple[bytes, int]:
        """The limits' ARGV, encoded once per Limits object (a policy reload makes new ones)."""
        packed = self._limit_args.get(limits)
        if packed is None:
            if len(self._limit_args) > 10_000:
                self._limit_args.clear()
            args = self._limit_args_of(limits)
            packed = self._limit_args[limits] = (b"".join(_bulk(a) for a in args), len(args))
        return packed

    # --- reservations shared across replicas (backend.shared_reservations) -------
    def _reservation_key(self, tenant: str, request_id: str) -> str:
        return f"{self.prefix}:{{{tenant}}}:reserved:{request_id}"

    def share_reservation(self, tenant: str, request_id: str, record: str) -> None:
        if not self.shares_reservations or self.conn is None or not self.conn.connected:
            return  # cluster mode: not offered (docs/usage.md); no link: the local book has it
        self.conn.submit(pack("SET", self._reservation_key(tenant, request_id), record,
                              "PX", RESERVATION_TTL_MS)).add_done_callback(_ignore_reply)

    def forget_reservation(self, tenant: str, request_id: str) -> None:
        # settled by the replica that decided: only a sibling's take leaves a mark there,
        # which the decider's expiry reads; without it the record would hold Redis memory
        # for its whole 15 minutes
        if not self.shares_reservations or self.conn is None or not self.conn.connected:
            return
        self.conn.submit(pack("DEL", self._reservation_key(tenant, request_id))
                         ).add_done_callback(_ignore_reply)

    async def take_reservation(self, tenant: str, request_id: str) -> Optional[str]:
        if not self.shares_reservations:
            return None
        key = self._reservation_key(tenant, request_id)
        # atomically: the record for us, the mark in its place (same expiry) for the others
        reply = await self._send_plain(pack("SET", key, TAKEN_RESERVATION, "XX", "KEEPTTL",
                                            "GET"))
        if reply is None:
            return None
        if not isinstance(reply, bytes):
            raise self._failed(f"SET {key} GET: unexpected reply {str(reply)[:120]}")
        return reply.decode()

    async def _send_plain(self, packed: bytes) -> Any:
        """One plain command on the pipelined connection, bounded by the timeout."""
        assert self.conn is not None
        try:
            reply = await asyncio.wait_for(self.conn.call(packed), self.deadline_s)
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise self._failed(f"{type(exc).__name__}: {exc}") from None
        if isinstance(reply, hiredis.ReplyError):
            raise self._failed(str(reply))
        return reply

    async def settle(self, tenant: str, limits: _core.Limits, request_id: str, delta_tokens: int,
                     delta_cost: int, period_start_us: int,
                     spend: Optional[SpendRecord] = None) -> Settlement:
        if self.leases is not None:  # Redis knows what the tenant's lease used first (lease.py)
            await self.leases.report(tenant)
        _, tpm_key, budget_key = self.keys(tenant)
        marker = self._settled_marker(tenant, request_id)
        args = [self._now_arg(), limits.tpm, repr(limits.burst), limits.budget, limits.period,
                delta_tokens, delta_cost, period_start_us, SETTLED_TTL_MS]
        keys = [tpm_key, budget_key, marker]
        # the ledger's spend, in the same atomic call (settle.lua's KEYS[4], ARGV[10..16])
        keys.append(self.spend_key(tenant))
        if spend is not None:
            # and the budget's unit: what the usage cost it (the estimate leaves "held")
            args += [spend.model, *spend.counts(), 1 if limits.budget_in_usd else 0]
            await self._index_spend(tenant)
        if self.cfg.cluster:
            reply = await self._call(self.settle_script, keys, args, None)
        else:
            if self.conn is None:
                raise BackendError("redis backend not started")
            reply = await self._settles.submit(keys, args)
        if not (isinstance(reply, list) and len(reply) == 3
                and all(isinstance(x, int) for x in reply)):
            raise self._failed(f"settle.lua: unexpected reply {str(reply)[:120]}")
        if self.leases is not None:
            self.leases.settled(tenant, reply[1])
        return Settlement(applied=reply[0] == 1, budget_spent=reply[1], at_us=reply[2])

    def _settled_marker(self, tenant: str, request_id: str) -> str:
        return f"{self.prefix}:{{{tenant}}}:settled:{request_id}"

    async def was_settled(self, tenant: str, request_id: str) -> bool:
        marker = self._settled_marker(tenant, request_id)
        if self.cfg.cluster:
            if self.client is None:
                raise BackendError("redis backend not started")
            try:  # redis-py sends it to the node owning the tenant's slot
                n = await asyncio.wait_for(self.client.exists(marker), self.timeout_s)
            except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
                raise self._failed(f"EXISTS {marker}: {exc!r}") from None
        else:
            if self.conn is None:
                raise BackendError("redis backend not started")
            # on the settlements' own link, after them: it sees what they did
            n = await self._send_plain(pack("EXISTS", marker))
        return n == 1

    # --- the ledger's spend (sidecar/ledger/spend.py) -------------------------
    def spend_key(self, tenant: str) -> str:
        return f"{self.prefix}:{{{tenant}}}:spend"

    async def record_spend(self, tenant: str, spend: SpendRecord, period_start_us: int = -1,
                           held: int = 0) -> None:
        """Spend of a request that is not settled by settle.lua (its estimate stays
        charged, no longer held); may raise BackendError."""
        keys = [self.spend_key(tenant)]
        args = [self._now_arg(), spend.model, *spend.counts(), period_start_us, held]
        await self._index_spend(tenant)
        packed = None if self.cfg.cluster else pack(
            "EVALSHA", self.record_spend_script.sha, 1, *keys, *args)
        await self._call(self.record_spend_script, keys, args, packed)

    def has_room_for(self, tenant: str) -> bool:
        return True  # tenants' state lives in Redis, with TTLs, not in this process

    def _wall_us(self) -> int:
        """This host's wall clock in µs (the scripts' clock override under a test): the
        day of a spend write as this host sees it (spend_index.py)."""
        return self.clock_override() if self.clock_override is not None \
            else time.time_ns() // 1000

    async def _index_spend(self, tenant: str) -> None:
        """Name the tenant in the day index before its spend is written (spend_index.py),
        once per tenant and day per process. Never fails nor delays the write it precedes:
        on a single node the commands go out ahead of it on the same link, unawaited; on a
        cluster they are awaited first (another node may hold the index key). What does
        not arrive is sent again by the heartbeat (``_resend_spend_index``)."""
        days = self.spend_index.days_to_note(tenant, self._wall_us())
        if not days:
            return
        self.spend_index.sending(tenant, days)
        if self.cfg.cluster:
            await self._send_spend_index(tenant, days)
            return
        conn = self.conn
        if conn is None or not conn.connected:
            self.spend_index.failed(tenant, days)  # the heartbeat sends it once linked
            return
        futures = [conn.submit(pack(*c)) for c in self.spend_index.commands(tenant, days)]
        replies = asyncio.gather(*futures, return_exceptions=True)
        replies.add_done_callback(
            lambda f: self.spend_index.answered(tenant, days, f.result()))

    async def _send_spend_index(self, tenant: str, days: list[int]) -> None:
        cmds = self.spend_index.commands(tenant, days)
        try:
            if self.cfg.cluster:
                replies = [await asyncio.wait_for(self.client.execute_command(*c),
                                                  self.timeout_s) for c in cmds]
            else:
                assert self.conn is not None
                replies = await asyncio.wait_for(asyncio.gather(
                    *(self.conn.call(pack(*c)) for c in cmds)), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - an index write never fails a settlement
            replies = [exc]
        self.spend_index.answered(tenant, days, replies)

    async def _resend_spend_index(self) -> None:
        """Heartbeat: the index writes that did not arrive, sent again."""
        for tenant, days in self.spend_index.take_failed():
            await self._send_spend_index(tenant, days)

    async def spend_cells(self, since_day: int = 0,
                          until_day: int = LAST_DAY) -> list[SpendCell]:
        """The spend cells of days ``since_day..until_day``, from whichever replica asks:
        through the day index where it covers the range, else by SCAN, hashes read in
        pipelined chunks (spend_index.py), through a redis-py client of its own (an admin
        read, off the decision link, with a timeout for a large read rather than the
        decisions' milliseconds; every primary of a cluster)."""
        opts: dict[str, Any] = dict(socket_timeout=5.0, socket_connect_timeout=2.0)
        if self.cfg.tls is not None:
            opts.update(ssl_ca_certs=self.cfg.tls.ca_file, ssl_certfile=self.cfg.tls.cert_file,
                        ssl_keyfile=self.cfg.tls.key_file)
        client: Any = (RedisCluster if self.cfg.cluster else aioredis.Redis).from_url(
            self.cfg.url, **opts)
        today = day_of(self._wall_us())
        try:
            return await read_spend_cells(client, self.prefix, self.spend_index, since_day,
                                          until_day, today)
        except (RedisError, RedisClusterException, OSError) as exc:
            raise BackendError(f"redis {self.where}: reading spend: {exc!r}") from None
        finally:
            await client.aclose()

    # --- calls ---------------------------------------------------------------
    async def _call(self, script: _Script, keys: list[str], args: list[Any],
                    packed: Optional[bytes]) -> Any:
        if self.client is None and self.conn is None:
            raise BackendError("redis backend not started")
        try:
            reply = await asyncio.wait_for(self._send(script, keys, args, packed),
                                           self.deadline_s)
        except asyncio.TimeoutError:
            self._drop_if_hung()
            raise self._failed(f"no reply within {self.deadline_s * 1000:.0f} ms") from None
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise self._failed(f"{type(exc).__name__}: {exc}") from None
        self._last_ok_at = time.monotonic()
        return reply

    async def _send(self, script: _Script, keys: list[str], args: list[Any],
                    packed: Optional[bytes]) -> Any:
        for attempt in (1, 2):
            if self.cfg.cluster:
                # redis-py routes EVALSHA to the node owning the tenant's slot
                self._cluster_round_trips += 1
                try:
                    return await self.client.evalsha(script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    if attempt == 2:
                        raise
            else:
                assert self.conn is not None and packed is not None
                reply = await self.conn.call(packed)
                if not isinstance(reply, hiredis.ReplyError):
                    return reply
                if not str(reply).startswith("NOSCRIPT") or attempt == 2:
                    raise self._failed(f"{script.name}: {reply}")
            # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load, retry once
            await self._load_scripts()
        raise AssertionError("unreachable")

    @property
    def round_trips(self) -> int:
        """Writes to Redis: each carries every command queued in one event-loop tick."""
        return self.conn.writes if self.conn is not None else self._cluster_round_trips

    # --- health --------------------------------------------------------------
    def _failed(self, message: str, timed_out: bool = False) -> BackendError:
        self.errors += 1
        self._last_error = message
        self._last_error_at = time.monotonic()
        text = f"redis {self.where}: {message}"
        return BackendTimeout(text) if timed_out else BackendError(text)

    def status(self) -> BackendStatus:
        # a store that lost its data still decides (every replica shares the loss; failing
        # readiness would take the whole gateway down): reported, with an alert on the metric
        note = f"; {self._store_reset_note}" if self._store_reset_note else ""
        if self._shed_at and time.monotonic() - self._shed_at < SHED_NOTE_S:
            # still ready: the store answers, and taking this replica out would only move
            # its load to the others; the note (and kt_requests_total{decision=
            # "overloaded"}) says it needs more replicas
            note += (f"; overloaded: {self.shed} decision(s) shed since start, the last "
                     f"{time.monotonic() - self._shed_at:.0f} s ago (scale out)")
        if self._last_error_at and self._last_error_at >= self._last_ok_at:
            return BackendStatus(False, f"redis: {self._last_error}{note}")
        return BackendStatus(True, f"redis {self.where}{note}")

    @property
    def connection_attempts(self) -> tuple[int, int]:
        """(attempts that opened a working link, attempts that failed) since start."""
        return (self.conn.opened, self.conn.failed) if self.conn is not None else (0, 0)


def _refusal(tier: int, wait_us: int) -> _core.Outcome:
    """Refused by provider quota (as _core.decide_routed answers it): no tenant fields."""
    kind = _core.DENY_RATE if wait_us >= 0 else _core.TOO_LARGE
    seconds = max(1, -(-wait_us // 1_000_000)) if wait_us > 0 else 0
    return _core.Outcome(kind, _core.R_PROVIDER, tier, seconds, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0,
                         0, max(wait_us, 0), -1, -1, -1)


def _with_provider(o: _core.Outcome, index: int, rem_requests: int, rem_tokens: int,
                   asked: int, spilled: bool) -> _core.Outcome:
    kind, reason = o.kind, o.reason
    if o.tier > asked and kind == _core.ALLOW:
        kind = _core.DOWNGRADE
    if spilled and kind in (_core.ALLOW, _core.DOWNGRADE):
        reason = _core.R_PROVIDER
    return _core.Outcome(kind, reason, o.tier, o.retry_after_s, o.limit_requests,
                         o.remaining_requests, o.reset_requests_us, o.limit_tokens,
                         o.remaining_tokens, o.reset_tokens_us, o.budget_limit,
                         o.budget_remaining, o.budget_reset_us, o.charged_tokens, o.charged_cost,
                         o.period_start_us, o.wait_us, index, rem_requests, rem_tokens)
