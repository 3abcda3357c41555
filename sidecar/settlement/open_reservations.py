"""A clean stop records the reservations still open, charged at their bound, and the
books say so.

After the drain (gRPC stopped, no usage arrives any more) the requests this sidecar
admitted and has not settled are still charged to their budget at their estimate, which
the client chose (a body without max_tokens is estimated at the policy's default output).
Their usage may never reach a sidecar (the access-log entries of streams still running go
to a sidecar that is gone), or reach another replica, or this one after its restart. As
for any request whose usage cannot be read, each is charged at its bound, what the
provider could bill it (bound.py), through the ordinary settlement (settle.lua, or the
embedded backend's journal): the budget moves from the estimate to the bound, the durable
spend gets its tokens and their price, the ledger a ``kept`` event with ``settled_by:
shutdown`` (metric ``kt_reservations_closed_total{outcome="bound_shutdown"}``), and the
store's idempotency marker for the request is set in the same atomic step. So a usage
report that arrives later for the same request, at another replica or at this one
restarted, finds it settled and charges nothing more: charged once, at its bound. A
client cannot keep a stream open across a deploy to pay only its own estimate; an honest
stream longer than the drain's grace pays its bound too (set the grace above the longest
streams: docs/deploy.md, "Stopping").

Bounded: at most ``timeout_s`` (the drain's grace) for all of them; settlements still
unanswered then are left as they are (their estimate stays charged; counted and logged).
"""
from __future__ import annotations

import asyncio
import logging

from sidecar.backends.base import BackendError
from sidecar.settlement.book import Reservation
from sidecar.settlement.resend import SettlementPending
from sidecar.settlement.service import SettlementService
from sidecar.settlement.usage import UsageError

log = logging.getLogger("kt.shutdown")

WHY = "shutdown"  # the ledger's settled_by, and the metric's reason (bound_shutdown)


async def _keep(service: SettlementService, request_id: str, res: Reservation) -> bool:
    """Settle one open reservation at its bound; True when the store applied it. Unlike
    the service's own fallback, a charge the store refused is not recorded as kept in the
    background (the process is stopping): its estimate stays held, as the store says."""
    try:
        return await service.settle_at_bound(request_id, res, "kept", WHY)
    except SettlementPending:
        return False  # resolved by the settler in the time it is given (server.stop)
    except (UsageError, BackendError) as exc:
        log.warning("open reservation %s of tenant %s not recorded at shutdown: %s; its "
                    "estimate stays charged", request_id, res.tenant, exc)
        return False


async def keep_open_reservations(service: SettlementService, timeout_s: float) -> int:
    """Record every reservation still in ``service``'s book as kept at its bound (see
    the module's text); the number recorded."""
    book = service.reservations
    taken = []
    for request_id in book.open_ids():
        res = book.pop(request_id)
        if res is not None:
            taken.append((request_id, res))
    if not taken:
        return 0
    # all at once: the Redis backend sends those of one loop tick as one script call
    tasks = [asyncio.ensure_future(_keep(service, rid, res)) for rid, res in taken]
    done, late = await asyncio.wait(tasks, timeout=max(timeout_s, 0.1))
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    kept = sum(1 for t in done if not t.cancelled() and t.exception() is None and t.result())
    if kept < len(taken):
        log.warning("shutdown: %d of %d open reservations recorded as kept; the others' "
                    "estimates stay charged without a record", kept, len(taken))
    else:
        log.info("shutdown: %d open reservations recorded as kept at their bound", kept)
    return kept
