"""The admission queue (docs/providers.md): a request refused by a rate bucket that will
have room within ``queue.max_wait_ms`` waits for it instead of an instant 429.

Shape: the service decides as usual; a refusal that may wait is handed to ``hold``,
which parks the request until its bucket is due to have room, then decides it again.
One timer (the earliest due waiter) drives every release; waiters due at the same moment
are released in priority order (high first), round robin between the tenants of one
priority (the tenant released least so far first), first come first served within a
tenant. Released together, they reach the backend in that order (the Redis backend
batches the decisions queued in one event-loop tick in queue order), so the higher
priority gets the room. A request whose next wait would end after its deadline leaves at
once with the 429 (and the truthful retry-after) of the decision that refused it: the
queue never holds a request whose wait cannot end in time. It holds coroutines, never
the event loop.

The queue cannot be turned against the limits or the other tenants: one tenant holds at
most ``tenant_share`` of ``max_size`` places (at least one), and a request that finds the
queue full takes the place of the lowest-priority waiter below its own priority (the
latest parked of them), which leaves at once with the 429 of its last decision.

When the caller says how long it still waits (gRPC ext_authz: Envoy's grpc-timeout), a
wait must also end ``CALLER_MARGIN_S`` before that: a sidecar so busy that a check reached
it late answers the truthful 429 at once, instead of leaving Envoy's own timeout to answer
by its failure mode.

The clock is injected (``Timer``): the running loop's in production, a fake in tests.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Protocol

from sidecar.metrics import Metrics
from sidecar.model import Decision, Kind
from sidecar.policy import schema


# kept of the caller's wait for the decision after the wait and the answer's way back
# (`kt envoy-config` sets Envoy's ext_authz timeout to max_wait_ms plus this)
CALLER_MARGIN_S = 0.25


class Handle(Protocol):
    def cancel(self) -> None: ...


class Timer(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle: ...


class LoopTimer:
    """The running event loop's monotonic clock and timers."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        return asyncio.get_running_loop().call_at(when, callback)


@dataclass(eq=False)
class _Waiter:
    tenant: str
    priority: int
    seq: int
    ready_at: float
    future: asyncio.Future = field(repr=False)
    preempted: bool = False  # its place went to a higher priority


class AdmissionQueue:
    def __init__(self, settings: schema.Queue, metrics: Metrics,
                 timer: Optional[Timer] = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.timer: Timer = timer or LoopTimer()
        self._parked: list[_Waiter] = []  # waiting for their bucket's room
        self.members = 0  # in the queue: parked, or released and deciding again
        self._held: dict[str, int] = {}  # members per tenant
        self._seq = 0
        self._turns: dict[str, int] = {}  # admissions per tenant (fairness), while non-empty
        self._wake: Optional[Handle] = None
        self._wake_at = 0.0

    @staticmethod
    def may_wait(d: Decision) -> bool:
        """A refusal by a rate bucket (the tenant's or a provider's) that names its wait."""
        return (d.kind is Kind.DENY_RATE and not d.shadow and d.outcome is not None
                and d.outcome.wait_us > 0)

    async def hold(self, decision: Decision, priority: int,
                   retry: Callable[[], Awaitable[Decision]], arrived: float,
                   caller_wait_s: Optional[float] = None) -> Decision:
        """Wait for room and decide again, until admitted, refused for another reason, or
        the wait would pass ``arrived`` + max_wait_ms (or, when ``caller_wait_s`` says how
        long the caller still waited at ``arrived``, CALLER_MARGIN_S before it gives up).
        ``arrived``: self.timer's clock."""
        t = self.timer
        deadline = arrived + self.settings.max_wait_ms / 1000.0
        if caller_wait_s is not None:
            deadline = min(deadline, arrived + caller_wait_s - CALLER_MARGIN_S)
        assert decision.outcome is not None
        if t.now() + decision.outcome.wait_us / 1e6 > deadline:
            return self._reject(decision, "wait_too_long", None)
        tenant = decision.tenant
        held = self._held.get(tenant, 0)
        if held >= self.tenant_places:
            return self._reject(decision, "tenant_share", None)
        if self.members >= self.settings.max_size and not self._preempt(priority):
            return self._reject(decision, "full", None)
        self.members += 1
        self._held[tenant] = held + 1
        self.metrics.queue_depth.set(self.members)
        entered = t.now()
        preempted = False
        try:
            while True:
                assert decision.outcome is not None
                ready_at = t.now() + decision.outcome.wait_us / 1e6
                if ready_at > deadline:
                    return self._reject(decision, "wait_too_long", entered)
                preempted = await self._park(tenant, priority, ready_at)
                if preempted:
                    return self._reject(decision, "preempted", entered)
                decision = await retry()
                if decision.admitted:
                    self._turns[decision.tenant] = self._turns.get(decision.tenant, 0) + 1
                if not self.may_wait(decision):
                    self.metrics.queue_wait.labels(
                        "admitted" if decision.admitted else "refused").observe(t.now() - entered)
                    return decision
        finally:
            if not preempted:  # a preempted waiter's place was handed over at once
                self.members -= 1
            left = self._held[tenant] - 1
            if left:
                self._held[tenant] = left
            else:
                del self._held[tenant]
            self.metrics.queue_depth.set(self.members)
            if not self.members:
                self._turns.clear()

    @property
    def tenant_places(self) -> int:
        """The most places one tenant may hold."""
        return max(1, int(self.settings.max_size * self.settings.tenant_share))

    def _preempt(self, priority: int) -> bool:
        """Free a place for ``priority`` in a full queue: the lowest-priority parked waiter
        below it (the latest of them) leaves with its refusal. False if there is none."""
        lower = [w for w in self._parked if w.priority < priority and not w.future.done()]
        if not lower:
            return False
        w = min(lower, key=lambda w: (w.priority, -w.seq))
        w.preempted = True
        self._parked.remove(w)
        w.future.set_result(None)
        self._schedule()
        # its place is the caller's now (the waiter leaves on its next turn)
        self.members -= 1
        return True

    def _reject(self, decision: Decision, reason: str, entered: Optional[float]) -> Decision:
        self.metrics.queue_rejections.labels(reason).inc()
        if entered is not None:
            self.metrics.queue_wait.labels("rejected").observe(self.timer.now() - entered)
        return decision

    async def _park(self, tenant: str, priority: int, ready_at: float) -> bool:
        """Wait until released (False) or preempted (True)."""
        self._seq += 1
        w = _Waiter(tenant, priority, self._seq, ready_at,
                    asyncio.get_running_loop().create_future())
        self._parked.append(w)
        self._schedule()
        try:
            await w.future
            return w.preempted
        finally:
            if not w.future.done():  # cancelled: Envoy gave up on the request
                w.future.cancel()
            if w in self._parked:
                self._parked.remove(w)
                self._schedule()

    def _schedule(self) -> None:
        if not self._parked:
            if self._wake is not None:
                self._wake.cancel()
                self._wake = None
            return
        first = min(w.ready_at for w in self._parked)
        if self._wake is not None:
            if self._wake_at <= first:
                return
            self._wake.cancel()
        self._wake_at = first
        self._wake = self.timer.call_at(first, self._release)

    def _release(self) -> None:
        self._wake = None
        now = self.timer.now()
        due = sorted((w for w in self._parked if w.ready_at <= now), key=lambda w: w.seq)
        # round robin between tenants: a tenant's k-th due waiter ranks after every other
        # tenant's (k-1)-th, counting what each was admitted from the queue before (while
        # the queue is not empty)
        turns = self._turns
        rank: dict[int, int] = {}
        taken: dict[str, int] = {}
        for w in due:
            k = taken.get(w.tenant, 0)
            taken[w.tenant] = k + 1
            rank[w.seq] = turns.get(w.tenant, 0) + k
        due.sort(key=lambda w: (-w.priority, rank[w.seq], w.seq))
        for w in due:
            self._parked.remove(w)
            if not w.future.done():
                w.future.set_result(None)
        self._schedule()
