"""Capacity leases for hot tenants: decide in process, within capacity taken from Redis.

A tenant this process decides for often (``HOT_RATE`` decisions/s or more) takes a
*lease* (lua/lease.lua): requests, tokens and budget taken out of the tenant's shared pool
at once, atomically, exactly as if they had been charged. Decisions are then made here by
the Cython core (``_core.decide``, the one implementation of the rules) against what the
lease holds, with no Redis round trip, until it runs out, is idle, or is ``MAX_AGE_S`` old;
then what is left goes back to the pool (a refund, with settle.lua's rules) in the same
script call that takes the next lease. Settlements go on as for any decision (batcher.py,
batched per loop tick). So:

- **No over-admission.** Every request admitted here was deducted from the pool when the
  lease was taken; the fleet never admits more than the pool allowed. A lease never takes
  budget below the low-water mark, so a request admitted within it is one decide.lua would
  have admitted at the tier it asked for (the local decision runs with low_water 0).
- **Bounded under-admission.** Capacity a lease holds and does not use is unavailable to
  the other replicas until it is returned: a lease is at most ``SHARE`` of the tenant's
  per-minute limits (1%), returned when idle for ``IDLE_S`` or ``MAX_AGE_S`` old, so two
  replicas hold at most 2% of a minute's capacity at any time.
- **Exact where it matters.** A tenant whose limits cannot fill a lease of
  ``MIN_REQUESTS`` requests within ``SHARE`` (rpm 3, or a budget near its end or near low
  water) never leases: every decision is per request, exact, as before.
- **A lease returns by itself.** Each lease is recorded in the tenant's slot (lua/lease.lua,
  common.lua "Capacity leases") with what it took and its end on Redis's clock, GRACE_S
  after the holder's own end. What the holder used is reported back: before any settlement
  of the tenant goes to Redis (so a settled request's estimate is always counted), at most
  REPORT_S after a decision in it, and when it is returned. A lease not returned by its end
  is closed by the first script call on the tenant after it (decide, settle or lease, from
  any replica): what was not reported used goes back to the pool, once; a return or report
  that arrives after that charges what it adds. So a replica killed holding a lease costs
  the others that lease's capacity until its end (about 3 s), and its budget share comes
  back; what it admitted in its last REPORT_S and never settled (requests in flight at the
  kill, whose usage died with it) goes back too: a one-time over-admission of at most that.
- **Failures.** With Redis unreachable a replica goes on deciding within the leases it
  holds, never beyond (the next lease fails, and per-request decisions fall into the
  failure mode). A return that fails is sent again (a return applies once) for
  RETURN_RETRY_S; after that Redis closes the lease with what was last reported used.

Clock: a lease is taken on Redis's clock (its reply carries the time of the node that
holds the tenant's keys), and its local decisions run on that clock (the budget period and
the lease's end are that node's); a lease ends before its budget period does. Each lease
keeps its own offset to this host's clock: the nodes of a cluster need not agree.

Redis Cluster: a tenant's keys share the hash tag ``{tenant}``, so each lease.lua call runs
on one slot, routed by redis-py like every cluster call. redis-py resends a command after a
connection error or a socket timeout, when the first may have been applied; each call
carries a call id (its marker key, in the tenant's slot), and lease.lua applies a call once
and answers a resend with the first reply, so a remainder is never returned twice. A backend whose scripts are given a test clock
(``clock_override``) takes no leases unless a LeaseManager with that same clock is given to
it (tests/backends/test_leases.py).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import hiredis

from sidecar import _core
from sidecar.backends.base import BackendError
from sidecar.backends.redis.keys import Keys
from sidecar.backends.redis.link import RedisLink
from sidecar.backends.redis.scripts import Scripts

log = logging.getLogger("kt.lease")

HOT_RATE = 5.0  # decisions/s of one tenant in this process before it takes leases
LEASE_S = 1.0  # a lease covers this long of the tenant's recent traffic here
SHARE = 0.01  # at most this share of the tenant's per-minute rpm / tpm in one lease
MIN_REQUESTS = 8  # a lease covers at least this many requests, or there is none
HEADROOM = 1.25  # tokens and cost leased per request: the average seen, times this
IDLE_S = 0.5  # a lease not used for this long is returned
MAX_AGE_S = 2.0  # a lease is returned (and a fresh one taken) at the latest this old
SWEEP_S = 0.25  # how often idle and old leases are looked for
RATE_WINDOW_US = 250_000  # the rate is counted over windows this long (decision clock)
REFUSED_QUIET_US = 1_000_000  # after a refused lease, this long per request before another
CALL_MARKER_TTL_MS = 60_000  # a lease call's marker (a resend within it is not applied again)
# Redis may close a lease (giving back what its holder did not report used) this long after
# the holder stops deciding in it: the holder's return, sent by its sweeper within SWEEP_S
# of its end, normally arrives first; a late one is reconciled by lease.lua either way
GRACE_S = 1.0
# what a lease has used is reported to Redis at most this long after a decision in it (and
# before any settlement of its tenant): what Redis would count as unused if this process
# died holding it (lua/lease.lua)
REPORT_S = 0.25
RETURN_RETRY_S = 60.0  # a return that failed is sent again (each sweep) for this long
ENDED_SWEEP_S = 1.0  # how often this process closes leases whose holders are gone
ENDED_BATCH = 100  # leases closed per round at most


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # a failure is counted where it happened; the next call covers it


class _Lease:
    """What one lease holds: the core State the local decisions run on."""

    __slots__ = ("id", "limits", "local", "state", "ends_us", "taken_us",
                 "last_used_us", "pool_req", "pool_tok", "pool_budget", "decisions",
                 "offset_us", "granted", "reported", "reporting")

    def __init__(self, limits: _core.Limits, reply: list, now_us: int,
                 offset_us: int = 0, lease_id: str = "") -> None:
        """``now_us``: the node's clock now; ``offset_us``: that clock less this host's;
        ``lease_id``: its record in Redis (lua/lease.lua)."""
        g_req, g_tok, g_cost, pstart, pend, _server_now, req_after, tok_after, budget_after = reply
        self.id = lease_id
        self.limits = limits
        self.granted = (g_req, g_tok, g_cost)
        self.reported = (0, 0, 0)  # what Redis was last told this lease has used
        self.reporting: Optional[asyncio.Future] = None  # a report in flight
        # the same limits, but no low-water downgrade: the lease holds budget above the mark
        self.local = _core.Limits(rpm=limits.rpm, tpm=limits.tpm, burst=limits.burst,
                                  budget=limits.budget, budget_in_usd=limits.budget_in_usd,
                                  period=limits.period, low_water=0.0, prices=limits.prices)
        st = _core.State()
        if limits.rpm > 0:
            st.req_level = float(g_req)
        if limits.tpm > 0:
            st.tok_level = float(g_tok)
        if limits.budget >= 0:
            st.spent = limits.budget - g_cost  # remaining = what the lease holds
            st.period_start = pstart
        self.state = st
        self.taken_us = self.last_used_us = now_us
        # a lease never outlives its budget period: past it, the period's spend is another
        self.ends_us = min(now_us + int(MAX_AGE_S * 1e6), pend - 1000)
        # what the pool had left after the lease (for the headers' remaining counts)
        self.pool_req, self.pool_tok, self.pool_budget = req_after, tok_after, budget_after
        self.decisions = 0
        self.offset_us = offset_us

    def left(self) -> tuple[int, int, int]:
        """Requests, tokens and cost not used (to return)."""
        st, lim = self.state, self.limits
        req = max(0, int(math.floor(st.req_level))) if lim.rpm > 0 else 0
        tok = max(0, int(math.floor(st.tok_level))) if lim.tpm > 0 else 0
        cost = max(0, lim.budget - st.spent) if lim.budget >= 0 else 0
        return req, tok, cost

    def mark_reported(self, used: tuple[int, int, int]) -> None:
        """Redis was told ``used`` (reports may complete out of order: totals only grow)."""
        r = self.reported
        self.reported = (max(r[0], used[0]), max(r[1], used[1]), max(r[2], used[2]))

    def used(self) -> tuple[int, int, int]:
        """Requests, tokens and cost used so far (what was taken less what is left)."""
        left = self.left()
        return (self.granted[0] - left[0], self.granted[1] - left[1],
                self.granted[2] - left[2])


class _Seen:
    """A tenant's recent decisions here: rate, and tokens and cost per decision."""

    __slots__ = ("window_start", "count", "rate", "tokens", "cost", "renewing", "quiet_until")

    def __init__(self, now: int) -> None:
        self.window_start = now
        self.quiet_until = 0
        self.count = 0
        self.rate = 0.0
        self.tokens = 0.0
        self.cost = 0.0
        self.renewing: Optional[asyncio.Future] = None


class LeaseManager:
    def __init__(self, link: RedisLink, keys: Keys, scripts: Scripts,
                 clock: Optional[Callable[[], int]] = None) -> None:
        """``clock`` (tests): the µs clock the backend's scripts are given (its
        ``clock_override``), for the leases' own decisions, ends and rates."""
        self.link = link
        self.keys = keys
        self.clock = clock
        self.script, self.sweep_script = scripts.lease, scripts.lease_sweep
        # "<tenant> <lease id>" by end (µs, Redis's clock): leases not known returned, so any
        # replica can close one whose holder died (lua/lease_sweep.lua). One key, not in a
        # tenant's slot: a hint written after the lease, not part of its atomic record
        self.index_key = keys.lease_ends
        self._ended_sweeper: Optional[asyncio.Task] = None
        self._report_due: Optional[asyncio.TimerHandle] = None  # the next round of reports
        self.leases: dict[str, _Lease] = {}
        self._seen: dict[str, _Seen] = {}
        self._sweeper: Optional[asyncio.Task] = None
        self._call_prefix = os.urandom(6).hex()  # call ids: unique across replicas
        self._calls = 0
        # leases whose return failed (it may or may not have been applied): sent again, as
        # a return applies once (lease id, its tenant, the lease, when it first failed)
        self._unreturned: dict[str, tuple[str, _Lease, float]] = {}
        self.stats = {"taken": 0, "refused": 0, "returned": 0, "reported": 0, "failed": 0,
                      "local_decisions": 0, "renewals_waited": 0}

    # --- clock ---------------------------------------------------------------
    def now_us(self, lease: _Lease) -> int:
        """The clock of the node that holds the lease's tenant, as estimated from the
        lease's reply (the budget period and the lease's end are that node's)."""
        if self.clock is not None:
            return self.clock()
        return time.time_ns() // 1000 + lease.offset_us

    def _now_arg(self) -> int:
        """The scripts' clock argument: 0 (Redis's TIME) or the test's clock."""
        return self.clock() if self.clock is not None else 0

    def _rate_now_us(self) -> int:
        return self.clock() if self.clock is not None else time.monotonic_ns() // 1000

    # --- the decision --------------------------------------------------------
    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int,
                     commit_on_deny: bool) -> Optional[_core.Outcome]:
        """The outcome decided within a lease, or None: decide this one per request."""
        if commit_on_deny:  # shadow mode: every decision per request
            return None
        if self._ended_sweeper is None:
            self._ended_sweeper = asyncio.get_running_loop().create_task(self._ended_loop())
        now = self._rate_now_us()
        seen = self._seen.get(tenant)
        if seen is None:
            if len(self._seen) > 100_000:
                self._forget_quiet(now)
            seen = self._seen[tenant] = _Seen(now)
        seen.count += 1
        if now - seen.window_start >= RATE_WINDOW_US:
            seen.rate = seen.count * 1e6 / (now - seen.window_start)
            seen.window_start, seen.count = now, 0
        if now < seen.quiet_until:  # its last lease was refused: per request for a while
            return None
        lease = self.leases.get(tenant)
        if lease is None and seen.rate < HOT_RATE and seen.renewing is None:
            return None
        if lease is not None and lease.limits is limits:
            out = self._local(tenant, lease, tier, input_tokens, output_tokens, firm_tokens)
            if out is not None:
                self._observe(seen, out)
                return out
        if seen.renewing is not None:
            # another decision is taking this tenant's next lease: wait for it, try it once
            self.stats["renewals_waited"] += 1
            try:
                await asyncio.shield(seen.renewing)
            except BackendError:
                return None
        else:
            want = self._sizing(seen, limits, tier, input_tokens, output_tokens)
            if want is None and lease is None:
                seen.quiet_until = now + REFUSED_QUIET_US
                return None
            await self._renew(tenant, limits, seen, want)
        lease = self.leases.get(tenant)
        if lease is not None and lease.limits is limits:
            out = self._local(tenant, lease, tier, input_tokens, output_tokens, firm_tokens)
            if out is not None:
                self._observe(seen, out)
                return out
        return None

    def _local(self, tenant: str, lease: _Lease, tier: int, input_tokens: int, output_tokens: int,
               firm_tokens: int) -> Optional[_core.Outcome]:
        now = self.now_us(lease)
        if now >= lease.ends_us:
            return None
        st = lease.state
        # no refill inside a lease: refill happens in the pool, for every replica
        st.req_last = st.tok_last = now
        out = _core.decide(lease.local, st, now, tier, input_tokens, output_tokens, firm_tokens,
                           False)
        if out.kind == 0 or out.kind == 4:  # admitted, or can never be admitted: final
            lease.last_used_us = now
            lease.decisions += 1
            self.stats["local_decisions"] += 1
            if out.kind == 0 and self._report_due is None:
                self._report_due = asyncio.get_running_loop().call_later(
                    REPORT_S, self._report_used)
            return self._with_pool(lease, out)
        return None  # what is left does not cover it: a new lease, or per request

    @staticmethod
    def _with_pool(lease: _Lease, o: _core.Outcome) -> _core.Outcome:
        """The headers' remaining counts: what the lease holds plus what the pool had left."""
        lim = lease.limits

        def clamp(v: int, limit: int) -> int:
            return max(0, min(limit, v))

        return _core.Outcome(
            o.kind, o.reason, o.tier, o.retry_after_s,
            o.limit_requests, clamp(o.remaining_requests + max(lease.pool_req, 0), lim.rpm),
            o.reset_requests_us,
            o.limit_tokens, clamp(o.remaining_tokens + max(lease.pool_tok, 0), lim.tpm),
            o.reset_tokens_us,
            o.budget_limit,
            clamp(o.budget_remaining + max(lease.pool_budget, 0), lim.budget)
            if lim.budget >= 0 else 0,
            o.budget_reset_us, o.charged_tokens, o.charged_cost, o.period_start_us)

    @staticmethod
    def _observe(seen: _Seen, out: _core.Outcome) -> None:
        if out.charged_tokens or out.charged_cost:
            seen.tokens += (out.charged_tokens - seen.tokens) * 0.1
            seen.cost += (out.charged_cost - seen.cost) * 0.1

    def _sizing(self, seen: _Seen, limits: _core.Limits, tier: int, input_tokens: int,
                output_tokens: int) -> Optional[tuple[int, int, int, int, int, int]]:
        """(wanted requests, tokens, cost, at least requests, tokens, cost), or None when
        this tenant's limits cannot fill a useful lease (decide per request)."""
        tokens = input_tokens + output_tokens
        per_tok = max(seen.tokens, float(tokens), 1.0)
        pin, pout = limits.prices[min(tier, len(limits.prices) - 1)]
        cost_now = input_tokens * pin + output_tokens * pout if limits.budget_in_usd else tokens
        per_cost = max(seen.cost, float(cost_now), 1.0)
        n = max(MIN_REQUESTS, int(max(seen.rate, HOT_RATE) * LEASE_S))
        if limits.rpm > 0:
            n = min(n, int(limits.rpm * SHARE))
        if limits.tpm > 0:
            n = min(n, int(limits.tpm * SHARE / (per_tok * HEADROOM)))
        if n < MIN_REQUESTS:
            return None
        want_tok = math.ceil(n * per_tok * HEADROOM) if limits.tpm > 0 else 0
        want_cost = math.ceil(n * per_cost * HEADROOM) if limits.budget >= 0 else 0
        return (n if limits.rpm > 0 else 0, want_tok, want_cost,
                MIN_REQUESTS if limits.rpm > 0 else 0,
                math.ceil(MIN_REQUESTS * per_tok) if limits.tpm > 0 else 0,
                math.ceil(MIN_REQUESTS * per_cost) if limits.budget >= 0 else 0)

    # --- Redis ---------------------------------------------------------------
    async def _renew(self, tenant: str, limits: _core.Limits, seen: _Seen,
                     want: Optional[tuple]) -> None:
        """Return the tenant's lease (what is left of it) and take a new one (if ``want``),
        in one script call; other decisions of the tenant wait for it meanwhile."""
        old = self.leases.pop(tenant, None)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        seen.renewing = fut
        try:
            # the returned lease goes back under the limits recorded with it (lease.lua),
            # so a policy changed under it needs no call of its own
            lease = await self._call(tenant, limits, old, True, want) if (
                want is not None or old is not None) else None
        except BaseException as exc:  # a BackendError, or the deciding task cancelled
            if old is not None:
                # not known to have gone back: returned again later (a return applies once)
                self._unreturned[old.id] = (tenant, old, time.monotonic())
                self._start_sweeper()
            # the waiters (other decisions, settlements' reports) must not wait forever
            fut.set_exception(exc if isinstance(exc, BackendError)
                              else BackendError("lease call not finished"))
            fut.exception()  # retrieved here; the waiters see it through shield()
            if isinstance(exc, BackendError):
                return
            raise
        finally:
            seen.renewing = None
        fut.set_result(None)
        if lease is not None:
            self.leases[tenant] = lease
            self._start_sweeper()
        elif want is not None:
            seen.quiet_until = self._rate_now_us() + REFUSED_QUIET_US

    async def _call(self, tenant: str, lim: _core.Limits, held: Optional[_Lease], close: bool,
                    want: Optional[tuple]) -> Optional[_Lease]:
        """One lease.lua call: what ``held`` used so far reported (and, if ``close``, the
        rest of it returned), then ``want`` taken under ``lim``."""
        used = held.used() if held is not None else (0, 0, 0)
        call_id, keys, args = self._request(tenant, lim, held, used, close, want)
        sent_wall = time.time_ns() // 1000
        try:
            reply = await self.link.call(self.script, keys, args)
        except BackendError:
            self.stats["failed"] += 1
            if held is not None and close:
                log.warning("lease of tenant %s: its remainder could not be returned yet",
                            tenant)
            raise
        if isinstance(reply, hiredis.ReplyError) or not (
                isinstance(reply, list) and len(reply) == 9
                and all(isinstance(x, int) for x in reply)):
            self.stats["failed"] += 1
            raise self.link.failed(f"lease.lua: unexpected reply {str(reply)[:120]}")
        if held is not None:
            held.mark_reported(used)
            self.stats["returned" if close else "reported"] += 1
            if close:
                self._later("ZREM", self.index_key, f"{tenant} {held.id}")
        if self.clock is None:
            got_wall = time.time_ns() // 1000
            offset = reply[5] - (sent_wall + got_wall) // 2
        else:
            offset = 0
        if want is None:
            return None
        if reply[0] == reply[1] == reply[2] == 0:
            self.stats["refused"] += 1
            return None
        self.stats["taken"] += 1
        self._later("ZADD", self.index_key, reply[5] + int((MAX_AGE_S + GRACE_S) * 1e6),
                    f"{tenant} {call_id}")
        return _Lease(lim, reply, self.clock() if self.clock is not None
                      else time.time_ns() // 1000 + offset, offset, call_id)

    def _request(self, tenant: str, lim: _core.Limits, held: Optional[_Lease],
                 used: tuple[int, int, int], close: bool,
                 want: Optional[tuple]) -> tuple[str, list[str], list[Any]]:
        """A lease.lua call's id (the new lease's id too), KEYS and ARGV."""
        w = want if want is not None else (0, 0, 0, 0, 0, 0)
        self._calls += 1
        call_id = f"{self._call_prefix}.{self._calls}"
        args = [self._now_arg(), lim.rpm, lim.tpm, repr(lim.burst), lim.budget,
                lim.period, repr(lim.low_water), held.id if held is not None else "", *used,
                1 if close else 0, *w, call_id, int((MAX_AGE_S + GRACE_S) * 1e6),
                CALL_MARKER_TTL_MS]
        # the call's marker and the lease records: in the tenant's slot (its hash tag), so
        # one node runs the call
        keys = [*self.keys.tenant(tenant), self.keys.lease_call(tenant, call_id),
                self.keys.leases(tenant)]
        return call_id, keys, args

    async def report(self, tenant: str) -> None:
        """Tell Redis what the tenant's lease here has used, before a settlement of the
        tenant goes there. A lease whose holder dies is closed by Redis after its end with
        what was last reported counted as used: a request admitted in it whose settlement
        Redis has applied (its actual cost less its estimate) must have its estimate counted
        too, or the budget would miss that estimate. Best effort: a report that fails is
        counted, and the next one (or the return) carries everything."""
        seen = self._seen.get(tenant)
        if seen is not None and seen.renewing is not None:
            try:  # a return in flight carries everything used so far
                await asyncio.shield(seen.renewing)
            except BackendError:
                pass
        lease = self.leases.get(tenant)
        if lease is None:
            return
        need = lease.used()
        for _ in range(2):  # one report in flight may have been sent before ``need``
            if all(r >= n for r, n in zip(lease.reported, need, strict=True)):
                return
            if lease.reporting is None:
                lease.reporting = asyncio.ensure_future(self._report(tenant, lease))
                lease.reporting.add_done_callback(_retrieved)
            try:
                await asyncio.shield(lease.reporting)
            except Exception:  # noqa: BLE001 - counted where it failed; the next one covers it
                return

    def _report_used(self) -> None:
        """Every REPORT_S while leases are used: what each used since its last report, all
        sent in the same loop tick (one node: one write on the pipelined link)."""
        self._report_due = None
        for tenant, lease in self.leases.items():
            if lease.reporting is None and lease.used() != lease.reported:
                lease.reporting = asyncio.ensure_future(self._report(tenant, lease))
                lease.reporting.add_done_callback(_retrieved)

    async def _report(self, tenant: str, lease: _Lease) -> None:
        try:
            await self._call(tenant, lease.limits, lease, False, None)
        finally:
            lease.reporting = None

    def settled(self, tenant: str, budget_spent: int) -> None:
        """A settlement of the tenant's usage reached Redis: the budget it left, which the
        lease's answers add what they hold to (the lease's own charge is part of it)."""
        lease = self.leases.get(tenant)
        if lease is not None and budget_spent >= 0 and lease.limits.budget >= 0:
            lease.pool_budget = lease.limits.budget - budget_spent

    # --- returning idle and old leases ----------------------------------------------
    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while self.leases or self._unreturned:
            await asyncio.sleep(SWEEP_S)
            await self.sweep()

    async def sweep(self, everything: bool = False) -> None:
        """Return the leases that are idle, old or (``everything``) all of them, and those
        whose return failed."""
        due = [t for t, lease in self.leases.items()
               if everything or self.now_us(lease) >= lease.ends_us
               or self.now_us(lease) - lease.last_used_us >= IDLE_S * 1e6]
        for tenant in due:
            seen = self._seen.get(tenant)
            if seen is None:
                seen = self._seen[tenant] = _Seen(self._rate_now_us())
            if tenant in self.leases and seen.renewing is None:
                await self._renew(tenant, self.leases[tenant].limits, seen, None)
        for lease_id, (tenant, lease, failed_at) in list(self._unreturned.items()):
            if time.monotonic() - failed_at > RETURN_RETRY_S:
                del self._unreturned[lease_id]
                log.warning("lease of tenant %s: not returned within %d s; Redis closes it with "
                            "what was last reported used", tenant, RETURN_RETRY_S)
                continue
            try:
                await self._call(tenant, lease.limits, lease, True, None)
            except BackendError:
                continue
            self._unreturned.pop(lease_id, None)

    # --- leases whose holder is gone -------------------------------------------
    def _later(self, *command: Any) -> None:
        """The lease index kept in the background: a lost write only delays a close (the
        lease's record is the truth, and any call on its tenant closes it)."""
        if not self.link.started:
            return
        asyncio.ensure_future(self.link.plain(*command)).add_done_callback(_retrieved)

    async def _ended_loop(self) -> None:
        while True:
            await asyncio.sleep(ENDED_SWEEP_S)
            try:
                await self.close_ended()
            except BackendError:
                pass  # counted by the backend; the next round tries again

    async def close_ended(self) -> int:
        """Close the leases the index says have ended (what their holders did not report
        used goes back); the number closed."""
        now = self.clock() if self.clock is not None else time.time_ns() // 1000
        ended = await self.link.plain("ZRANGEBYSCORE", self.index_key, "-inf", now,
                                  "LIMIT", 0, ENDED_BATCH)
        closed = 0
        for raw in ended or ():
            member = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            tenant, _, lease_id = member.rpartition(" ")
            keys = [self.keys.leases(tenant)]
            args = [self._now_arg(), lease_id]
            if await self.link.call(self.sweep_script, keys, args) == 1:
                await self.link.plain("ZREM", self.index_key, raw)
                closed += 1
        return closed

    async def close(self) -> None:
        if self._report_due is not None:
            self._report_due.cancel()
        if self._ended_sweeper is not None:
            self._ended_sweeper.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            await asyncio.wait_for(self.sweep(everything=True), 1.0)
        except (asyncio.TimeoutError, BackendError):
            pass
        if self.leases or self._unreturned:
            log.warning("leases not returned at shutdown: %d (Redis closes them after their "
                        "end with what was last reported used)",
                        len(self.leases) + len(self._unreturned))

    def _forget_quiet(self, now: int) -> None:
        for tenant in [t for t, s in self._seen.items()
                       if now - s.window_start > 10 * RATE_WINDOW_US and t not in self.leases]:
            del self._seen[tenant]
