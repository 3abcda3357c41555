"""The store marker: a key every sidecar reads on each heartbeat, whose loss shows the
store lost its data (a restart without persistence, FLUSHALL, a failover to an empty
replica): reported, not silently trusted (docs/redis.md, Persistence)."""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Awaitable, Callable, Optional

from sidecar.backends.redis.scripts import pack

log = logging.getLogger("kt.redis")

Calls = Callable[..., Awaitable[Optional[list]]]


class StoreMarker:
    def __init__(self, key: str, where: str) -> None:
        self.key = key
        self.where = where
        self.seen: Optional[bytes] = None  # the store marker as last seen
        self.resets = 0  # times the store was found to have lost its data
        self.note = ""  # for /readyz, once the store lost its data

    async def check(self, marker: Any, calls: Calls) -> None:
        """``marker``: the key's value as the heartbeat read it; ``calls``: commands on the
        link, written together (their replies, or None)."""
        if marker is not None and marker == self.seen:
            return
        await self._changed(marker, calls)

    async def _changed(self, marker: Optional[bytes], calls: Calls) -> None:
        """The store marker is missing, or not the one this sidecar saw: the store lost its
        data — unless this sidecar never saw one (its first look at a new store)."""
        if marker is None:
            made = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {uuid.uuid4().hex}"
            # one marker for every replica: the first SET NX wins, all read the winner
            replies = await calls(pack("SET", self.key, made, "NX"), pack("GET", self.key))
            if replies is None or not isinstance(replies[1], bytes):
                return  # the next beat looks again
            marker = replies[1]
        if self.seen is not None:
            self.resets += 1
            self.note = (
                f"the store lost its data at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
                f" ({self.resets} time(s) since start): its marker {self.key} was "
                "gone or replaced, so budgets and buckets started again from zero "
                "(docs/redis.md, persistence)")
            log.error("redis %s: %s", self.where, self.note)
        elif isinstance(marker, bytes):
            log.info("redis %s: store marker %s = %s", self.where, self.key,
                     marker.decode(errors="replace"))
        self.seen = marker if isinstance(marker, bytes) else None
