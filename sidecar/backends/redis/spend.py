"""The ledger's spend in Redis: the day index written ahead of each tenant's first spend
of a day (sidecar/backends/spend_index.py), and the ranged read behind /v1/spend.

The spend itself rides on settle.lua and record_spend.lua (lua/ledger_spend.lua); this
module only keeps the index that lets a ranged read visit the tenants of those days
instead of every key, and reads it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from sidecar.backends.base import BackendError
from sidecar.backends.redis.link import RedisLink
from sidecar.backends.spend_index import SpendIndex, read_spend_cells
from sidecar.ledger.spend import LAST_DAY, SpendCell, day_of


class SpendDays:
    def __init__(self, link: RedisLink, prefix: str, wall_us: Callable[[], int]) -> None:
        """``wall_us``: this host's wall clock in µs (the day of a spend write)."""
        self.link = link
        self.prefix = prefix
        self.wall_us = wall_us
        # which tenants spent on which day, for /v1/spend over a range (spend_index.py)
        self.index = SpendIndex(prefix)

    async def note(self, tenant: str) -> None:
        """Name the tenant in the day index before its spend is written, once per tenant
        and day per process. Never fails nor delays the write it precedes: on a single
        node the commands go out ahead of it on the same link, unawaited; on a cluster they
        are awaited first (another node may hold the index key). What does not arrive is
        sent again by the heartbeat (``resend``)."""
        days = self.index.days_to_note(tenant, self.wall_us())
        if not days:
            return
        self.index.sending(tenant, days)
        link = self.link
        if link.cluster:
            await self._send(tenant, days)
            return
        if not link.connected:
            self.index.failed(tenant, days)  # the heartbeat sends it once linked
            return
        replies = link.submit_all(self.index.commands(tenant, days))
        replies.add_done_callback(lambda f: self.index.answered(tenant, days, f.result()))

    async def _send(self, tenant: str, days: list[int]) -> None:
        try:
            replies = await self.link.commands(self.index.commands(tenant, days))
        except Exception as exc:  # noqa: BLE001 - an index write never fails a settlement
            replies = [exc]
        self.index.answered(tenant, days, replies)

    async def resend(self) -> None:
        """Heartbeat: the index writes that did not arrive, sent again."""
        if not self.index.has_failed():
            return
        for tenant, days in self.index.take_failed():
            await self._send(tenant, days)

    async def cells(self, since_day: int = 0, until_day: int = LAST_DAY,
                    tenant: Optional[str] = None) -> list[SpendCell]:
        """The spend cells of days ``since_day..until_day``, from whichever replica asks:
        through the day index where it covers the range, else by SCAN, hashes read in
        pipelined chunks (spend_index.py), through a redis-py client of its own (an admin
        read, off the decision link, with a timeout for a large read rather than the
        decisions' milliseconds; every primary of a cluster)."""
        cfg = self.link.cfg
        opts: dict[str, Any] = dict(socket_timeout=5.0, socket_connect_timeout=2.0)
        if cfg.tls is not None:
            opts.update(ssl_ca_certs=cfg.tls.ca_file, ssl_certfile=cfg.tls.cert_file,
                        ssl_keyfile=cfg.tls.key_file)
        client: Any = (RedisCluster if cfg.cluster else aioredis.Redis).from_url(cfg.url, **opts)
        today = day_of(self.wall_us())
        try:
            return await read_spend_cells(client, self.prefix, self.index, since_day,
                                          until_day, today, tenant)
        except (RedisError, RedisClusterException, OSError) as exc:
            raise BackendError(f"redis {self.link.where}: reading spend: {exc!r}") from None
        finally:
            await client.aclose()
