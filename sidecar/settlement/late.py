"""Refunds of charges that did not stand: a decision the store applied after it timed out
and the failure mode had refused the request, or one that arrived while the request was
being settled in full. Each is a settlement of its own under a fresh id (applied once,
never mistaken for a usage report), sent in the background."""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable, Union

from sidecar import _core
from sidecar.backends.base import Backend, BackendError, Candidate
from sidecar.metrics import Metrics
from sidecar.policy.holders import PathSettlement

log = logging.getLogger("kt.settle")


class LateRefunds:
    def __init__(self, backend: Backend, metrics: Metrics,
                 track: Callable[[asyncio.Task], None]) -> None:
        self.backend = backend
        self.metrics = metrics
        self.track = track  # keeps each refund referenced until it is done

    def refund(self, tenant: str, limits: Union[_core.Limits, PathSettlement], tokens: int,
               cost: int, period_start_us: int) -> None:
        """Give a tenant back what a decision that did not stand charged it (a path's
        decision: ``limits`` is its PathSettlement, each cell's charge negated)."""
        async def refund() -> None:
            try:
                await self.backend.settle(tenant, limits, f"late-refund:{uuid.uuid4().hex}",
                                          -tokens, -cost, period_start_us)
            except BackendError as exc:
                log.warning("could not refund a late decision for tenant %s (%d tokens, %d "
                            "nano-units stay charged): %s", tenant, tokens, cost, exc)
                self.metrics.late_replies.labels("refund_failed").inc()
                return
            self.metrics.late_replies.labels("refunded").inc()

        self.track(asyncio.get_running_loop().create_task(refund()))

    def refund_provider(self, c: Candidate, tokens: int, requests: int) -> None:
        """Give a provider back what a decision that did not stand charged it."""
        async def refund() -> None:
            try:
                await self.backend.settle_provider(c.provider, c.quota,
                                                   f"late-refund:{uuid.uuid4().hex}",
                                                   -tokens, -requests)
            except BackendError as exc:
                log.warning("could not give provider %s back a late decision's request and "
                            "%d tokens (they refill): %s", c.provider, tokens, exc)

        self.track(asyncio.get_running_loop().create_task(refund()))
