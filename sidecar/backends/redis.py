"""Shared backend: one truth across replicas in Redis / Valkey, changed only by the
Lua scripts in lua/ (decide.lua mirrors the Cython core; settle.lua reconciles).

- One round trip per batch of decisions: decisions queued in the same event-loop
  tick go out in one write on one pipelined connection (sidecar/backends/resp.py),
  replies matched in order; nothing opens a connection per decision.
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
import ssl
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

from sidecar import _core
from sidecar.backends.base import BackendError, BackendStatus, Settlement
from sidecar.policy import schema

log = logging.getLogger("kt.redis")
# how long a settled request id is remembered (a repeated report within it is a no-op)
SETTLED_TTL_MS = 7 * 24 * 3600 * 1000


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


class _Script:
    def __init__(self, name: str) -> None:
        self.name = name
        # the shared calendar first (Redis scripts cannot import one another)
        self.source = load_script("common.lua") + "\n" + load_script(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


class RedisBackend:
    name = "redis"

    def __init__(self, cfg: schema.RedisBackend,
                 clock_override: Optional[Callable[[], int]] = None) -> None:
        """``clock_override`` (tests only) passes a time to the scripts instead of Redis's TIME."""
        self.cfg = cfg
        self.where = redact(cfg.url)  # for messages: never the password
        self.timeout_s = cfg.timeout_ms / 1000.0
        self.clock_override = clock_override
        self.prefix = cfg.key_prefix
        self.decide_script = _Script("decide.lua")
        self.settle_script = _Script("settle.lua")
        self.client: Any = None
        self.conn: Optional[PipelinedConnection] = None
        # cached encodings: per tenant (command head + keys), per Limits (their ARGV)
        self._heads: dict[tuple[str, int], bytes] = {}
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
            tls = ssl.create_default_context() if self.cfg.url.startswith("rediss://") else None
            self.conn = PipelinedConnection(kw.get("host", "127.0.0.1"), int(kw.get("port", 6379)),
                                            max(self.timeout_s, 0.05), tuple(setup),
                                            unix_path=kw.get("path"), ssl_context=tls)
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
        for script in (self.decide_script, self.settle_script):
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
                     output_tokens: int, firm_tokens: int, commit_on_deny: bool) -> _core.Outcome:
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        keys = list(self.keys(tenant))
        packed = None
        limits_packed, n_limit_args = self._limits_packed(limits)
        if not self.cfg.cluster:
            packed = self._head(tenant, 3 + 3 + len(request) + n_limit_args) \
                + b"".join([_bulk(a) for a in request]) + limits_packed
        # the plain arguments are only needed by cluster mode (redis-py encodes them there)
        args = request + self._limit_args_of(limits) if self.cfg.cluster else []
        reply = await self._call(self.decide_script, keys, args, packed)
        if not (isinstance(reply, list) and len(reply) == 16
                and all(isinstance(x, int) for x in reply)):
            raise self._failed(f"decide.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _core.Outcome(*reply)

    @staticmethod
    def _limit_args_of(limits: _core.Limits) -> list:
        args: list = [limits.rpm, limits.tpm, repr(limits.burst), limits.budget,
                      1 if limits.budget_in_usd else 0, limits.period, repr(limits.low_water),
                      limits.ntiers]
        for pin, pout in limits.prices:
            args += [pin, pout]
        return args

    def _head(self, tenant: str, nargs: int) -> bytes:
        """*N EVALSHA <sha> 3 <keys>: encoded once per tenant."""
        head = self._heads.get((tenant, nargs))
        if head is None:
            if len(self._heads) > 100_000:
                self._heads.clear()
            head = self._heads[(tenant, nargs)] = b"*%d\r\n" % nargs + b"".join(
                _bulk(a) for a in ("EVALSHA", self.decide_script.sha, 3, *self.keys(tenant)))
        return head

    def _limits_packed(self, limits: _core.Limits) -> tuple[bytes, int]:
        """The limits' ARGV, encoded once per Limits object (a policy reload makes new ones)."""
        packed = self._limit_args.get(limits)
        if packed is None:
            if len(self._limit_args) > 10_000:
                self._limit_args.clear()
            args = self._limit_args_of(limits)
            packed = self._limit_args[limits] = (b"".join(_bulk(a) for a in args), len(args))
        return packed

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
            if self.conn is not None and self.conn.stalled(self.timeout_s):
                # nothing has come back for a whole timeout: drop the link (failing the
                # calls queued on it) so the backlog stays bounded and the next call reconnects
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
    def _failed(self, message: str) -> BackendError:
        self.errors += 1
        self._last_error = message
        self._last_error_at = time.monotonic()
        return BackendError(f"redis {self.where}: {message}")

    def status(self) -> BackendStatus:
        if self._last_error_at and self._last_error_at >= self._last_ok_at:
            return BackendStatus(False, f"redis: {self._last_error}")
        return BackendStatus(True, f"redis {self.where}")
