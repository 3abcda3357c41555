"""The durable spend on Redis, read for /v1/spend: only the tenants a date range holds.

Each tenant's spend lives in its own hash (``kt:{tenant}:spend``, lua/ledger_spend.lua),
written by the script call that settles its budget. A report over a range used to SCAN
every spend hash ever written and read them one round trip each: a client that invents
tenant ids under ``unknown: defaults`` made ``kt spend`` cost every tenant ever seen
(69,000 tenants: 10.9 s, past its timeout). So:

- **A day index.** ``kt:spend-index:<day>`` is a set of the tenants with spend on that UTC
  day. The sidecar adds a tenant to it *before* the call that writes the tenant's spend
  (same link, in order, on a single node; awaited first on a cluster), once per tenant and
  day per process. The index can name a tenant whose write then failed (harmless: its
  hash has nothing that day); it never misses one whose spend was written. The day is the
  one this host's clock reads, and within ``MIDNIGHT_MARGIN_US`` of midnight both days
  are noted: the script takes the day from Redis's clock, which may differ by the skew.
  An index key is a plain key, not in a tenant's slot: on a cluster it is its own command.
- **Where the index starts.** ``kt:spend-index-since`` holds the day the first indexed
  write was made (SET NX). A range that starts after it is read through the index; one
  that starts on or before it (spend written before the index existed), or the whole
  history, is read by SCAN. During a rolling upgrade, sidecars of an older version write
  spend without indexing it: reports over a range then read what the upgraded sidecars
  indexed; ``?since`` omitted reads everything (docs/ledger.md).
- **Pipelined reads.** Hashes are read ``READ_CHUNK`` at a time in one round trip (a
  redis-py pipeline; on a cluster it groups the commands by node).

The cost of a report is then the tenants the range holds, not every tenant ever seen.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from sidecar.ledger.spend import DAY_US, SpendCell, cells_from_fields, day_of, in_range

# a tenant's days around midnight: both are noted (clock skew between host and Redis)
MIDNIGHT_MARGIN_US = 300 * 1_000_000
# an index key outlives the spend it points at (ledger_spend.lua's 400 days)
INDEX_TTL_S = 401 * 86_400
# (tenant, day) pairs this process has indexed, oldest forgotten first
NOTED_MAX = 100_000
READ_CHUNK = 500
# a range is read through the index for at most this many days (beyond, spend is gone)
INDEX_DAYS_MAX = 402


class SpendIndex:
    """Which (tenant, day) pairs this process has put in the day index (or is putting:
    sent, not yet answered), the commands that put the others there, and those whose
    commands failed, to be sent again. Pure bookkeeping: the backend sends the commands."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.since_key = f"{prefix}:spend-index-since"
        self._noted: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._failed: dict[str, set[int]] = {}
        self._started = False

    def day_key(self, day: int) -> str:
        return f"{self.prefix}:spend-index:{day}"

    def days_to_note(self, tenant: str, now_us: int) -> list[int]:
        """The days whose index must name ``tenant`` before a spend write at ``now_us``
        (this host's clock) and do not yet, as far as this process knows."""
        day = day_of(now_us)
        days = [day]
        if now_us - day * DAY_US < MIDNIGHT_MARGIN_US:
            days.insert(0, day - 1)
        if (day + 1) * DAY_US - now_us < MIDNIGHT_MARGIN_US:
            days.append(day + 1)
        return [d for d in days if (tenant, d) not in self._noted]

    def commands(self, tenant: str, days: list[int]) -> list[tuple[Any, ...]]:
        """The commands that put ``tenant`` in the index of ``days`` (the first time, also
        the day the index starts from)."""
        cmds: list[tuple[Any, ...]] = []
        if not self._started:
            cmds.append(("SET", self.since_key, min(days), "NX"))
        for d in days:
            cmds.append(("SADD", self.day_key(d), tenant))
            cmds.append(("EXPIRE", self.day_key(d), INDEX_TTL_S, "NX"))
        return cmds

    def sending(self, tenant: str, days: list[int]) -> None:
        """The commands for these days are sent: not to be sent again meanwhile."""
        for d in days:
            self._noted[(tenant, d)] = None
        while len(self._noted) > NOTED_MAX:
            self._noted.popitem(last=False)

    def answered(self, tenant: str, days: list[int], replies: list) -> None:
        """Their replies: every one a success, or the days go to the resend set."""
        if all(not isinstance(r, Exception) for r in replies):
            self._started = True
        else:
            self.failed(tenant, days)

    def failed(self, tenant: str, days: list[int]) -> None:
        if len(self._failed) < NOTED_MAX or tenant in self._failed:
            self._failed.setdefault(tenant, set()).update(days)
        # past the bound a day may go unindexed: a ranged report then misses its tenant
        # until the tenant's next spend that day (a report with no range reads everything)

    def has_failed(self) -> bool:
        return bool(self._failed)

    def take_failed(self) -> list[tuple[str, list[int]]]:
        failed, self._failed = self._failed, {}
        return [(t, sorted(days)) for t, days in failed.items()]


async def read_spend_cells(client: Any, prefix: str, index: SpendIndex, since_day: int,
                           until_day: int, today: int,
                           tenant: Optional[str] = None) -> list[SpendCell]:
    """The spend cells of days ``since_day..until_day`` through a redis-py client (single
    node or cluster): through the day index where it covers the range, else by SCAN;
    ``tenant``: its one hash only. May raise RedisError / OSError (the caller translates)."""
    if tenant is not None:
        fields = await client.hgetall(f"{prefix}:{{{tenant}}}:spend")
        return [c for c in cells_from_fields(tenant, fields)
                if in_range(c, since_day, until_day)]
    started = await client.get(index.since_key)
    index_from = int(started) + 1 if started is not None else None
    if index_from is not None and since_day >= index_from:
        last = min(until_day, today + 1)
        days = range(max(since_day, last - INDEX_DAYS_MAX), last + 1)
        tenants: set[str] = set()
        for chunk in _chunks([index.day_key(d) for d in days], READ_CHUNK):
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.smembers(key)
            for members in await pipe.execute():
                tenants.update(m.decode() if isinstance(m, bytes) else m for m in members)
        keys = [f"{prefix}:{{{t}}}:spend" for t in sorted(tenants)]
    else:
        keys = []
        async for raw in client.scan_iter(match=f"{prefix}:{{*}}:spend", count=1000):
            keys.append(raw.decode() if isinstance(raw, bytes) else raw)
    cells: list[SpendCell] = []
    for chunk in _chunks(keys, READ_CHUNK):
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.hgetall(key)
        for key, fields in zip(chunk, await pipe.execute(), strict=True):
            tenant = key[len(prefix) + 2:-len("}:spend")]
            cells += [c for c in cells_from_fields(tenant, fields)
                      if in_range(c, since_day, until_day)]
    return cells


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
