"""The spend of end users and tags (sidecar/attribution.py): each settled or kept request's
spend added again, under its user and each of its tags, to cells of its tenant's durable
spend (``~user|<id>``, ``~tag|<tag>``) that `kt spend --by user|tag` reads.

Summed in this process and written once a second, one `record_spend` per cell: a
request with a user and three tags would otherwise cost four more store calls than its
settlement (each a script call on Redis). What that costs, and may lose, is said in
docs/budgets.md ("Attribution"): the cells of the last second of a process that dies
without a clean stop, and a store error's (logged); the budget, the tenant's and the
model's spend are never touched here, and the events keep every value. The day is the
store's when the cells are written: within a second of midnight, some land on the next."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional

from sidecar import attribution
from sidecar.attribution import Attribution, SpendCap
from sidecar.backends.base import Backend, BackendError
from sidecar.burstlog import BurstLog
from sidecar.ledger.spend import SpendRecord
from sidecar.metrics import Metrics

log = logging.getLogger("kt.attribution")
FLUSH_INTERVAL_S = 1.0


class AttributedSpend:
    def __init__(self, backend: Backend, metrics: Metrics,
                 track: Callable[[asyncio.Task], None],
                 interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.backend = backend
        self.metrics = metrics
        self.track = track  # keeps the flush task referenced until it is done
        self.interval_s = interval_s
        # users and tags named per tenant and day, bounded (an `_other` cell past it)
        self.cap = SpendCap()
        # (tenant, cell) -> six counts, since the last write
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._flushing: Optional[asyncio.Task] = None
        # a store outage fails every cell of every flush: one line per burst, not per cell
        self._failed = BurstLog(log)

    def add(self, tenant: str, att: Attribution, spend: Optional[SpendRecord],
            day: int, named: bool = True) -> None:
        """``spend`` (None: nothing was spent) under ``att``'s user and each tag; written
        within ``interval_s``. ``named``: the policy names the tenant (SpendCap.admit)."""
        if spend is None or not (att.user or att.tags):
            return
        counts = spend.counts()
        user = [("user", att.user)] if att.user else []
        for dimension, value in [*user, *(("tag", t) for t in att.tags)]:
            kept_as = self.cap.admit(tenant, day, dimension, value, named)
            if kept_as == attribution.OTHER:
                self.metrics.attribution_spend_other.labels(dimension).inc()
            key = (tenant, attribution.spend_model(dimension, kept_as))
            cell = self._pending.get(key)
            if cell is None:
                self._pending[key] = list(counts)
            else:
                for k, v in enumerate(counts):
                    cell[k] += v
        if self._flushing is None:
            try:
                task = asyncio.get_running_loop().create_task(self._flush_soon())
            except RuntimeError:  # not on the event loop: never in the sidecar itself
                return
            self._flushing = task
            self.track(task)

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(self.interval_s)
        finally:
            self._flushing = None
        await self.flush()

    async def flush(self) -> int:
        """Write every cell summed so far (a clean stop calls it too); the cells written."""
        if self._flushing is not None:  # a clean stop: its timer is not waited for
            self._flushing.cancel()
            self._flushing = None
        pending, self._pending = self._pending, {}
        written = failed = lost_nano = 0
        first = ""
        for (tenant, cell), counts in pending.items():
            try:
                await self.backend.record_spend(tenant, SpendRecord(cell, *counts))
                written += 1
            except BackendError as exc:
                failed += 1
                lost_nano += counts[5]
                first = first or f"tenant {tenant}, {cell}: {exc}"
        if failed:
            self._failed.warning("%d attributed spend cells not recorded (%d nano-USD in "
                                 "all); the first: %s", failed, lost_nano, first)
        return written
