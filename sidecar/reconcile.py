"""What ends a reservation, once the response is over: the rules of docs/usage.md in one
place, whichever transport saw the response (ext_proc per request, or Envoy's access log).

- usage known (JSON body, SSE usage chunk): settle the reservation with it;
- no usage and a non-2xx status: release (refund in full: providers do not bill failures);
- no usage, a 2xx status, the response cut short (the client left, the upstream reset),
  or no response at all (the client left first): the estimate stays charged ("abandoned");
- no usage, a 2xx status that ended normally: the estimate stays charged ("no_usage").
"""
from __future__ import annotations

import logging
from typing import Optional

from sidecar.backends.base import BackendError
from sidecar.service import DecisionService, UsageError
from sidecar.usage import Usage

log = logging.getLogger("kt.reconcile")


async def close_reservation(service: DecisionService, request_id: str, tenant: Optional[str],
                            status: int, usage: Optional[Usage], model: Optional[str],
                            cut_short: bool, source: str, settled_by: str) -> None:
    """Apply the rule for one finished response; never raises (the response has gone).
    ``source`` labels the settlement metric; ``settled_by`` tells the ledger how the usage
    was read (e.g. ``ext_proc_sse``, ``access_log_json``)."""
    if not request_id:
        return
    try:
        if usage is not None:
            await service.settle_usage(request_id, tenant, model, usage.prompt_tokens,
                                       usage.completion_tokens, source, usage.cached_tokens,
                                       usage.cache_write_tokens, settled_by)
        elif status and not 200 <= status < 300:
            await service.release(request_id, "upstream_error")
        else:
            # status 0: no response was sent at all (the client left before it began)
            service.abandon(request_id, "abandoned" if cut_short or not status else "no_usage")
    except (UsageError, BackendError) as exc:
        # the response is already on its way; never fail it for accounting
        log.warning("usage of request %s not settled: %s", request_id, exc)
