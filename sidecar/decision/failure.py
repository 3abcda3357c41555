"""What answers when the backend cannot decide: the tenant's failure mode (the backend's
configuration says which: base.py's ``failure_mode``), or, when the store answered but
this sidecar could not decide in time, its own overload answer."""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from sidecar.backends.base import Backend
from sidecar.burstlog import BurstLog
from sidecar.decision.routing import ProviderRouter
from sidecar.metrics import Metrics
from sidecar.model import Decision, Kind
from sidecar.policy.load import CompiledPolicy, TenantRule

log = logging.getLogger("kt.service")
_STRICTNESS = {"open": 0, "envoy": 1, "closed": 2}


def mode_for(backend: Backend, rule: TenantRule) -> str:
    """The strictest mode among the classes of limit this tenant has (closed > envoy > open)."""
    fm = backend.failure_mode
    if isinstance(fm, str):
        return fm
    # every cell the tenant may be decided on: a parent's budget is a budget too
    cells = [rule.limits]
    for path in [rule.path, *(rule.model_paths or {}).values()]:
        if path is not None:
            cells += [c.limits for c in path.cells]
    modes = []
    if any(lim.rpm > 0 or lim.tpm > 0 for lim in cells):
        modes.append(fm.rate_limits)
    if any(lim.budget >= 0 for lim in cells):
        modes.append(fm.budgets)
    if not modes:
        return "open"
    return max(modes, key=_STRICTNESS.__getitem__)


class FailureAnswers:
    """The answers of a decision the backend did not make."""

    def __init__(self, backend: Backend, metrics: Metrics,
                 new_reservation_id: Callable[[], str]) -> None:
        self.backend = backend
        self.metrics = metrics
        self.new_reservation_id = new_reservation_id
        self._last_failure_log = 0.0
        self.overload_log = BurstLog(log)

    def failed(self, policy: CompiledPolicy, router: Optional[ProviderRouter], tenant: str,
               rule: TenantRule, asked: int, error: str) -> Decision:
        """The backend could not decide: the configured failure mode answers, never
        silently."""
        self.metrics.backend_errors.labels(self.backend.name).inc()
        mode = mode_for(self.backend, rule)
        self.metrics.failure_mode.labels(mode).inc()
        self.metrics.failure_mode_recent.add()
        now = time.monotonic()
        if now - self._last_failure_log >= 1.0:  # an outage must not flood the log
            self._last_failure_log = now
            log.warning("backend error, failure mode %s (tenant %s; further errors this second "
                        "are only counted in kt_backend_errors_total): %s", mode, tenant, error)
        tier = policy.tiers[asked]
        if mode == "open":
            # an id for the usage of a request that goes on: a late reply is held under it;
            # Envoy routes on the provider: name one
            return Decision(Kind.FAIL_OPEN, tenant=tenant, tier=tier.name, model=tier.model,
                            priority=rule.priority, message=error,
                            reservation_id=self.new_reservation_id(),
                            provider=router.first(asked) if router is not None else "")
        if mode == "closed":
            return Decision(Kind.FAIL_CLOSED, tenant=tenant, message=(
                "The rate limiter is unavailable and this tenant's limits fail closed. "
                "Try again shortly."))
        return Decision(Kind.UNAVAILABLE, tenant=tenant, message=f"limiter backend: {error}")

    def shed(self, tenant: str, error: str) -> Decision:
        """The store answered, but not this decision in time: this sidecar is overloaded.
        Refused with its own answer (503 limiter_overloaded, counted as kt_requests_total
        {decision="overloaded"}), never by the failure mode, which would switch the limits
        off (open) or blame the store (closed)."""
        self.overload_log.warning("overloaded: a decision for tenant %s was not made in time "
                                  "and is refused (503 limiter_overloaded): %s", tenant, error)
        return Decision(Kind.OVERLOADED, tenant=tenant, message=(
            "The rate limiter is overloaded and could not decide in time. Try again shortly."))
