"""Shared backend: one truth across replicas in Redis / Valkey, changed only by the
Lua scripts in lua/ (decide.lua mirrors the Cython core; settle.lua reconciles).

- One script call per batch of decisions: the decisions queued in one event-loop tick
  go out as one EVALSHA of decide_batch.lua (up to BATCH_MAX each; a lone decision as
  decide_one.lua) on one pipelined connection (sidecar/backends/resp.py), replies
  matched in order; nothing opens a connection per decision. One timer per batch
  bounds its wait (``timeout_ms``), not one per decision.
- The EVALSHA commands are encoded here, with the per-tenant and per-limits parts
  encoded once and cached: redis-py's generic pack_command costs ~50 µs for a
  20-argument call. redis-py does SCRIPT LOAD and the whole cluster mode
  (docs/redis.md says why the hot path does not go through it).
- Scripts are loaded once (SCRIPT LOAD) and called by SHA; on NOSCRIPT (Redis
  restarted or failed over and lost its script cache) they are loaded again and
  the call retried once.
- Every failure (refused, reset, timeout, NOSCRIPT that will not reload, a reply
  that is not what the script returns) is raised as BackendError within
  ``timeout_ms``: the service then applies the configured failure mode.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
import hiredis
from redis.exceptions import NoScriptError, RedisError

from sidecar.backends.resp import ConnectionLost, PipelinedConnection
from sidecar.backends.tls import tls_context

from sidecar import _core
from sidecar.backends.base import (BackendError, BackendStatus, BackendTimeout, LateReply,
                                   Settlement)
from sidecar.policy import schema

log = logging.getLogger("kt.redis")
# how long a settled request id is remembered (a repeated report within it is a no-op)
SETTLED_TTL_MS = 7 * 24 * 3600 * 1000
# a shared reservation lives as long as a local one (sidecar/service.py RESERVATION_TTL_S)
RESERVATION_TTL_MS = 600 * 1000


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


def _is_outcome(reply: Any) -> bool:
    return isinstance(reply, list) and len(reply) == 16 and all(isinstance(x, int) for x in reply)


class _Batch:
    """Decisions sent in one script call: (tenant, encoded ARGV, ARGV count, future,
    LateReply)."""
    __slots__ = ("items", "timer", "attempt")

    def __init__(self, items: list, timer: Optional[asyncio.TimerHandle]) -> None:
        self.items = items
        self.timer = timer
        self.attempt = 1


class RedisBackend:
    name = "redis"

    def __init__(self, cfg: schema.RedisBackend,
                 clock_override: Optional[Callable[[], int]] = None) -> None:
        """``clock_override`` (tests only) passes a time to the scripts instead of Redis's TIME."""
        self.cfg = cfg
        self.where = redact(cfg.url)  # for messages: never the password
        self.timeout_s = cfg.timeout_ms / 1000.0
        # silence (replies owed, none coming) after which the link is dropped: longer than
        # one timeout, so a server that is only slow keeps its link and its late replies
        # still arrive (and are put right); a dead one is dropped within half a second
        self._stall_s = max(10 * self.timeout_s, 0.5)
        self.clock_override = clock_override
        self.prefix = cfg.key_prefix
        self.shares_reservations = cfg.shared_reservations and not cfg.cluster
        self.decide_script = _Script("decide.lua", "decide.lua", "decide_one.lua")
        self.batch_script = _Script("decide_batch.lua", "decide.lua", "decide_batch.lua")
        self.settle_script = _Script("settle.lua")
        self.client: Any = None
        self.conn: Optional[PipelinedConnection] = None
        # cached encodings: per tenant (its three keys), per Limits (their ARGV)
        self._tenant_keys: dict[str, bytes] = {}
        self._queued: list[tuple[str, bytes, int, asyncio.Future, LateReply]] = []
        self.late_replies = 0  # replies that came after their decision had timed out
        self._limit_args: dict[_core.Limits, tuple[bytes, int]] = {}
        self._last_error = ""
        self._last_error_at = 0.0
        self._last_ok_at = 0.0
        self._cluster_round_trips = 0
        self.decisions = 0
        self.errors = 0

    # --- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        opts: dict[str, Any] = dict(socket_timeout=max(self.timeout_s, 0.001),
                                    socket_connect_timeout=max(self.timeout_s, 0.05))
        tls = self.cfg.tls
        if tls is not None:  # only with rediss:// (the policy checks)
            opts.update(ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file,
                        ssl_keyfile=tls.key_file)
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
            self.conn = PipelinedConnection(kw.get("host", "127.0.0.1"), int(kw.get("port", 6379)),
                                            max(self.timeout_s, 0.05), tuple(setup),
                                            unix_path=kw.get("path"),
                                            ssl_context=tls_context(self.cfg))
        try:
            await asyncio.wait_for(self._load_scripts(), max(self.timeout_s * 20, 1.0))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            # Start anyway: decisions follow the failure mode until Redis answers.
            self._failed(f"cannot load scripts: {exc!r}")
            log.error("redis at %s not available at start: %r", self.where, exc)

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.client is not None:
            try:
                await self.client.aclose()
            except (RedisError, OSError):
                pass
            self.client = None

    async def _load_scripts(self) -> None:
        for script in (self.decide_script, self.batch_script, self.settle_script):
            if self.cfg.cluster:
                await self.client.script_load(script.source)  # sent to every primary
            else:
                sha = await self.client.script_load(script.source)
                if sha != script.sha:
                    raise BackendError(f"SCRIPT LOAD returned {sha}, expected {script.sha}")

    # --- decisions ---------------------------------------------------------
    def keys(self, tenant: str) -> tuple[str, str, str]:
        tag = f"{self.prefix}:{{{tenant}}}"  # one hash tag: one cluster slot per tenant
        return f"{tag}:rpm", f"{tag}:tpm", f"{tag}:budget"

    def _now_arg(self) -> int:
        return self.clock_override() if self.clock_override is not None else 0

    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                     late: Optional[LateReply] = None) -> _core.Outcome:
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        if self.cfg.cluster:
            # redis-py routes each EVALSHA to the tenant's node (no batching across slots)
            reply = await self._call(self.decide_script, list(self.keys(tenant)),
                                     request + self._limit_args_of(limits), None)
        else:
            limits_packed, n_limit_args = self._limits_packed(limits)
            reply = await self._queue_decision(
                tenant, b"".join([_bulk(a) for a in request]) + limits_packed,
                len(request) + n_limit_args, late or LateReply())
        if isinstance(reply, hiredis.ReplyError):  # this decision failed in its batch
            raise self._failed(f"decide.lua: {reply}")
        if not _is_outcome(reply):
            raise self._failed(f"decide.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _core.Outcome(*reply)

    # --- batching (single node) ------------------------------------------------
    def _queue_decision(self, tenant: str, args: bytes, nargs: int,
                        late: LateReply) -> asyncio.Future:
        if self.client is None:
            raise BackendError("redis backend not started")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queued.append((tenant, args, nargs, fut, late))
        if len(self._queued) == 1:
            loop.call_soon(self._flush_decisions)
        return fut

    def _flush_decisions(self) -> None:
        queued, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        for i in range(0, len(queued), BATCH_MAX):
            batch = _Batch(queued[i:i + BATCH_MAX], None)
            batch.timer = loop.call_later(self.timeout_s, self._batch_timed_out, batch)
            self._send_batch(batch)

    def _send_batch(self, batch: _Batch) -> None:
        assert self.conn is not None
        if not self.conn.connected:
            asyncio.get_running_loop().create_task(self._connect_then_send(batch))
            return
        items = batch.items
        if len(items) == 1:
            tenant, args, nargs, _, _ = items[0]
            packed = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n3\r\n" % (
                6 + nargs, self.decide_script.sha.encode()) + self._keys_packed(tenant) + args
        else:
            n = len(items)
            parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (
                4 + 3 * n + n + sum(it[2] for it in items), self.batch_script.sha.encode()),
                _bulk(3 * n)]
            parts += [self._keys_packed(it[0]) for it in items]
            parts.append(_bulk(n))
            for _, args, nargs, _, _ in items:
                parts.append(_bulk(nargs))
                parts.append(args)
            packed = b"".join(parts)
        self.conn.submit(packed).add_done_callback(
            lambda fut: self._batch_replied(batch, fut))

    async def _connect_then_send(self, batch: _Batch) -> None:
        assert self.conn is not None
        try:
            await self.conn.connect()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail_batch(batch, f"{type(exc).__name__}: {exc}")
            return
        if any(not it[3].done() for it in batch.items):
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
            if str(reply).startswith("NOSCRIPT") and batch.attempt == 1:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH): load, resend
                batch.attempt = 2
                asyncio.get_running_loop().create_task(self._reload_then_send(batch))
                return
            name = self.decide_script.name if len(batch.items) == 1 else self.batch_script.name
            self._fail_batch(batch, f"{name}: {reply}")
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self._last_ok_at = time.monotonic()
        items = batch.items
        if len(items) == 1:
            replies = [reply]
        elif isinstance(reply, list) and len(reply) == len(items):
            replies = reply
        else:
            self._fail_batch(batch, f"decide_batch.lua: unexpected reply {str(reply)[:120]}")
            return
        for it, one in zip(items, replies, strict=True):
            if not it[3].done():
                it[3].set_result(one)
            elif it[4].on_outcome is not None and _is_outcome(one):
                # its caller timed out and was answered by the failure mode, yet Redis
                # applied the decision: the service puts the charge right
                self.late_replies += 1
                it[4].on_outcome(_core.Outcome(*one))

    async def _reload_then_send(self, batch: _Batch) -> None:
        try:
            await self._load_scripts()
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            self._fail_batch(batch, f"NOSCRIPT, and reloading failed: {exc!r}")
            return
        self._send_batch(batch)

    def _batch_timed_out(self, batch: _Batch) -> None:
        # the callers are answered now (by the failure mode); the batch stays owed and, if
        # its reply still comes, _batch_replied hands the outcomes to their LateReply
        message = f"no reply within {self.cfg.timeout_ms} ms"
        for it in batch.items:
            if not it[3].done():
                it[3].set_exception(self._failed(message, timed_out=True))
        if self.conn is not None and self.conn.stalled(self._stall_s):
            # nothing at all has come back for a long while: drop the link (failing the
            # calls queued on it) so the backlog stays bounded and the next call reconnects
            self.conn.lose(ConnectionLost("no reply within the timeout"))

    def _fail_batch(self, batch: _Batch, message: str) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        for it in batch.items:
            if not it[3].done():
                it[3].set_exception(self._failed(message))

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

    async def take_reservation(self, tenant: str, request_id: str) -> Optional[str]:
        if not self.shares_reservations:
            return None
        key = self._reservation_key(tenant, request_id)
        reply = await self._send_plain(pack("GETDEL", key))
        if reply is None:
            return None
        if not isinstance(reply, bytes):
            raise self._failed(f"GETDEL {key}: unexpected reply {str(reply)[:120]}")
        return reply.decode()

    async def _send_plain(self, packed: bytes) -> Any:
        """One plain command on the pipelined connection, bounded by the timeout."""
        assert self.conn is not None
        try:
            reply = await asyncio.wait_for(self.conn.call(packed), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise self._failed(f"{type(exc).__name__}: {exc}") from None
        if isinstance(reply, hiredis.ReplyError):
            raise self._failed(str(reply))
        return reply

    async def settle(self, tenant: str, limits: _core.Limits, request_id: str, delta_tokens: int,
                     delta_cost: int, period_start_us: int) -> Settlement:
        _, tpm_key, budget_key = self.keys(tenant)
        marker = f"{self.prefix}:{{{tenant}}}:settled:{request_id}"
        args = [self._now_arg(), limits.tpm, repr(limits.burst), limits.budget, limits.period,
                delta_tokens, delta_cost, period_start_us, SETTLED_TTL_MS]
        keys = [tpm_key, budget_key, marker]
        packed = None if self.cfg.cluster else pack(
            "EVALSHA", self.settle_script.sha, 3, *keys, *args)
        reply = await self._call(self.settle_script, keys, args, packed)
        if not (isinstance(reply, list) and len(reply) == 2
                and all(isinstance(x, int) for x in reply)):
            raise self._failed(f"settle.lua: unexpected reply {str(reply)[:120]}")
        return Settlement(applied=reply[0] == 1, budget_spent=reply[1])

    # --- calls ---------------------------------------------------------------
    async def _call(self, script: _Script, keys: list[str], args: list[Any],
                    packed: Optional[bytes]) -> Any:
        if self.client is None:
            raise BackendError("redis backend not started")
        try:
            reply = await asyncio.wait_for(self._send(script, keys, args, packed), self.timeout_s)
        except asyncio.TimeoutError:
            if self.conn is not None and self.conn.stalled(self._stall_s):
                self.conn.lose(ConnectionLost("no reply within the timeout"))
            raise self._failed(f"no reply within {self.cfg.timeout_ms} ms") from None
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
        if self._last_error_at and self._last_error_at >= self._last_ok_at:
            return BackendStatus(False, f"redis: {self._last_error}")
        return BackendStatus(True, f"redis {self.where}")
