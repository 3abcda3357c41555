"""The one seam between the decision service and where state lives.

A backend applies the decision core's rules to one tenant's shared state and
returns an ``Outcome``. It never chooses what Envoy sees: on any failure it
raises ``BackendError`` and the service applies the configured failure mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Sequence, Union

from sidecar._core import Limits, Outcome, Quota, State
from sidecar.ledger.spend import LAST_DAY, SpendCell, SpendRecord
from sidecar.metrics import BackendStats
from sidecar.policy.holders import HolderPath, PathSettlement
from sidecar.policy.schema import FailureMode, FailureModes


# what take_reservation leaves where a shared reservation was (never a valid record)
TAKEN_RESERVATION = "-"


class BackendError(Exception):
    """The backend could not decide (unreachable, timed out, malformed reply)."""


class LateReply:
    """Where a decision that timed out reports its outcome if the reply comes after all.

    A timed-out command may still be applied by the server: the service, which knows
    what it answered meanwhile (the failure mode), sets ``on_outcome`` to put that right
    (refund a charge for a request it refused; keep one for a request it let through)."""

    __slots__ = ("on_outcome",)

    def __init__(self) -> None:
        self.on_outcome: Optional[Callable[[Outcome], None]] = None


class BackendTimeout(BackendError):
    """No reply within the timeout; the decision may still be applied (its outcome then
    goes to the caller's ``LateReply``)."""


class BackendOverloaded(BackendTimeout):
    """Not decided in time while the store kept answering: the work in front of the call
    (this sidecar's own) made it late. Not an outage: the service sheds the request with
    its own answer instead of the failure mode (the decision may still be applied, as for
    any timeout, and is then put right through its ``LateReply``)."""


class Candidate(NamedTuple):
    """A provider a routed decision may charge (docs/providers.md): the tier whose model it
    would serve, its id (its state's key) and its quota."""

    tier: int
    provider: str
    quota: Quota


@dataclass(frozen=True)
class BackendStatus:
    ready: bool
    detail: str


@dataclass(frozen=True)
class Settlement:
    """What a reconciliation did: ``applied`` is False when the request id was seen before.
    ``at_us``: the backend's clock when it was applied (the instant that dated the durable
    spend; 0 when not known), so the ledger's event falls on the same day and month."""

    applied: bool
    budget_spent: int
    at_us: int = 0


class Backend(Protocol):
    name: str
    shares_reservations: bool  # reservations visible to every replica (share/take below)

    @property
    def failure_mode(self) -> Union[FailureMode, FailureModes]:
        """What answers when this backend cannot decide (the decision flow's failure
        modes): "open", "envoy", "closed", or one per class of limit. A backend without an
        outage to be open about (the embedded one) says "closed"."""

    async def start(self) -> None:
        """Connect / load state. May raise BackendError."""

    async def close(self) -> None:
        """Flush and release everything; safe to call twice."""

    async def decide(
        self,
        tenant: str,
        limits: Limits,
        tier: int,
        input_tokens: int,
        output_tokens: int,
        firm_tokens: int,
        commit_on_deny: bool,
        late: Optional[LateReply] = None,
    ) -> Outcome:
        """One atomic decision against the tenant's shared state (see native/core.pyx).

        ``late``: where the outcome goes if the caller stops waiting (a timeout, or its
        task cancelled) and the backend applies the decision all the same."""

    async def decide_path(
        self,
        tenant: str,
        path: HolderPath,
        tier: int,
        input_tokens: int,
        output_tokens: int,
        firm_tokens: int,
        commit_on_deny: bool,
        late: Optional[LateReply] = None,
    ) -> Outcome:
        """One atomic decision over every cell of ``path`` (_core.decide_path; a holder,
        its windows and model cells, its parents: docs/budgets.md): all charged or none.
        Outcome.cell names the cell that refused or downgraded, Outcome.charges what each
        cell was charged (the reservation keeps it with the path, for settle)."""

    async def settle(
        self,
        tenant: str,
        limits: Union[Limits, PathSettlement],
        request_id: str,
        delta_tokens: int,
        delta_cost: int,
        period_start_us: int,
        spend: Optional[SpendRecord] = None,
    ) -> Settlement:
        """Apply actual-minus-charged usage once per request id (idempotent). ``spend``: the
        ledger's record of the request, added to the tenant's spend per day and model in
        the same atomic step (only when applied). ``limits`` a PathSettlement: every cell
        of the path a decision was charged on moves (delta_tokens, and each cell's own
        cost difference; ``delta_cost`` and ``period_start_us`` are then unused), and
        ``budget_spent`` is the first cell's."""

    async def was_settled(self, tenant: str, request_id: str) -> bool:
        """Whether a settlement with this (tenant, id) was applied: its idempotency marker,
        read without changing anything (a settlement whose reply was lost asks this once
        the store answers again). May raise BackendError."""

    async def record_spend(self, tenant: str, spend: SpendRecord, period_start_us: int = -1,
                           held: int = 0) -> None:
        """Add to the tenant's spend per day and model without a settlement (a request
        whose estimate stays charged): ``held``, what its decision charged the budget
        period starting ``period_start_us``, is no longer held (docs/ledger.md, "Held").
        May raise BackendError."""

    def has_room_for(self, tenant: str) -> bool:
        """Whether this backend can hold state for ``tenant`` now (the embedded backend
        holds a bounded number of tenants in memory; Redis holds them itself)."""

    async def spend_cells(self, since_day: int = 0, until_day: int = LAST_DAY,
                          tenant: Optional[str] = None) -> list[SpendCell]:
        """Every tenant's spend per model on each UTC day of ``since_day..until_day``
        (inclusive), as every replica sees it, at a cost that follows the tenants the
        range holds, not every tenant ever seen; and, whatever the range, what every
        tenant's budget holds for requests not settled yet (HELD cells,
        sidecar/ledger/spend.py). ``tenant``: that tenant's cells only, at the cost of
        that tenant's (one holder's counters). May raise BackendError."""

    async def decide_routed(
        self,
        tenant: str,
        limits: Limits,
        tier: int,
        input_tokens: int,
        output_tokens: int,
        firm_tokens: int,
        commit_on_deny: bool,
        priority: int,
        spill: int,
        candidates: Sequence[Candidate],
        late: Optional[LateReply] = None,
    ) -> Outcome:
        """One decision that charges the tenant and one candidate provider together, or
        neither (_core.decide_routed); Outcome.provider indexes ``candidates``."""

    async def settle_provider(self, provider: str, quota: Quota, marker: str,
                              delta_tokens: int, delta_requests: int = 0) -> bool:
        """Correct a provider's buckets once per ``marker`` (a request id for a settlement):
        tokens actual minus charged, requests given back by a refund (< 0). False when the
        marker was applied before."""

    def share_reservation(self, tenant: str, request_id: str, record: str) -> None:
        """Keep a reservation where every replica finds it (no-op for a one-process backend).
        Fire and forget: never waits, never raises (the local book still has it)."""

    def forget_reservation(self, tenant: str, request_id: str) -> None:
        """Drop a reservation this replica shared and has settled itself (no replica needs
        it any more). Fire and forget, as share_reservation."""

    async def take_reservation(self, tenant: str, request_id: str) -> Optional[str]:
        """The reservation another replica shared for this request, taken: replaced by the
        mark TAKEN_RESERVATION until it would have expired, so the replica that decided
        can tell "settled elsewhere" from "never settled" when its own copy expires.
        Returns the record, TAKEN_RESERVATION when another replica took it first, or None
        (none shared, or expired). May raise BackendError."""

    async def read_state(self, tenant: str) -> Optional[State]:
        """A copy of the tenant's own state as last written (buckets and budget; a fresh
        State when it has none), read without deciding, for the management API's live
        counters (the decision core then says what it holds now); None when this backend
        cannot read it alone. May raise BackendError."""

    async def read_cell_state(self, root: str, cell_id: str) -> Optional[State]:
        """A copy of one cell of a holder tree (docs/budgets.md: ``root`` names the tree,
        ``cell_id`` the cell), as ``read_state`` reads a tenant's own. May raise
        BackendError."""

    def status(self) -> BackendStatus:
        """Readiness, cheap and non-blocking (read by /readyz)."""

    def stats(self) -> BackendStats:
        """The backend's own counters, cheap and non-blocking (read by /metrics)."""
