"""Embedded backend: state in this process, decided by the Cython core.

Budget spend is written to a JSON file (write to a temp file, fsync, rename:
atomic) every ``flush_interval_s`` and at shutdown, so a restart never hands a
tenant its spent budget back. Rate buckets are not persisted: a restart grants
at most one burst. A SIGKILL loses at most one interval of spend (docs/backends.md).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from typing import Callable, Optional

from sidecar import _core
from sidecar.backends.base import BackendError, BackendStatus, LateReply, Settlement

log = logging.getLogger("kt.memory")
STATE_VERSION = 1
# request ids remembered for idempotent settlement; older ones fall out first
SETTLED_IDS_MAX = 200_000
# tenant states kept before a sweep drops those at rest (see _sweep); a sweep then waits
# until the count doubles, so its cost per decision stays constant
TENANT_STATES_SWEEP_AT = 100_000


def wall_clock_us() -> int:
    return time.time_ns() // 1000


class MemoryBackend:
    name = "memory"
    shares_reservations = False  # one process: its reservation book is the only one

    def __init__(self, state_file: str = "", flush_interval_s: float = 1.0,
                 clock: Callable[[], int] = wall_clock_us,
                 sweep_at: int = TENANT_STATES_SWEEP_AT) -> None:
        self.state_file = state_file
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.states: dict[str, _core.State] = {}
        self._limits: dict[str, _core.Limits] = {}  # the limits each state was last used with
        self.min_sweep_at = self._sweep_at = sweep_at
        self.states_dropped = 0
        self.settled: OrderedDict[str, None] = OrderedDict()
        self._dirty = False
        self._flusher: Optional[asyncio.Task] = None
        self._last_error = ""
        self.decisions = 0
        self.round_trips = 0  # no backend round trips: state is local

    async def start(self) -> None:
        if self.state_file:
            self._load()
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
            self._flusher = None
        self.flush()

    def state_for(self, tenant: str, limits: Optional[_core.Limits] = None) -> _core.State:
        st = self.states.get(tenant)
        if st is None:
            if len(self.states) >= self._sweep_at:
                self._sweep()
            st = self.states[tenant] = _core.State()
        if limits is not None:
            self._limits[tenant] = limits
        return st

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
        out = _core.decide(limits, self.state_for(tenant, limits), self.clock(), tier, input_tokens,
                           output_tokens, firm_tokens, commit_on_deny)
        self.decisions += 1
        if out.charged_cost:
            self._dirty = True
        return out

    async def settle(self, tenant: str, limits: _core.Limits, request_id: str, delta_tokens: int,
                     delta_cost: int, period_start_us: int) -> Settlement:
        st = self.state_for(tenant, limits)
        if request_id in self.settled:
            return Settlement(applied=False, budget_spent=st.spent)
        self.settled[request_id] = None
        if len(self.settled) > SETTLED_IDS_MAX:
            self.settled.popitem(last=False)
        spent = _core.settle(limits, st, self.clock(), delta_tokens, delta_cost, period_start_us)
        self._dirty = True
        return Settlement(applied=True, budget_spent=spent)

    def share_reservation(self, tenant: str, request_id: str, record: str) -> None:
        pass  # one process: its own reservation book is the only one

    async def take_reservation(self, tenant: str, request_id: str) -> Optional[str]:
        return None

    def status(self) -> BackendStatus:
        if self._last_error:
            return BackendStatus(False, self._last_error)
        return BackendStatus(True, "embedded")

    # --- persistence -------------------------------------------------------
    def _load(self) -> None:
        try:
            with open(self.state_file, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            # Refuse to start rather than silently reset every tenant's spend.
            raise BackendError(f"state file {self.state_file}: unreadable ({exc}); "
                               "fix or move it aside to start with zero spend") from None
        try:
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"unknown version {doc.get('version')!r}")
            for tenant, rec in doc["tenants"].items():
                st = self.state_for(tenant)
                st.period_start = int(rec["period_start"])
                st.spent = int(rec["spent"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackendError(f"state file {self.state_file}: malformed ({exc}); "
                               "fix or move it aside to start with zero spend") from None

    def flush(self) -> None:
        if not self.state_file or not self._dirty:
            return
        doc = {"version": STATE_VERSION, "written_at_us": self.clock(), "tenants": {
            t: {"period_start": st.period_start, "spent": st.spent}
            for t, st in self.states.items() if st.period_start >= 0}}
        self._dirty = False
        directory = os.path.dirname(os.path.abspath(self.state_file))
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".spend-", dir=directory)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.state_file)
            except BaseException:
                os.unlink(tmp)
                raise
            self._last_error = ""
        except OSError as exc:
            self._dirty = True  # try again next interval; nothing is dropped from memory
            self._last_error = f"cannot write state file {self.state_file}: {exc}"
            log.error(self._last_error)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            self.flush()
