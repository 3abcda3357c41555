"""A settlement whose reply was lost: its outcome read from the store, never guessed.

The store applies a settlement at most once per key: settle.lua's first write is its
idempotency marker (`<prefix>:{tenant}:settled:<key>`), and a key already marked changes
nothing. When a settlement's reply does not come (the store stalled, the link dropped),
the same settlement is sent again a few times. When none of those is answered either,
the store may still have applied it: a stalled Valkey runs what is in its socket when it
resumes. Taken for "not settled", its reservation would go back in the book and expire
ten minutes later as kept: the request counted twice in the durable spend.

Instead the outcome is resolved in the background: once the store answers again, a plain
EXISTS on the marker says whether the settlement was applied (then it is recorded as
settled, as if its reply had come); an absent marker means it was not, and the same
settlement is sent again (same key: should a lost send still be applied meanwhile, only
one of them counts). Until then a repeat of the same usage is refused (SettlementPending)
rather than sent as a new charge. Only a store that does not answer for
RESOLVE_GIVE_UP_S leaves the outcome unknown: then the estimate stays charged (kept).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable, Optional, Union

from sidecar import _core
from sidecar.backends.base import Backend, BackendError, BackendTimeout, Settlement
from sidecar.ledger.spend import SpendRecord
from sidecar.policy.holders import PathSettlement

log = logging.getLogger("kt.settle")

# a settlement that timed out is sent again (same key: applied at most once), this many
# sends in all, after SETTLE_RETRY_S, then twice that
SETTLE_ATTEMPTS = 3
SETTLE_RETRY_S = 0.05
# then its marker is read: first after RESOLVE_FIRST_S, doubling up to RESOLVE_MAX_S apart,
# for at most RESOLVE_GIVE_UP_S (the age at which an unsettled reservation is kept anyway)
RESOLVE_FIRST_S = 0.1
RESOLVE_MAX_S = 5.0
RESOLVE_GIVE_UP_S = 600.0
PENDING_MAX = 100_000  # resolutions in flight; beyond, the oldest is left unknown

Resolved = Callable[[Settlement], Awaitable[None]]


class SettlementPending(BackendError):
    """The settlement was sent and not confirmed; its outcome is being read from the store.
    Not "not settled": a retry of the same usage is refused until then, and changes
    nothing after."""


class Settler:
    """Sends settlements and resolves those whose reply was lost (one per sidecar)."""

    def __init__(self, backend: Backend, counted: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.clock = clock
        # told of each resolution: "applied" (the lost send was applied), "resent" (it was
        # not; sent again), "settled_before" (a key not ours alone, found settled: by
        # whom is not known), "unknown" (the store did not answer in time)
        self.counted = counted or (lambda outcome: None)
        self._pending: dict[tuple[str, str], asyncio.Task] = {}

    def pending(self, tenant: str, key: str) -> bool:
        return (tenant, key) in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    async def settle(self, tenant: str, limits: Union[_core.Limits, PathSettlement], key: str,
                     delta_tokens: int, delta_cost: int, period_start: int,
                     spend: Optional[SpendRecord],
                     ours: bool, on_resolved: Resolved,
                     on_unknown: Callable[[], None]) -> Settlement:
        """The backend's settlement. "Already settled" on a resend is this settlement's own
        first send when the key was this sidecar's alone (``ours``: it held the
        reservation, or made the key): applied. When no send is answered, raises
        SettlementPending and resolves the outcome in the background: ``on_resolved``
        with the settlement the store holds, or ``on_unknown`` if it never answers."""
        if self.pending(tenant, key):
            raise SettlementPending(f"the settlement of {key!r} is being confirmed with the "
                                    "store; a repeat changes nothing")

        async def send() -> Settlement:
            return await self.backend.settle(tenant, limits, key, delta_tokens, delta_cost,
                                             period_start, spend)

        error: BackendError = BackendError("not sent")
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                st = await send()
            except BackendTimeout as exc:
                error = exc
                if attempt + 1 < SETTLE_ATTEMPTS:
                    await asyncio.sleep(SETTLE_RETRY_S * 2 ** attempt)
                continue
            except BackendError as exc:
                # a link that dropped under a sent settlement loses its reply just the same
                error = exc
                break
            if attempt and ours and not st.applied:
                return dataclasses.replace(st, applied=True)  # its first send's, found
            return st
        self._resolve_later(tenant, key, ours, send, on_resolved, on_unknown)
        raise SettlementPending(f"settlement of {key!r} not confirmed ({error}); its outcome "
                                "is being read from the store") from None

    def _resolve_later(self, tenant: str, key: str, ours: bool,
                       send: Callable[[], Awaitable[Settlement]], on_resolved: Resolved,
                       on_unknown: Callable[[], None]) -> None:
        if len(self._pending) >= PENDING_MAX:
            oldest = next(iter(self._pending))
            self._pending.pop(oldest).cancel()
        task = asyncio.get_running_loop().create_task(
            self._resolve(tenant, key, ours, send, on_resolved, on_unknown))
        self._pending[(tenant, key)] = task

    async def _resolve(self, tenant: str, key: str, ours: bool,
                       send: Callable[[], Awaitable[Settlement]], on_resolved: Resolved,
                       on_unknown: Callable[[], None]) -> None:
        try:
            found = await self._ask_store(key, tenant, ours, send)
        except asyncio.CancelledError:
            self._pending.pop((tenant, key), None)
            self._unknown(tenant, key, on_unknown, "its resolution was stopped (the sidecar "
                          f"stopped first, or more than {PENDING_MAX} were pending)")
            raise
        self._pending.pop((tenant, key), None)
        if found is None:
            self._unknown(tenant, key, on_unknown,
                          f"the store did not answer for {RESOLVE_GIVE_UP_S:.0f} s")
            return
        outcome, st = found
        log.info("settlement of %s (tenant %s) confirmed with the store: %s", key, tenant,
                 outcome)
        self.counted(outcome)
        try:
            await on_resolved(st)
        except Exception:  # noqa: BLE001 - a background task: logged, never lost silently
            log.exception("recording the confirmed settlement of %s failed", key)

    async def _ask_store(self, key: str, tenant: str, ours: bool,
                         send: Callable[[], Awaitable[Settlement]]
                         ) -> Optional[tuple[str, Settlement]]:
        """(what the store says, the settlement it holds), or None if it did not answer
        within RESOLVE_GIVE_UP_S."""
        started = self.clock()
        wait = RESOLVE_FIRST_S
        while self.clock() - started < RESOLVE_GIVE_UP_S:
            await asyncio.sleep(wait)
            wait = min(wait * 2, RESOLVE_MAX_S)
            try:
                if await self.backend.was_settled(tenant, key):
                    # applied: by the lost send when the key was ours alone (the spend
                    # after it is not known here: -1, as without a budget)
                    return ("applied" if ours else "settled_before",
                            Settlement(applied=ours, budget_spent=-1))
                st = await send()  # not applied: the same settlement again, same key
            except BackendError:
                continue
            if not st.applied and ours:  # the lost send landed just before
                return "applied", dataclasses.replace(st, applied=True)
            return ("resent" if st.applied else "settled_before"), st
        return None

    def _unknown(self, tenant: str, key: str, on_unknown: Callable[[], None], why: str) -> None:
        log.error("settlement of %s (tenant %s) not confirmed: %s; its estimate stays "
                  "charged", key, tenant, why)
        self.counted("unknown")
        on_unknown()

    async def close(self, grace_s: float) -> None:
        """At shutdown: give the resolutions in flight ``grace_s``, then stop them (their
        outcome stays unknown: logged one by one)."""
        tasks = list(self._pending.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
