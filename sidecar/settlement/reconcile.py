"""What ends a reservation, once the response is over: the rules of docs/usage.md in one
place, whichever transport saw the response (ext_proc per request, or Envoy's access log).

- usage known (JSON body, SSE usage chunk): settle the reservation with it;
- no usage and a non-2xx status of the provider's: release (refund in full: providers do
  not bill failures); a non-2xx status Envoy answered itself while the provider was still
  working (its route timeout's 504: by the access log its response flags, by ext_proc a
  504 without the header Envoy's router sets on an upstream's answers) is not the
  provider's failure: it is
  charged as a response cut short;
- no usage, a 2xx status, the response cut short (the client left, the upstream reset),
  or no response at all (the client left first): charged at what the provider could have
  billed (sidecar/settlement/bound.py; "abandoned");
- no usage, a 2xx status that ended normally (usage absent, compressed, too large to
  read): charged at that bound too ("no_usage").
The bound takes what Envoy's usage filter read in the whole request body, when the
decision saw only its first part (``body_seen``; sidecar/settlement/bound.py, with_body_seen).
"""
from __future__ import annotations

import logging
from typing import Optional

from sidecar import attribution
from sidecar.attribution import Attribution
from sidecar.backends.base import BackendError
from sidecar.settlement.book import reservation_key
from sidecar.settlement.service import SettlementService
from sidecar.settlement.usage import Usage, UsageError
from sidecar.upstream_sli import Upstream, current

log = logging.getLogger("kt.reconcile")


async def close_reservation(service: SettlementService, reservation_id: str, x_request_id: str,
                            tenant: Optional[str], status: int, usage: Optional[Usage],
                            model: Optional[str], cut_short: bool, source: str,
                            settled_by: str, provider_failed: bool = True,
                            body_seen: Optional[str] = None,
                            upstream: Optional[Upstream] = None,
                            att: Attribution = attribution.NONE) -> None:
    """Apply the rule for one finished response; never raises (the response has gone).
    ``reservation_id`` is the request's x-kt-reservation (the sidecar's own id), ""
    when Envoy's failure mode let it through; ``x_request_id`` its x-request-id.
    ``source`` labels the settlement metric; ``settled_by`` tells the ledger how the usage
    was read (e.g. ``ext_proc_sse``, ``access_log_json``). ``provider_failed``: False when
    a non-2xx status is Envoy's own answer while the provider was still working.
    ``body_seen``: the usage filter's report of the whole request body, or None.
    ``upstream``: the provider's answer (status, timings, endpoint) for the ledger's event,
    seen by the recorder through sidecar/upstream_sli.py's context variable.
    ``att``: the request's attribution as the access log carried it (used when no
    reservation holds the decision's own)."""
    request_id = reservation_key(reservation_id, x_request_id)
    if not request_id:
        return
    token = current.set((request_id, upstream)) if upstream is not None else None
    try:
        if usage is not None:
            # without a reservation id of ours, settle under a fresh id: charged in full,
            # never taken for a repeat of another request's settlement (a client's
            # x-request-id must not make two requests one; this path never retries)
            await service.settle_usage(request_id, tenant, model, usage.prompt_tokens,
                                       usage.completion_tokens, source, usage.cached_tokens,
                                       usage.cache_write_tokens, settled_by,
                                       settle_id=None if reservation_id
                                       else service.new_reservation_id(), att=att)
        elif status and not 200 <= status < 300 and provider_failed:
            await service.release(request_id, "upstream_error")
        else:
            # status 0: no response was sent at all (the client left before it began)
            await service.charge_unread(
                request_id, "abandoned" if cut_short or not status else "no_usage", tenant,
                body_seen)
    except (UsageError, BackendError) as exc:
        # the response is already on its way; never fail it for accounting
        log.warning("usage of request %s not settled: %s", request_id, exc)
    finally:
        if token is not None:
            current.reset(token)
