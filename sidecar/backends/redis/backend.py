"""Shared backend: one truth across replicas in Redis / Valkey, changed only by the Lua
scripts in lua/ (decide.lua mirrors the Cython core; settle.lua reconciles).

This class composes the parts and speaks the Backend interface (base.py):
- the link (link.py): the connection, its set-up, the heartbeat, Redis's clock, the store
  marker, script loading, and the one seam where every failure becomes a BackendError;
- the tick batcher (batcher.py): decisions and settlements queued in one event-loop tick
  go out as one script call each kind (single node);
- cluster routing (cluster.py): provider quotas on Redis Cluster, in two steps;
- capacity leases (lease.py) and the ledger's spend index (spend.py).
Here: each call's KEYS and ARGV (encoded once and cached on the hot path), the check of
each reply, shared reservations, and readiness.

Every failure (refused, reset, silence, NOSCRIPT that will not reload, a reply that is not
what the script returns) is raised as BackendError: the service then applies the
configured failure mode. A call late behind the sidecar's own work is BackendOverloaded:
the service sheds it, and says so.
"""
from __future__ import annotations

import asyncio
import math
import struct
import time
from typing import Any, Callable, Optional, Sequence, Union

import hiredis

from sidecar import _core
from sidecar.backends.base import (TAKEN_RESERVATION, BackendError, BackendStatus, Candidate,
                                   LateReply, Settlement)
from sidecar.backends.redis.batcher import Lane, TickBatcher
from sidecar.backends.redis.cluster import ClusterRouting
from sidecar.backends.redis.keys import Keys
from sidecar.backends.redis.lease import LeaseManager
from sidecar.backends.redis.link import RedisLink
from sidecar.backends.redis.scripts import Scripts, bulk, bulks, limit_args, quota_args
from sidecar.backends.redis.spend import SpendDays
from sidecar.ledger.spend import LAST_DAY, SpendCell, SpendRecord
from sidecar.metrics import BackendStats, LeaseStats
from sidecar.policy import schema
from sidecar.policy.holders import HolderPath, PathSettlement, refresh_windows

# how long a settled request id is remembered (a repeated report within it is a no-op)
SETTLED_TTL_MS = 7 * 24 * 3600 * 1000
# a shared reservation outlives the local one (sidecar/settlement/book.py RESERVATION_TTL_S, 600 s,
# expired within seconds of it), so the deciding replica's expiry finds the record (never
# settled: it records the expiry) or the mark of the replica that took it (settled there)
RESERVATION_TTL_MS = 900 * 1000
# how long /readyz mentions decisions shed as overloaded after the last one
SHED_NOTE_S = 60.0


def _is_outcome(reply: Any) -> bool:
    # decide.lua: 17 integers; routed.lua: 20 (the provider's fields after them);
    # decide_path.lua: 19 and two per cell, an odd count (_outcome)
    return (isinstance(reply, list) and (len(reply) in (17, 20) or (
        len(reply) >= 21 and len(reply) % 2 == 1 and reply[17] == (len(reply) - 19) // 2))
            and all(isinstance(x, int) for x in reply))


# a cell's limits as decide_path.lua unpacks them (struct '<ddddddd', and '<ddd' of a
# calendar window's bounds after a P_WINDOW cell): exact as doubles
_CELL_LIMITS = struct.Struct("<7d")
_CELL_WINDOW = struct.Struct("<3d")
# a cell's stored state (lua/cell.lua): request level, its µs, token level, its µs, budget
# period start (µs, -1: none yet), spent
_CELL_STATE = struct.Struct("<6d")


def _windows(path: HolderPath) -> tuple:
    """The calendar windows a path's cells hold now (their ends): its encoding's key."""
    return tuple(c.limits.win_end for c in path.cells if c.limits.period == _core.P_WINDOW)


def _outcome(reply: list) -> _core.Outcome:
    """An Outcome from a checked reply; a path decision's cell and charges set from the
    integers after decide.lua's 17."""
    if len(reply) in (17, 20):
        return _core.Outcome(*reply)
    out = _core.Outcome(*reply[:17])
    out.cell = reply[18]
    out.charges = tuple(zip(reply[19::2], reply[20::2], strict=True))
    return out


class RedisBackend:
    name = "redis"

    def __init__(self, cfg: schema.RedisBackend,
                 clock_override: Optional[Callable[[], int]] = None) -> None:
        """``clock_override`` (tests only) passes a time to the scripts instead of Redis's TIME."""
        self.cfg = cfg
        self.clock_override = clock_override
        self.prefix = cfg.key_prefix
        self.keyspace = Keys(self.prefix)
        self.shares_reservations = cfg.shared_reservations and not cfg.cluster
        self.failure_mode = cfg.failure_mode
        self.scripts = s = Scripts()
        self.link = RedisLink(cfg, s.all(), self.keyspace.marker, on_beat=self._on_beat)
        # which tenants spent on which day, for /v1/spend over a range (spend.py)
        self.spend = SpendDays(self.link, self.prefix, self._wall_us)
        # one script call per tick and kind (single node; batcher.py)
        self.decide_lane = Lane(one=s.decide, many=s.decide_batch, keys_each=3, deadline=True,
                                sheds=True)
        # decisions with providers (routed.lua, docs/providers.md): key counts vary
        self.routed_lane = Lane(one=s.routed, many=s.routed_batch, keys_each=None,
                                deadline=True, sheds=True)
        # decisions over a path of cells (decide_path.lua, docs/budgets.md): key counts vary
        self.path_lane = Lane(one=s.decide_path, many=s.decide_path_batch, keys_each=None,
                              deadline=True, sheds=True)
        self.settle_lane = Lane(one=None, many=s.settle_batch, keys_each=4, deadline=False,
                                sheds=False, sends_answered=True)
        self.decision_batcher = TickBatcher(self.link, (self.decide_lane, self.routed_lane,
                                                        self.path_lane),
                                            on_late=self._late_after_cancel)
        self.settlements = TickBatcher(self.link, (self.settle_lane,))
        # provider quotas on a cluster: provider first, then the tenant (cluster.py)
        self.routing = ClusterRouting(self.link, self.keyspace, s.provider_take, self,
                                      self._now_arg)
        # capacity leases for hot tenants (single node or cluster; lease.py)
        # (not with a test clock for the scripts: the leases need the same clock, lease.py)
        self.leases: Optional[LeaseManager] = LeaseManager(self.link, self.keyspace, s) if (
            cfg.leases and clock_override is None) else None
        # cached encodings: per tenant (its three keys), per Limits (their ARGV), per
        # provider candidate (its keys and ARGV)
        self._tenant_keys: dict[str, bytes] = {}
        self._limit_args: dict[_core.Limits, tuple[bytes, int]] = {}
        self._candidates_packed: dict[tuple, tuple[bytes, bytes]] = {}
        self._paths_packed: dict[HolderPath, tuple[list[str], tuple[bytes, int, bytes, int],
                                                   list, tuple]] = {}
        self.late_replies = 0  # replies that came after their decision had timed out
        self.decisions = 0

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        await self.link.start()

    async def close(self) -> None:
        if self.leases is not None:
            await self.leases.close()  # what the leases hold goes back to the pool
        await self.link.close()

    async def _on_beat(self) -> None:
        await self.spend.resend()

    # --- what the link and its parts count, for tests and readiness --------------------
    @property
    def conn(self) -> Any:
        return self.link.conn

    @property
    def watch(self) -> Any:
        return self.link.watch

    @property
    def timeout_s(self) -> float:
        return self.link.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:  # tests: a store given more time
        self.link.timeout_s = value

    @property
    def deadline_s(self) -> float:
        return self.link.deadline_s

    @deadline_s.setter
    def deadline_s(self, value: float) -> None:  # tests: calls given less time
        self.link.deadline_s = value

    @property
    def round_trips(self) -> int:
        return self.link.round_trips

    @property
    def connection_attempts(self) -> tuple[int, int]:
        return self.link.connection_attempts

    @property
    def errors(self) -> int:
        return self.link.errors

    @property
    def expired(self) -> int:
        return self.decision_batcher.expired

    @property
    def store_resets(self) -> int:
        return self.link.marker.resets

    @property
    def spend_index(self) -> Any:
        return self.spend.index

    @property
    def provider_refunds(self) -> dict[str, int]:
        return self.routing.refunds

    # --- keys and encodings --------------------------------------------------------
    def keys(self, tenant: str) -> tuple[str, str, str]:
        return self.keyspace.tenant(tenant)

    def provider_keys(self, provider: str) -> tuple[str, str, str]:
        return self.keyspace.provider(provider)

    def _now_arg(self) -> int:
        return self.clock_override() if self.clock_override is not None else 0

    def _wall_us(self) -> int:
        """This host's wall clock in µs (the scripts' clock override under a test): the
        day of a spend write as this host sees it (spend_index.py)."""
        return self.clock_override() if self.clock_override is not None \
            else time.time_ns() // 1000

    def _keys_packed(self, tenant: str) -> bytes:
        """The tenant's three keys as bulk strings: encoded once per tenant."""
        packed = self._tenant_keys.get(tenant)
        if packed is None:
            if len(self._tenant_keys) > 100_000:
                self._tenant_keys.clear()
            packed = self._tenant_keys[tenant] = b"".join(bulk(k) for k in self.keys(tenant))
        return packed

    def _limits_packed(self, limits: _core.Limits) -> tuple[bytes, int]:
        """The limits' ARGV, encoded once per Limits object (a policy reload makes new ones)."""
        packed = self._limit_args.get(limits)
        if packed is None:
            if len(self._limit_args) > 10_000:
                self._limit_args.clear()
            args = limit_args(limits)
            packed = self._limit_args[limits] = (b"".join(bulk(a) for a in args), len(args))
        return packed

    def _candidate_packed(self, c: Candidate) -> tuple[bytes, bytes]:
        """A candidate's three keys and its 8 arguments (tier, quota), encoded once."""
        key = (c.provider, c.tier, c.quota)
        packed = self._candidates_packed.get(key)
        if packed is None:
            if len(self._candidates_packed) > 10_000:
                self._candidates_packed.clear()
            packed = self._candidates_packed[key] = (
                b"".join(bulk(k) for k in self.provider_keys(c.provider)),
                b"".join(bulk(a) for a in [c.tier, *quota_args(c.quota)]))
        return packed

    # --- decisions -------------------------------------------------------------------
    async def decide(self, tenant: str, limits: _core.Limits, tier: int, input_tokens: int,
                     output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                     late: Optional[LateReply] = None) -> _core.Outcome:
        if self.leases is not None:  # a hot tenant: within a lease, decided here (lease.py)
            leased = await self.leases.decide(tenant, limits, tier, input_tokens, output_tokens,
                                              firm_tokens, commit_on_deny)
            if leased is not None:
                self.decisions += 1
                return leased
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        if self.cfg.cluster:
            # redis-py routes each EVALSHA to the tenant's node (no batching across slots),
            # with the deadline in that node's clock (lua/deadline.lua; 0 = not read yet)
            keys = self.keys(tenant)
            reply = await self.link.call(self.scripts.decide, keys, request + limit_args(limits)
                                         + [self.link.deadline_on(keys[0])])
        else:
            limits_packed, n_limit_args = self._limits_packed(limits)
            reply = await self._queued(
                self.decide_lane, self._keys_packed(tenant), 3,
                b"".join([bulk(a) for a in request]) + limits_packed,
                len(request) + n_limit_args, late or LateReply())
        if isinstance(reply, hiredis.ReplyError):  # this decision failed in its batch
            raise self.link.failed(f"decide.lua: {reply}")
        if not _is_outcome(reply):
            raise self.link.failed(f"decide.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _core.Outcome(*reply)

    async def _queued(self, lane: Lane, keys: bytes, nkeys: int, args: bytes, nargs: int,
                      late: LateReply) -> Any:
        """A decision through the tick batcher: its reply."""
        fut = self.decision_batcher.submit(lane, keys, nkeys, args, nargs, late)
        try:
            return await fut
        except asyncio.CancelledError:
            # cancelled after the reply had arrived but before this resumed: the decision
            # was applied, so its outcome goes to the LateReply, whose handler the caller
            # sets as the cancellation passes through it (soon after this)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                asyncio.get_running_loop().call_soon(self._late_after_cancel, late,
                                                     fut.result())
            raise

    def _late_after_cancel(self, late: LateReply, reply: Any) -> None:
        if late.on_outcome is not None and _is_outcome(reply):
            self.late_replies += 1
            late.on_outcome(_outcome(reply))

    def _path_packed(self, path: HolderPath
                     ) -> tuple[list[str], tuple[bytes, int, bytes, int], list]:
        """A path's keys (one per cell, lua/cell.lua) and its ARGV after the request's
        (decide_path.lua), the encoded keys and arguments cached once per path (a policy
        reload makes new ones)."""
        packed = self._paths_packed.get(path)
        if packed is not None and packed[3] != _windows(path):
            packed = None  # a calendar window moved on: its bounds are in the arguments
        if packed is None:
            if len(self._paths_packed) > 100_000:
                self._paths_packed.clear()
            keys: list[str] = []
            prices: Optional[tuple] = None
            limits = b""
            for c in path.cells:
                lim = c.limits
                keys.append(self.keyspace.cell(path.root, c.id))
                if lim.budget >= 0 and lim.budget_in_usd:
                    if prices is not None and lim.prices != prices:
                        raise ValueError("the USD cells of a path price a request alike")
                    prices = lim.prices
                limits += _CELL_LIMITS.pack(lim.rpm, lim.tpm, lim.burst, lim.budget,
                                            1 if lim.budget_in_usd else 0, lim.period,
                                            lim.low_water)
                if lim.period == _core.P_WINDOW:
                    limits += _CELL_WINDOW.pack(lim.win_start, lim.win_end, lim.win_next)
            ntiers = path.cells[0].limits.ntiers
            args = [len(path.cells), ntiers,
                    *(p for pair in (prices or ((0, 0),) * ntiers) for p in pair), limits]
            packed = self._paths_packed[path] = (
                keys, (b"".join(bulk(k) for k in keys), len(keys),
                       b"".join(bulk(a) for a in args), len(args)), args, _windows(path))
        return packed[0], packed[1], packed[2]

    async def decide_path(self, tenant: str, path: HolderPath, tier: int, input_tokens: int,
                          output_tokens: int, firm_tokens: int, commit_on_deny: bool,
                          late: Optional[LateReply] = None) -> _core.Outcome:
        """One decision over ``path``'s cells in one script call (decide_path.lua), never
        within a lease (docs/budgets.md: leases would split a parent's room among replicas
        and children). Every key carries the root's hash tag: one slot on a cluster."""
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        # calendar windows from this host's clock; the script rolls over at their end by
        # Valkey's (lua/cell.lua, cell_bounds)
        refresh_windows(path, self._wall_us)
        key_list, (keys, nkeys, args, nargs), arg_list = self._path_packed(path)
        if self.cfg.cluster:
            reply = await self.link.call(self.scripts.decide_path, key_list,
                                         request + arg_list
                                         + [self.link.deadline_on(key_list[0])])
        else:
            reply = await self._queued(
                self.path_lane, keys, nkeys, b"".join([bulk(a) for a in request]) + args,
                len(request) + nargs, late or LateReply())
        if isinstance(reply, hiredis.ReplyError):
            raise self.link.failed(f"decide_path.lua: {reply}")
        if not (_is_outcome(reply) and len(reply) == 19 + 2 * len(path.cells)):
            raise self.link.failed(f"decide_path.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _outcome(reply)

    async def decide_routed(self, tenant: str, limits: _core.Limits, tier: int,
                            input_tokens: int, output_tokens: int, firm_tokens: int,
                            commit_on_deny: bool, priority: int, spill: int,
                            candidates: Sequence[Candidate],
                            late: Optional[LateReply] = None) -> _core.Outcome:
        if self.cfg.cluster:
            return await self.routing.decide(tenant, limits, tier, input_tokens, output_tokens,
                                             firm_tokens, commit_on_deny, priority, spill,
                                             candidates)
        request = [self._now_arg(), tier, input_tokens, output_tokens, firm_tokens,
                   1 if commit_on_deny else 0]
        limits_packed, n_limit_args = self._limits_packed(limits)
        keys = [self._keys_packed(tenant)]
        args = [b"".join([bulk(a) for a in request]), limits_packed,
                bulk(priority), bulk(spill), bulk(len(candidates))]
        for c in candidates:
            ckeys, cargs = self._candidate_packed(c)
            keys.append(ckeys)
            args.append(cargs)
        reply = await self._queued(
            self.routed_lane, b"".join(keys), 3 + 3 * len(candidates), b"".join(args),
            len(request) + n_limit_args + 3 + 8 * len(candidates), late or LateReply())
        if isinstance(reply, hiredis.ReplyError):
            raise self.link.failed(f"routed.lua: {reply}")
        if not (_is_outcome(reply) and len(reply) == 20):
            raise self.link.failed(f"routed.lua: unexpected reply {str(reply)[:120]}")
        self.decisions += 1
        return _core.Outcome(*reply)

    async def settle_provider(self, provider: str, quota: _core.Quota, marker: str,
                              delta_tokens: int, delta_requests: int = 0) -> bool:
        keys = [*self.provider_keys(provider), self.keyspace.provider_settled(provider, marker)]
        args = [self._now_arg(), delta_tokens, delta_requests, *quota_args(quota),
                SETTLED_TTL_MS]
        reply = await self.link.call(self.scripts.provider_settle, keys, args)
        if reply not in (0, 1):
            raise self.link.failed(f"provider_settle.lua: unexpected reply {str(reply)[:120]}")
        return reply == 1

    # --- reservations shared across replicas (backend.shared_reservations) -------------
    def share_reservation(self, tenant: str, request_id: str, record: str) -> None:
        if not self.shares_reservations:
            return  # cluster mode: not offered (docs/usage.md)
        # no link: not sent (the local book has it)
        self.link.send_unawaited("SET", self.keyspace.reservation(tenant, request_id), record,
                                 "PX", RESERVATION_TTL_MS)

    def forget_reservation(self, tenant: str, request_id: str) -> None:
        # settled by the replica that decided: only a sibling's take leaves a mark there,
        # which the decider's expiry reads; without it the record would hold Redis memory
        # for its whole 15 minutes
        if not self.shares_reservations:
            return
        self.link.send_unawaited("DEL", self.keyspace.reservation(tenant, request_id))

    async def take_reservation(self, tenant: str, request_id: str) -> Optional[str]:
        if not self.shares_reservations:
            return None
        key = self.keyspace.reservation(tenant, request_id)
        # atomically: the record for us, the mark in its place (same expiry) for the others
        reply = await self.link.plain("SET", key, TAKEN_RESERVATION, "XX", "KEEPTTL", "GET")
        if reply is None:
            return None
        if not isinstance(reply, bytes):
            raise self.link.failed(f"SET {key} GET: unexpected reply {str(reply)[:120]}")
        return reply.decode()

    # --- settlements -----------------------------------------------------------------
    async def settle(self, tenant: str, limits: Union[_core.Limits, PathSettlement],
                     request_id: str, delta_tokens: int, delta_cost: int, period_start_us: int,
                     spend: Optional[SpendRecord] = None) -> Settlement:
        if isinstance(limits, PathSettlement):
            return await self._settle_path(tenant, limits, request_id, delta_tokens, spend)
        if self.leases is not None:  # Redis knows what the tenant's lease used first (lease.py)
            await self.leases.report(tenant)
        _, tpm_key, budget_key = self.keys(tenant)
        args = [self._now_arg(), limits.tpm, repr(limits.burst), limits.budget, limits.period,
                delta_tokens, delta_cost, period_start_us, SETTLED_TTL_MS]
        # the ledger's spend, in the same atomic call (settle.lua's KEYS[4], ARGV[10..16])
        keys = [tpm_key, budget_key, self.keyspace.settled(tenant, request_id),
                self.keyspace.spend(tenant)]
        if spend is not None:
            # and the budget's unit: what the usage cost it (the estimate leaves "held")
            args += [spend.model, *spend.counts(), 1 if limits.budget_in_usd else 0]
            await self.spend.note(tenant)
        if self.cfg.cluster:
            reply = await self.link.call(self.scripts.settle, keys, args)
        else:
            reply = await self.settlements.submit(
                self.settle_lane, bulks(keys), len(keys), bulks(args), len(args))
            if isinstance(reply, hiredis.ReplyError):  # this settlement failed in its batch
                raise self.link.failed(f"settle.lua: {reply}")
        if not (isinstance(reply, list) and len(reply) == 3
                and all(isinstance(x, int) for x in reply)):
            raise self.link.failed(f"settle.lua: unexpected reply {str(reply)[:120]}")
        if self.leases is not None:
            self.leases.settled(tenant, reply[1])
        return Settlement(applied=reply[0] == 1, budget_spent=reply[1], at_us=reply[2])

    async def _settle_path(self, tenant: str, target: PathSettlement, request_id: str,
                           delta_tokens: int, spend: Optional[SpendRecord]) -> Settlement:
        """settle_path.lua: every cell of the recorded path in one call, once per id. On one
        node the marker is the tenant's own (was_settled finds it) and the ledger's spend
        rides in the same call; on a cluster the marker is in the tree's slot and the spend
        follows in a second call, only when the settlement applied (docs/budgets.md)."""
        path = target.path
        refresh_windows(path, self._wall_us)
        keys: list[str] = []
        args: list = [self._now_arg(), delta_tokens, SETTLED_TTL_MS, len(path.cells)]
        for c, (d_cost, period_start) in zip(path.cells, target.deltas, strict=True):
            keys.append(self.keyspace.cell(path.root, c.id))
            lim = c.limits
            args += [lim.rpm, lim.tpm, repr(lim.burst), lim.budget, lim.period, d_cost,
                     period_start, lim.win_start, lim.win_end, lim.win_next]
        cluster = self.cfg.cluster
        keys.append(self.keyspace.path_settled(path.root, tenant, request_id) if cluster
                    else self.keyspace.settled(tenant, request_id))
        if spend is not None:
            await self.spend.note(tenant)
            if not cluster:
                keys.append(self.keyspace.spend(tenant))
                args += [spend.model, *spend.counts()]
        reply = await self.link.call(self.scripts.settle_path, keys, args)
        if not (isinstance(reply, list) and len(reply) == 3
                and all(isinstance(x, int) for x in reply)):
            raise self.link.failed(f"settle_path.lua: unexpected reply {str(reply)[:120]}")
        if cluster and spend is not None and reply[0] == 1:
            await self.record_spend(tenant, spend)
        return Settlement(applied=reply[0] == 1, budget_spent=reply[1], at_us=reply[2])

    async def was_settled(self, tenant: str, request_id: str) -> bool:
        # one node: on the settlements' own link, after them (it sees what they did); a
        # cluster: sent by redis-py to the node owning the tenant's slot
        return await self.link.plain("EXISTS", self.keyspace.settled(tenant, request_id)) == 1

    # --- the ledger's spend (sidecar/ledger/spend.py) ----------------------------------
    def spend_key(self, tenant: str) -> str:
        return self.keyspace.spend(tenant)

    async def record_spend(self, tenant: str, spend: SpendRecord, period_start_us: int = -1,
                           held: int = 0) -> None:
        """Spend of a request that is not settled by settle.lua (its estimate stays
        charged, no longer held); may raise BackendError."""
        keys = [self.keyspace.spend(tenant)]
        args = [self._now_arg(), spend.model, *spend.counts(), period_start_us, held]
        await self.spend.note(tenant)
        await self.link.call(self.scripts.record_spend, keys, args)

    async def read_state(self, tenant: str) -> Optional[_core.State]:
        """The tenant's keys as decide.lua last wrote them (its buckets "<level> <last µs>",
        its budget {ps, s}); a key absent (never used, or expired when full again) stays
        as a fresh State has it. Capacity leased to replicas is not in the store: used."""
        rpm, tpm, budget = self.keyspace.tenant(tenant)
        try:
            got = await self.link.commands([("GET", rpm), ("GET", tpm),
                                            ("HMGET", budget, "ps", "s")])
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise BackendError(f"reading {tenant}'s state: {type(exc).__name__}: {exc}") from None
        st = _core.State()
        try:
            for value, which in ((got[0], "req"), (got[1], "tok")):
                if isinstance(value, (bytes, str)) and value:
                    level, last = (value.decode() if isinstance(value, bytes) else value).split()
                    setattr(st, f"{which}_level", float(level))
                    setattr(st, f"{which}_last", int(last))
            ps, spent = got[2] if isinstance(got[2], (list, tuple)) else (None, None)
            if ps is not None and spent is not None:
                st.period_start, st.spent = int(ps), int(spent)
        except (ValueError, TypeError) as exc:
            raise BackendError(f"{tenant}'s state is not decide.lua's: {exc}") from None
        return st

    async def read_cell_state(self, root: str, cell_id: str) -> Optional[_core.State]:
        """One cell of a holder tree as decide_path.lua last wrote it (lua/cell.lua: six
        packed doubles); absent or not 48 bytes: a fresh cell, as the script reads it."""
        key = self.keyspace.cell(root, cell_id)
        try:
            got = (await self.link.commands([("GET", key)]))[0]
        except Exception as exc:  # noqa: BLE001 - the one seam: every failure is a BackendError
            raise BackendError(f"reading cell {cell_id} of {root}: {type(exc).__name__}: "
                               f"{exc}") from None
        st = _core.State()
        if isinstance(got, (bytes, bytearray)) and len(got) == _CELL_STATE.size:
            req, req_last, tok, tok_last, ps, spent = _CELL_STATE.unpack(got)
            if all(math.isfinite(x) for x in (req, req_last, tok, tok_last, ps, spent)):
                st.req_level, st.req_last = req, int(req_last)
                st.tok_level, st.tok_last = tok, int(tok_last)
                if ps >= 0:
                    st.period_start, st.spent = int(ps), int(spent)
        return st

    async def spend_cells(self, since_day: int = 0, until_day: int = LAST_DAY,
                          tenant: Optional[str] = None) -> list[SpendCell]:
        return await self.spend.cells(since_day, until_day, tenant)

    def has_room_for(self, tenant: str) -> bool:
        return True  # tenants' state lives in Redis, with TTLs, not in this process

    # --- health and counters -----------------------------------------------------------
    def status(self) -> BackendStatus:
        # a store that lost its data still decides (every replica shares the loss; failing
        # readiness would take the whole gateway down): reported, with an alert on the metric
        note = f"; {self.link.marker.note}" if self.link.marker.note else ""
        batcher = self.decision_batcher
        if batcher.shed_at and time.monotonic() - batcher.shed_at < SHED_NOTE_S:
            # still ready: the store answers, and taking this replica out would only move
            # its load to the others; the note (and kt_requests_total{decision=
            # "overloaded"}) says it needs more replicas
            note += (f"; overloaded: {batcher.shed} decision(s) shed since start, the last "
                     f"{time.monotonic() - batcher.shed_at:.0f} s ago (scale out)")
        return self.link.status(note)

    def stats(self) -> BackendStats:
        leases = None
        if self.leases is not None:
            st = self.leases.stats
            leases = LeaseStats(st["taken"], st["refused"], st["returned"], st["reported"],
                                st["failed"], st["local_decisions"], len(self.leases.leases))
        return BackendStats(round_trips=self.link.round_trips, decisions=self.decisions,
                            connection_attempts=self.link.connection_attempts,
                            expired_decisions=self.decision_batcher.expired,
                            store_resets=self.link.marker.resets, leases=leases,
                            provider_refunds=dict(self.routing.refunds))
