"""Embedded backend: state in this process, decided by the Cython core.

Durability (docs/design.md, "Embedded backend durability"):

- **Snapshot**: budget spend of every tenant, a JSON file replaced atomically (temp file,
  fsync, rename, fsync of the directory) every ``flush_interval_s`` and at shutdown.
  Written by a thread from a mirror of the spend that only the thread reads; the event
  loop hands it just the tenants whose spend changed since the last snapshot, so a flush
  costs the loop O(changed tenants), never O(all tenants), and the JSON is encoded in
  chunks between writes (each releases the GIL) rather than in one piece.
- **Journal**: every settlement (usage report, ext_proc usage, release) is appended, with
  the tenant's spend after it, to an append-only journal that another thread fsyncs in
  groups; a settlement returns (and a usage report is acknowledged) only once its record
  is on disk. On start the journal is replayed over the snapshot, so an acknowledged
  report is never lost and never applied twice: settled (tenant, request id) pairs are
  remembered across a restart (the last SETTLED_IDS_MAX of them).

Rate buckets are not persisted: a restart grants at most one burst. A SIGKILL loses at
most the decisions' charges since the last snapshot (one interval); acknowledged
settlements are never lost. A state file that cannot be read, or holds a value that is not
a spend (negative, fractional, boolean, text, infinite, beyond 2^62), stops the sidecar
from starting rather than silently handing every tenant its budget back.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional, Sequence, Union


from sidecar import _core
from sidecar.backends.base import (BackendError, BackendStatus, Candidate, LateReply,
                                   Settlement)
from sidecar.backends.state_files import (MAX_STATE_VALUE, SETTLED_IDS_MAX, TenantSpend,
                                          StateFiles, check_spend, refuse, valid_int)
from sidecar.ledger.spend import (HELD_FIELD, LAST_DAY, SpendCell, SpendRecord, day_of,
                                  held_cell)
from sidecar.metrics import BackendStats, StateFileStats
from sidecar.policy.holders import HolderPath, PathSettlement, refresh_windows
from sidecar.policy.schema import FailureMode

log = logging.getLogger("kt.memory")
# tenant states kept before a sweep drops those at rest (see _sweep); a sweep then waits
# until the count doubles, so its cost per decision stays constant
TENANT_STATES_SWEEP_AT = 100_000
# tenants held at once (the policy's backend.max_tenants); a sweep when full at most this
# often: a flood of new names refused at the cap must not buy an O(tenants) sweep each
MAX_TENANTS = 100_000
FULL_SWEEP_INTERVAL_S = 1.0


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class MemoryBackend:
    name = "memory"
    shares_reservations = False  # one process: its reservation book is the only one
    failure_mode: FailureMode = "closed"  # no outage to be open about

    def __init__(self, state_file: str = "", flush_interval_s: float = 1.0,
                 clock: Callable[[], int] = wall_clock_us,
                 sweep_at: int = TENANT_STATES_SWEEP_AT,
                 max_tenants: int = MAX_TENANTS) -> None:
        self.state_file = state_file
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.states: dict[str, _core.State] = {}
        self._limits: dict[str, _core.Limits] = {}  # the limits each state was last used with
        self.min_sweep_at = self._sweep_at = min(sweep_at, max_tenants)
        self.states_dropped = 0
        self.max_tenants = max_tenants
        self._full_sweep_at = 0.0  # when a sweep last ran because the states were full
        # (tenant, request id) of settled requests -> the number of its journal record (0:
        # none, or loaded from disk): a repeated report is a no-op
        self.settled: OrderedDict[tuple[str, str], int] = OrderedDict()
        # tenants whose spend changed since the last snapshot, and those dropped by a sweep
        self._dirty: dict[str, _core.State] = {}
        self._removed: set[str] = set()
        self._files: Optional[StateFiles] = None
        self._snapshots: Optional[ThreadPoolExecutor] = None
        self._journal: Optional[ThreadPoolExecutor] = None
        self._snapshot_running = False
        self._seq = 0  # journal records made (the last one's number)
        self._durable_seq = 0  # journal records known to be on disk
        self._snapshot_owed = False  # a snapshot failed: write one even if nothing changed
        self._journal_pending: list[tuple] = []
        self._journal_waiters: list[asyncio.Future] = []
        self._commit_running = False
        # provider quotas (docs/providers.md): state by provider id, settled markers
        self.quota_states: dict[str, _core.QuotaState] = {}
        self.provider_settled: OrderedDict[tuple[str, str], None] = OrderedDict()
        # the ledger's spend: tenant -> (UTC day, model) -> [requests, input, output, cache
        # read, cache write, nano-USD]; in the snapshot, and each settlement's cell (its
        # counts after) in the journal record, so spend and budget come back together
        self.spend: dict[str, dict[tuple[int, str], list[int]]] = {}
        # UTC day -> the tenants with spend that day: /v1/spend over a range reads those
        self._spend_days: dict[int, set[str]] = {}
        self._spend_dirty: set[str] = set()
        # what each budget holds for requests not settled yet (docs/ledger.md, "Held"):
        # tenant -> budget period start (µs) -> amount in the budget's unit. Moved as the
        # budget is (a decision's charge adds, its settlement takes the estimate out), in
        # the snapshot with the spend (as the decisions that charge it) and, after a
        # settlement, its value in the settlement's journal record
        self.held: dict[str, dict[int, int]] = {}
        self._flusher: Optional[asyncio.Task] = None
        self._last_error = ""
        self.write_failures = {"snapshot": 0, "journal": 0}
        self.snapshot_seconds = 0.0  # the last snapshot's duration (in its thread)
        self.snapshot_tenants = 0
        self.decisions = 0
        self.round_trips = 0  # no backend round trips: state is local

    async def start(self) -> None:
        if not self.state_file:
            return
        files = StateFiles(self.state_file)
        try:
            files.check_writable()
        except OSError as exc:
            raise BackendError(f"state file {self.state_file}: cannot write there ({exc}); "
                               "give --state-file / backend.state_file a writable path") from None
        segments = self._load(files)
        try:
            files.open_journal(self._seq + 1, segments)
        except OSError as exc:
            raise BackendError(f"state file {self.state_file}: cannot open its journal "
                               f"({exc})") from None
        files.mirror = {t: TenantSpend(st.period_start, st.spent)
                        for t, st in self.states.items() if st.period_start >= 0}
        files.spend_mirror = {t: self._spend_entries(t) for t in {*self.spend, *self.held}}
        files.snapshot_seq = files.durable_seq = self._durable_seq = self._seq
        self._files = files
        self._snapshots = ThreadPoolExecutor(1, thread_name_prefix="kt-state-snapshot")
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="kt-state-journal")
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
            self._flusher = None
        if self._files is None:
            return
        while self._commit_running or self._snapshot_running:
            await asyncio.sleep(0.005)
        if self._journal_pending:
            self._start_commit()
            while self._commit_running:
                await asyncio.sleep(0.005)
        try:
            await self.flush()
        except OSError as exc:
            log.error("state file %s: the last snapshot failed (%s): spend charged since the "
                      "last good one is lost, settlements are in the journal", self.state_file,
                      exc)
        assert self._snapshots is not None and self._journal is not None
        await asyncio.get_running_loop().run_in_executor(self._journal, self._files.close_journal)
        self._snapshots.shutdown()
        self._journal.shutdown()
        self._files = None

    def state_for(self, tenant: str, limits: Optional[_core.Limits] = None) -> _core.State:
        st = self.states.get(tenant)
        if st is None:
            if len(self.states) >= self._sweep_at:
                self._sweep()
            st = self.states[tenant] = _core.State()
        if limits is not None:
            self._limits[tenant] = limits
        return st

    def has_room_for(self, tenant: str) -> bool:
        """Whether a decision for ``tenant`` can be held in memory: it is held already,
        or there is room for one more (after dropping the states at rest, at most once a
        second while full)."""
        if tenant in self.states or len(self.states) < self.max_tenants:
            return True
        now = time.monotonic()
        if now - self._full_sweep_at >= FULL_SWEEP_INTERVAL_S:
            self._full_sweep_at = now
            self._sweep()
        return len(self.states) < self.max_tenants

    def _sweep(self) -> None:
        """Drop the states at rest (buckets full, nothing spent this period): each decides
        exactly as the fresh state that replaces it would (_core.at_rest), so nothing is
        lost, and memory stays bounded when clients send ever new tenant names under
        `unknown: defaults`. States with spend this period are kept: they are the budget."""
        now = self.clock()
        at_rest = _core.at_rest
        drop = [t for t, st in self.states.items()
                if (lim := self._limits.get(t)) is not None and at_rest(lim, st, now)]
        for t in drop:
            del self.states[t]
            del self._limits[t]
            self._dirty.pop(t, None)
        if self._files is not None:
            self._removed.update(drop)
        self.states_dropped += len(drop)
        self._sweep_at = max(self.min_sweep_at, 2 * len(self.states))
        log.info("dropped %d tenant states at rest; %d kept", len(drop), len(self.states))

    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                     late: Optional[LateReply] = None) -> _core.Outcome:
        # decided before this returns control: never late
        return self.decide_now(tenant, limits, tier, input_tokens, output_tokens, firm_tokens,
                               commit_on_deny)

    def decide_now(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                   output_tokens: int, firm_tokens: int, commit_on_deny: bool) -> _core.Outcome:
        st = self.state_for(tenant, limits)
        out = _core.decide(limits, st, self.clock(), tier, input_tokens, output_tokens,
                           firm_tokens, commit_on_deny)
        self.decisions += 1
        if out.charged_cost:
            self._dirty[tenant] = st
            if limits.budget >= 0:
                self._hold(tenant, out.period_start_us, out.charged_cost)
        return out

    async def decide_path(self, tenant: str, path: HolderPath, tier: int, input_tokens: int,
                          output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                          late: Optional[LateReply] = None) -> _core.Outcome:
        """One decision over ``path``'s cells (docs/budgets.md), all charged or none. Each
        cell's state is kept under its id (a holder's first cell under its name: a flat
        tenant's state), so parents are shared by their children."""
        now = self.clock()
        refresh_windows(path, lambda: now)
        cells = [(c.limits, self.state_for(c.id, c.limits)) for c in path.cells]
        out = _core.decide_path(cells, now, tier, input_tokens, output_tokens,
                                firm_tokens, commit_on_deny)
        self.decisions += 1
        if out.charged_tokens or out.charged_cost or out.charges and any(
                c for c, _ in out.charges):
            for c, (_, st) in zip(path.cells, cells, strict=True):
                if c.limits.budget >= 0:
                    self._dirty[c.id] = st
        return out

    async def decide_routed(self, tenant: str, limits: _core.Limits, tier: int,
                            input_tokens: int, output_tokens: int, firm_tokens: int,
                            commit_on_deny: bool, priority: int, spill: int,
                            candidates: Sequence[Candidate],
                            late: Optional[LateReply] = None) -> _core.Outcome:
        st = self.state_for(tenant, limits)
        out = _core.decide_routed(
            limits, st, self.clock(), tier, input_tokens, output_tokens, firm_tokens,
            commit_on_deny, priority, spill,
            [(c.tier, c.quota, self.quota_state(c.provider)) for c in candidates])
        self.decisions += 1
        if out.charged_cost:
            self._dirty[tenant] = st
            if limits.budget >= 0:
                self._hold(tenant, out.period_start_us, out.charged_cost)
        return out

    def quota_state(self, provider: str) -> _core.QuotaState:
        """A provider's state (providers are few and named in the policy: never swept)."""
        qs = self.quota_states.get(provider)
        if qs is None:
            qs = self.quota_states[provider] = _core.QuotaState()
        return qs

    async def settle_provider(self, provider: str, quota: _core.Quota, marker: str,
                              delta_tokens: int, delta_requests: int = 0) -> bool:
        key = (provider, marker)
        if key in self.provider_settled:
            return False
        self.provider_settled[key] = None
        if len(self.provider_settled) > SETTLED_IDS_MAX:
            self.provider_settled.popitem(last=False)
        _core.quota_settle(quota, self.quota_state(provider), self.clock(), delta_tokens,
                           delta_requests)
        return True

    async def settle(self, tenant: str, limits: Union[_core.Limits, PathSettlement],
                     request_id: str, delta_tokens: int, delta_cost: int, period_start_us: int,
                     spend: Optional[SpendRecord] = None) -> Settlement:
        if isinstance(limits, PathSettlement):
            return await self._settle_path(tenant, limits, request_id, delta_tokens, spend)
        st = self.state_for(tenant, limits)
        key = (tenant, request_id)  # per tenant: one tenant's id never settles another's
        seen = self.settled.get(key)
        if seen is not None:
            if seen > self._durable_seq:
                await self._durable()  # "already applied" is said only of what is on disk
            return Settlement(applied=False, budget_spent=st.spent)
        now = self.clock()
        spent = _core.settle(limits, st, now, delta_tokens, delta_cost, period_start_us)
        cell: tuple = ()
        if spend is not None:
            day = day_of(now)
            cell = (day, spend.model, *self._add_spend(tenant, day, spend))
        # what the decision charged (the usage's cost to the budget less this correction)
        # is no longer held: as lua/settle.lua
        held: tuple = ()
        if limits.budget >= 0 and period_start_us >= 0:
            actual = 0 if spend is None else (
                spend.cost_nano_usd if limits.budget_in_usd
                else spend.input_tokens + spend.output_tokens)
            if actual != delta_cost:
                held = ({"h": [period_start_us,
                               self._hold(tenant, period_start_us, delta_cost - actual)]},)
        if self._files is None:
            self._remember(key, 0)
            return Settlement(applied=True, budget_spent=spent, at_us=now)
        self._dirty[tenant] = st
        # durable before it is acknowledged: a report acknowledged and then lost with the
        # process would be lost spend; one applied but not acknowledged is retried, and the
        # journal's copy of its id then makes the retry a no-op
        self._seq += 1
        self._remember(key, self._seq)
        # the state's own spend, never settle's reply: that is -1 for a tenant without a
        # budget ("no budget"), which is not a spend and no next start would accept
        self._journal_pending.append((self._seq, tenant, request_id, st.period_start, st.spent,
                                      *cell, *held))
        await self._durable()
        return Settlement(applied=True, budget_spent=spent, at_us=now)

    async def _settle_path(self, tenant: str, target: PathSettlement, request_id: str,
                           delta_tokens: int, spend: Optional[SpendRecord]) -> Settlement:
        """settle() on every cell of a recorded path, once per (tenant, id); each cell's
        spend after it is journaled (one record per cell, the tenant's own first, which
        carries the ledger's spend), so a restart brings every level back. Held spend is
        not kept for paths (docs/budgets.md)."""
        cells = [(c.limits, self.state_for(c.id, c.limits)) for c in target.path.cells]
        st0 = cells[0][1]
        key = (tenant, request_id)
        seen = self.settled.get(key)
        if seen is not None:
            if seen > self._durable_seq:
                await self._durable()
            return Settlement(applied=False, budget_spent=st0.spent
                              if cells[0][0].budget >= 0 else -1)
        now = self.clock()
        refresh_windows(target.path, lambda: now)
        spents = _core.settle_path(cells, now, delta_tokens, list(target.deltas))
        cell: tuple = ()
        if spend is not None:
            day = day_of(now)
            cell = (day, spend.model, *self._add_spend(tenant, day, spend))
        if self._files is None:
            self._remember(key, 0)
            return Settlement(applied=True, budget_spent=spents[0], at_us=now)
        self._seq += 1
        self._remember(key, self._seq)
        # the tenant's own cell first: its record carries the ledger's spend and, on replay,
        # the (tenant, id) that makes a repeated report a no-op
        self._dirty[tenant] = st0
        self._journal_pending.append((self._seq, tenant, request_id, st0.period_start,
                                      st0.spent, *cell))
        for c, (lim, st) in zip(target.path.cells[1:], cells[1:], strict=True):
            if lim.budget >= 0:
                # the same request id under the cell's id: replay restores the cell's spend
                self._dirty[c.id] = st
                self._journal_pending.append((self._seq, c.id, request_id, st.period_start,
                                              st.spent))
        await self._durable()
        return Settlement(applied=True, budget_spent=spents[0], at_us=now)

    async def was_settled(self, tenant: str, request_id: str) -> bool:
        return (tenant, request_id) in self.settled

    def _remember(self, key: tuple[str, str], seq: int) -> None:
        self.settled[key] = seq
        if len(self.settled) > SETTLED_IDS_MAX:
            self.settled.popitem(last=False)

    async def _durable(self) -> None:
        """Wait until every journal record made so far is on disk (raises BackendError if
        the write fails: the records are written again with the next group)."""
        written = asyncio.get_running_loop().create_future()
        self._journal_waiters.append(written)
        if not self._commit_running:
            self._start_commit()
        await written

    # --- the ledger's spend (sidecar/ledger/spend.py) -----------------------
    def _add_spend(self, tenant: str, day: int, spend: SpendRecord) -> list[int]:
        """Add to the tenant's cell for the day and model; the cell's counts after."""
        cell = self.spend.setdefault(tenant, {}).setdefault((day, spend.model), [0] * 6)
        self._spend_days.setdefault(day, set()).add(tenant)
        for k, v in enumerate(spend.counts()):
            cell[k] += v
        if self._files is not None:
            self._spend_dirty.add(tenant)
        return cell

    def _hold(self, tenant: str, period_start: int, amount: int) -> int:
        """Add ``amount`` to what ``tenant``'s budget period holds; the amount after."""
        by = self.held.setdefault(tenant, {})
        after = by.get(period_start, 0) + amount
        if after:
            by[period_start] = after
        else:
            by.pop(period_start, None)
            if not by:
                del self.held[tenant]
        if self._files is not None:
            self._spend_dirty.add(tenant)
        return after

    def _spend_entries(self, tenant: str) -> dict[str, list[int]]:
        """A tenant's spend as the snapshot holds it: "<day>|<model>": six counts, and
        "h|<period start>": [held]."""
        out = {f"{day}|{model}": list(c) for (day, model), c in self.spend.get(tenant, {}).items()}
        out.update({f"{HELD_FIELD}|{ps}": [a] for ps, a in self.held.get(tenant, {}).items()})
        return out

    async def record_spend(self, tenant: str, spend: SpendRecord, period_start_us: int = -1,
                           held: int = 0) -> None:
        """A kept estimate's spend: in the next snapshot (as the decision that charged it),
        its charge no longer held."""
        self._add_spend(tenant, day_of(self.clock()), spend)
        if held and period_start_us >= 0:
            self._hold(tenant, period_start_us, -held)

    async def read_state(self, tenant: str) -> Optional[_core.State]:
        copy = _core.State()
        st = self.states.get(tenant)
        if st is not None:
            copy.req_level, copy.req_last = st.req_level, st.req_last
            copy.tok_level, copy.tok_last = st.tok_level, st.tok_last
            copy.spent, copy.period_start = st.spent, st.period_start
        return copy

    async def read_cell_state(self, root: str, cell_id: str) -> Optional[_core.State]:
        # one process: a tree's cells are kept by their ids, as tenants are by their names
        return await self.read_state(cell_id)

    async def spend_cells(self, since_day: int = 0, until_day: int = LAST_DAY,
                          tenant: Optional[str] = None) -> list[SpendCell]:
        if tenant is not None:  # one holder's: not a walk over every tenant, on the loop
            return [SpendCell(tenant, day, model, tuple(c))
                    for (day, model), c in self.spend.get(tenant, {}).items()
                    if since_day <= day <= until_day] + [
                held_cell(tenant, ps, a) for ps, a in self.held.get(tenant, {}).items()]
        if since_day <= 0 and until_day >= LAST_DAY:
            tenants: Iterable[str] = self.spend
        else:  # the tenants of the range's days, through the day index
            tenants = set().union(*(names for day, names in self._spend_days.items()
                                    if since_day <= day <= until_day))
        return [SpendCell(t, day, model, tuple(c)) for t in tenants
                for (day, model), c in self.spend.get(t, {}).items()
                if since_day <= day <= until_day] + [
            held_cell(t, ps, a) for t, by in self.held.items() for ps, a in by.items()]

    def share_reservation(self, tenant: str, request_id: str, record: str) -> None:
        pass  # one process: its own reservation book is the only one

    async def take_reservation(self, tenant: str, request_id: str) -> Optional[str]:
        return None

    def forget_reservation(self, tenant: str, request_id: str) -> None:
        pass

    def status(self) -> BackendStatus:
        if self._last_error:
            return BackendStatus(False, self._last_error)
        return BackendStatus(True, "embedded")

    def stats(self) -> BackendStats:
        return BackendStats(round_trips=self.round_trips, decisions=self.decisions,
                            state_file=StateFileStats(dict(self.write_failures),
                                                      self.snapshot_seconds)
                            if self.state_file else None)

    # --- the journal: group commit off the event loop ---------------------------------
    def _start_commit(self) -> None:
        records, waiters = self._journal_pending, self._journal_waiters
        self._journal_pending, self._journal_waiters = [], []
        assert self._files is not None and self._journal is not None
        self._commit_running = True
        job = asyncio.get_running_loop().run_in_executor(self._journal, self._files.append,
                                                         records)
        job.add_done_callback(lambda done: self._committed(done, records, waiters))

    def _committed(self, done: asyncio.Future, records: list[tuple],
                   waiters: list[asyncio.Future]) -> None:
        self._commit_running = False
        exc = done.exception()
        if exc is None:
            if records:
                self._durable_seq = records[-1][0]
            if self.write_failures["journal"] and not self._snapshot_owed:
                self._last_error = ""
        else:
            self._write_failed("journal", exc)
            # written again, in order, ahead of what came meanwhile: the journal stays whole
            self._journal_pending[:0] = records
            asyncio.get_running_loop().call_later(1.0, self._retry_commit)
        for w in waiters:
            if not w.done():
                if exc is None:
                    w.set_result(None)
                else:
                    w.set_exception(BackendError(
                        f"usage not recorded durably: cannot write the journal of "
                        f"{self.state_file}: {exc}"))
        if exc is None and (self._journal_pending or self._journal_waiters):
            self._start_commit()  # what came in meanwhile: the next group

    def _retry_commit(self) -> None:
        if self._files is not None and self._journal_pending and not self._commit_running:
            self._start_commit()

    # --- the snapshot: off the event loop -----------------------------------------
    async def flush(self) -> None:
        """Write a snapshot now (if anything changed) and wait for it."""
        job = self._snapshot_job()
        if job is not None:
            await job

    def _snapshot_job(self) -> Optional[asyncio.Future]:
        files = self._files
        if files is None or self._snapshot_running or not (
                self._dirty or self._removed or self._snapshot_owed or self._spend_dirty):
            return None
        assert self._snapshots is not None
        # O(tenants changed since the last snapshot) here; the rest is the thread's
        changed = {t: TenantSpend(st.period_start, st.spent)
                   for t, st in self._dirty.items() if st.period_start >= 0}
        removed = [t for t in self._removed if t not in changed]
        spend_changed = {t: self._spend_entries(t) for t in self._spend_dirty}
        self._dirty, self._removed, self._spend_dirty = {}, set(), set()
        self._snapshot_owed = False
        if self._journal_pending and not self._commit_running:
            self._start_commit()  # records the snapshot includes go to disk first
        self._snapshot_running = True
        job = asyncio.get_running_loop().run_in_executor(
            self._snapshots, files.write_snapshot, changed, removed, self._seq, self.clock(),
            spend_changed)
        job.add_done_callback(self._snapshot_done)
        return job

    def _snapshot_done(self, done: asyncio.Future) -> None:
        self._snapshot_running = False
        exc = done.exception()
        if exc is None:
            self.snapshot_tenants, self.snapshot_seconds = done.result()
            if self._last_error and not self._journal_pending:
                log.info("state file %s written again", self.state_file)
                self._last_error = ""
            return
        # the changes are already in the thread's mirror: the next snapshot writes them
        self._snapshot_owed = True
        self._write_failed("snapshot", exc)

    def _write_failed(self, what: str, exc: BaseException) -> None:
        self.write_failures[what] += 1
        first = not self._last_error
        self._last_error = f"cannot write state file {self.state_file} ({what}): {exc}"
        if first or self.write_failures[what] % 60 == 0:  # one line a minute, not a second
            log.error("%s (%d failed %s writes so far; /readyz fails until one succeeds)",
                      self._last_error, self.write_failures[what], what)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self._snapshot_job()

    # --- loading ---------------------------------------------------------------
    def _load(self, files: StateFiles) -> list[list]:
        """The snapshot, then the journal records it does not include; the journal's
        segments, oldest first."""
        try:
            with open(self.state_file, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            doc = None
        except (OSError, ValueError) as exc:
            # Refuse to start rather than silently reset every tenant's spend.
            raise refuse(f"state file {self.state_file}", f"unreadable ({exc})") from None
        snapshot_seq = 0
        if doc is not None:
            where = f"state file {self.state_file}"
            if not isinstance(doc, dict) or doc.get("version") not in (1, 2) \
                    or not isinstance(doc.get("tenants"), dict):
                version = doc.get("version") if isinstance(doc, dict) else None
                raise refuse(where, "malformed: expected a version 1 or 2 document with a "
                                     f"tenants object (version {json.dumps(version)[:20]})")
            snapshot_seq = doc.get("journal_seq", 0)
            if not valid_int(snapshot_seq, 0):
                raise refuse(where, f"journal_seq must be an integer in 0..{MAX_STATE_VALUE}"
                                     f", not {json.dumps(snapshot_seq)[:40]}")
            for tenant, rec in doc["tenants"].items():
                if not isinstance(rec, dict) or set(rec) != {"period_start", "spent"}:
                    raise refuse(where, f'tenant {tenant!r}: expected {{"period_start": ..., '
                                         f'"spent": ...}}, not {json.dumps(rec)[:80]}')
                check_spend(where, tenant, rec["period_start"], rec["spent"])
                st = self.state_for(tenant)
                st.period_start, st.spent = rec["period_start"], rec["spent"]
            spend = doc.get("spend", {})  # the ledger's (absent before it)
            if not isinstance(spend, dict):
                raise refuse(where, "spend must be an object")
            for tenant, cells in spend.items():
                if not isinstance(cells, dict):
                    raise refuse(where, f"spend of {tenant!r} must be an object")
                for key, counts in cells.items():
                    day, _, model = key.partition("|")
                    if day == HELD_FIELD:
                        self._load_held(where, tenant, model, counts)
                    else:
                        self._load_cell(where, tenant, day, model, counts)
        self._seq = snapshot_seq
        try:
            segments = files.segment_paths()
        except OSError as exc:
            raise BackendError(f"state file {self.state_file}: cannot list its journal "
                               f"({exc})") from None
        return [[first, path, self._replay(path, snapshot_seq)] for first, path in segments]

    def _load_cell(self, where: str, tenant: str, day: Any, model: Any, counts: Any) -> None:
        """One spend cell from the snapshot or the journal (its counts, absolute)."""
        try:
            day = int(day)
        except (TypeError, ValueError):
            raise refuse(where, f"spend of {tenant!r}: day {str(day)[:20]!r} is not a "
                                 "number") from None
        if not isinstance(model, str) or not isinstance(counts, list) or len(counts) != 6 \
                or not all(valid_int(c, 0) for c in counts):
            raise refuse(where, f"spend of {tenant!r}: expected a model and six counts in "
                                 f"0..{MAX_STATE_VALUE}, not {json.dumps(counts)[:80]}")
        self.spend.setdefault(tenant, {})[(day, model)] = list(counts)
        self._spend_days.setdefault(day, set()).add(tenant)

    def _load_held(self, where: str, tenant: str, period_start: Any, counts: Any) -> None:
        """What a budget period holds, from the snapshot or the journal (absolute)."""
        try:
            ps = int(period_start)
        except (TypeError, ValueError):
            raise refuse(where, f"held of {tenant!r}: period start {str(period_start)[:20]!r} "
                                 "is not a number") from None
        if not (isinstance(counts, list) and len(counts) == 1 and type(counts[0]) is int
                and abs(counts[0]) <= MAX_STATE_VALUE):
            raise refuse(where, f"held of {tenant!r}: expected [an integer], not "
                                 f"{json.dumps(counts)[:80]}")
        by = self.held.setdefault(tenant, {})
        if counts[0]:
            by[ps] = counts[0]
        else:
            by.pop(ps, None)
        if not by:
            del self.held[tenant]

    def _replay(self, path: str, snapshot_seq: int) -> int:
        """Apply one journal segment; the number of its records."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise refuse(f"journal {path}", f"unreadable ({exc})") from None
        lines = data.split(b"\n")
        if lines[-1]:
            # a record cut short by a crash or a failed write: its fsync never completed,
            # so it was never acknowledged (a segment is never appended to after a failed
            # write, so only a segment's last line can be one)
            log.warning("journal %s: ignoring a partial last record (%d bytes; never "
                        "acknowledged)", path, len(lines[-1]))
        for n, line in enumerate(lines[:-1], 1):
            where = f"journal {path} line {n}"
            try:
                rec = json.loads(line)
                # the ledger's cell (day, model, six counts after) follows when it was recorded
                seq, tenant, request_id, period_start, spent, *cell = rec
            except (ValueError, TypeError) as exc:
                raise refuse(where, f"malformed ({exc})") from None
            if not valid_int(seq, 1) or not isinstance(request_id, str):
                raise refuse(where, f"malformed record {line[:80]!r}")
            check_spend(where, tenant, period_start, spent, no_budget_ok=True)
            self._remember((tenant, request_id), 0)
            if seq > snapshot_seq and period_start >= 0:
                st = self.state_for(tenant)
                st.period_start, st.spent = period_start, spent
            held = cell.pop() if cell and isinstance(cell[-1], dict) else None
            if seq > snapshot_seq and held is not None:
                h = held.get("h")
                if not (isinstance(h, list) and len(h) == 2):
                    raise refuse(where, f"malformed held in record {line[:80]!r}")
                self._load_held(where, tenant, h[0], h[1:])
            if seq > snapshot_seq and cell:
                if len(cell) != 8:
                    raise refuse(where, f"malformed spend in record {line[:80]!r}")
                self._load_cell(where, tenant, cell[0], cell[1], cell[2:])
            self._seq = max(self._seq, seq)
        return len(lines) - 1
