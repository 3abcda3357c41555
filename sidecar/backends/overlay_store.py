"""Where the management API's overlay of holders is kept (sidecar/policy/overlay.py):
beside the embedded backend's state file, or in Redis for the Redis backend, where every
sidecar of the fleet reads it.

Both stores take a change as a set of fields, ``h:<holder>`` (its overlay entry) and
``f:<holder>`` (its freeze mark), each a JSON value or None (removed), applied at once,
and answer the fields' values before the change (the audit event's "before") and the
overlay's new version. Every failure is a BackendError.

- ``FileOverlayStore``: one JSON file (``<state file>.overlay.json``), written whole as
  the state file is (temp file, fsync, rename, fsync of the directory), in a thread; one
  process writes it (the embedded backend is one process). No state file: kept in
  memory only, for the process's life.
- ``RedisOverlayStore``: one hash, ``<prefix>:admin-overlay`` (one key: one slot on a
  cluster), its field ``v`` the version; a change is one script call (atomic: fields and
  version together), a poll one ``HGET v`` (every 250 ms, off the hot path: redis-py on
  a connection of its own, never the decisions' pipelined link, whose deadlines are
  sized for decisions).
"""
from __future__ import annotations

import asyncio
import os
from typing import Optional, Protocol, Union

import msgspec
from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from sidecar.backends.base import BackendError
from sidecar.backends.state_files import write_durably
from sidecar.policy import overlay as ov
from sidecar.policy import schema

Fields = dict[str, Optional[bytes]]  # "h:<name>" / "f:<name>" -> JSON, or None: removed


class OverlayStore(Protocol):
    where: str  # for messages: the file, or the Redis key
    # a start that cannot read it fails (a file beside the state file, as the state file);
    # else the sidecar starts on the policy file alone and serves the overlay once read
    # (Redis: the backend itself starts when Redis is down, on its failure modes)
    required_at_start: bool

    async def load(self) -> ov.Overlay:
        """The whole overlay as stored now."""

    async def version(self) -> int:
        """The stored version, cheaply (a poll)."""

    async def change(self, fields: Fields) -> tuple[int, Fields]:
        """Apply every field at once: (the new version, each field's value before)."""

    async def close(self) -> None: ...


def _overlay_of(version: int, fields: dict[str, bytes]) -> ov.Overlay:
    holders: dict[str, ov.Entry] = {}
    frozen: dict[str, ov.Frozen] = {}
    try:
        for key, value in fields.items():
            if key.startswith("h:"):
                holders[key[2:]] = ov.decode_entry(value)
            elif key.startswith("f:"):
                frozen[key[2:]] = ov.decode_frozen(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BackendError(f"overlay field {key!r} is not an overlay value: {exc}") from None
    return ov.Overlay(version=version, holders=holders, frozen=frozen)


def _fields_of(overlay: ov.Overlay) -> dict[str, bytes]:
    out = {f"h:{k}": ov.encode_entry(v) for k, v in overlay.holders.items()}
    out.update({f"f:{k}": ov.encode_frozen(v) for k, v in overlay.frozen.items()})
    return out


class FileOverlayStore:
    def __init__(self, path: str) -> None:
        self.path = path  # "": in memory only
        self.where = path or "memory (no state file)"
        self.required_at_start = True
        self._version = 0
        self._fields: dict[str, bytes] = {}
        self._loaded = False

    @staticmethod
    def beside(state_file: str) -> "FileOverlayStore":
        """The store next to the embedded backend's state file ("" : in memory)."""
        if not state_file:
            return FileOverlayStore("")
        root, ext = os.path.splitext(state_file)
        return FileOverlayStore(f"{root}.overlay{ext or '.json'}")

    def _read(self) -> None:
        if self._loaded or not self.path:
            self._loaded = True
            return
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise BackendError(f"overlay file {self.path}: {exc.strerror or exc}") from None
        if raw:
            try:
                stored = ov.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise BackendError(f"overlay file {self.path}: not an overlay: {exc}") from None
            self._version = stored.version
            self._fields = _fields_of(stored)
        self._loaded = True

    def _write(self, raw: bytes) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

        def write(fd: int) -> None:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]

        write_durably(self.path, ".overlay-", write)

    async def load(self) -> ov.Overlay:
        await asyncio.to_thread(self._read)
        return _overlay_of(self._version, self._fields)

    async def version(self) -> int:
        return self._version

    async def change(self, fields: Fields) -> tuple[int, Fields]:
        await asyncio.to_thread(self._read)
        before: Fields = {k: self._fields.get(k) for k in fields}
        after = dict(self._fields)
        for k, v in fields.items():
            if v is None:
                after.pop(k, None)
            else:
                after[k] = v
        version = self._version + 1
        if self.path:
            raw = ov.encode(_overlay_of(version, after))
            try:
                await asyncio.to_thread(self._write, raw)
            except OSError as exc:
                raise BackendError(f"overlay file {self.path}: {exc.strerror or exc}") from None
        self._fields, self._version = after, version
        return version, before

    async def close(self) -> None:
        return None


# KEYS[1] the overlay hash; ARGV: field, value, field, value... ("" value: removed).
# Reply: the new version, then each field's value before ("" when absent).
_CHANGE = """
local before = {}
for i = 1, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  before[#before + 1] = old or ''
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
table.insert(before, 1, v)
return before
"""


class RedisOverlayStore:
    def __init__(self, cfg: schema.RedisBackend, timeout_s: float = 2.0) -> None:
        self.cfg = cfg
        self.key = f"{cfg.key_prefix}:admin-overlay"
        self.where = f"redis key {self.key}"
        self.required_at_start = False
        self.timeout_s = timeout_s
        opts: dict = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        if cfg.tls is not None:
            opts.update(ssl_ca_certs=cfg.tls.ca_file, ssl_certfile=cfg.tls.cert_file,
                        ssl_keyfile=cfg.tls.key_file)
        self._client: Union[aioredis.Redis, RedisCluster] = (
            RedisCluster.from_url(cfg.url, **opts) if cfg.cluster
            else aioredis.Redis.from_url(cfg.url, **opts))

    async def _call(self, *command):
        try:
            return await asyncio.wait_for(self._client.execute_command(*command),
                                          self.timeout_s)
        except (RedisError, RedisClusterException, OSError, asyncio.TimeoutError) as exc:
            raise BackendError(f"overlay {self.where}: {type(exc).__name__}: {exc}") from None

    async def load(self) -> ov.Overlay:
        reply = await self._call("HGETALL", self.key)
        if isinstance(reply, list):  # RESP2 without decoding: flat pairs
            reply = dict(zip(reply[::2], reply[1::2], strict=True))
        fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in reply.items()}
        try:
            version = int(fields.pop("v", 0))
        except ValueError:
            raise BackendError(f"overlay {self.where}: its version is not a number") from None
        return _overlay_of(version, fields)

    async def version(self) -> int:
        reply = await self._call("HGET", self.key, "v")
        try:
            return int(reply) if reply is not None else 0
        except ValueError:
            raise BackendError(f"overlay {self.where}: its version is not a number") from None

    async def change(self, fields: Fields) -> tuple[int, Fields]:
        args: list = []
        for k, v in fields.items():
            args += [k, v if v is not None else b""]
        reply = await self._call("EVAL", _CHANGE, 1, self.key, *args)
        version = int(reply[0])
        before: Fields = {k: (old or None) for k, old in zip(fields, reply[1:], strict=True)}
        return version, before

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except (RedisError, RedisClusterException, OSError):
            pass
