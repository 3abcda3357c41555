"""The settlement service: a finished response's usage → the settled charge and the
ledger's event. One instance per server, shared by the usage transports (access log,
ext_proc, usage API). It takes reservations out of the book the decision flow fills,
prices the usage, sends the settlement (resent when its reply is lost: resend.py),
corrects the provider's bucket, counts, and records the ledger's event. A reservation
no usage comes for is charged at its bound (bound.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from typing import Optional, Union

import msgspec

from sidecar import _core, attribution
from sidecar.anomaly import Anomaly, TokenRateWatch
from sidecar.attribution import Attribution
from sidecar.backends.base import TAKEN_RESERVATION, Backend, BackendError, Settlement
from sidecar.burstlog import BurstLog
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.spend import SpendRecord, day_of
from sidecar.metrics import Metrics
from sidecar.model import OTHER_MODELS, OTHER_TENANTS, valid_tenant
from sidecar.policy.holders import PathSettlement, path_deltas
from sidecar.policy.load import CompiledPolicy, TenantRule
from sidecar.settlement import bound, events
from sidecar.settlement.attributed import AttributedSpend
from sidecar.settlement.book import (RESERVATIONS_MAX, Reservation, ReservationBook,
                                     ReservationIds, parse_reservation)
from sidecar.settlement.late import LateRefunds
from sidecar.settlement.pricing import price
from sidecar.settlement.resend import SettlementPending, Settler
from sidecar.settlement.usage import Usage, UsageError

log = logging.getLogger("kt.service")


class SettleResult(msgspec.Struct, frozen=True):
    applied: bool  # False: this request id was settled before (nothing changed)
    request_id: str
    tenant: str
    model: str
    input_tokens: int
    output_tokens: int
    reserved_tokens: int
    delta_tokens: int
    delta_cost: int  # in the budget's unit (tokens or nano-USD)
    cost_usd: float
    budget_spent: int
    unpriced: bool = False
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class SettlementService:
    def __init__(self, policy: CompiledPolicy, backend: Backend, book: ReservationBook,
                 metrics: Optional[Metrics] = None, ledger: Optional[Ledger] = None) -> None:
        self.policy = policy
        self.backend = backend
        self.anomalies: Optional[TokenRateWatch] = None  # Flows sets the shared one
        self.metrics = metrics or Metrics()
        self.reservations = book
        # what was spent, request by request (sidecar/ledger/); Ledger(None) records nothing
        self.ledger = ledger or Ledger(None)
        book.on_expired = self._expired
        # settlements, and the outcome of those whose reply was lost (resend.py)
        self.settler = Settler(backend, lambda outcome: self.metrics.settle_outcomes.labels(
            outcome).inc())
        self.new_reservation_id = ReservationIds().next
        self._background: set[asyncio.Task] = set()  # charges and refunds in flight
        self.late = LateRefunds(backend, self.metrics, self.track)
        self._usage_children: dict = {}
        # a flood of unpriced usage logs one line per burst, not one per request
        self._unpriced_log = BurstLog(log)
        # tenant of recently settled request ids, so a repeated report without a
        # tenant still reaches the backend's idempotency check (bounded, oldest out)
        self._settled_tenant: OrderedDict[str, str] = OrderedDict()
        # the spend of users and tags, summed and written once a second (attributed.py)
        self.attributed = AttributedSpend(backend, self.metrics, self.track)

    def replace_policy(self, policy: CompiledPolicy) -> None:
        self.policy = policy

    def anomaly_changed(self, change: Anomaly) -> None:
        """A tenant's token-rate flag started or cleared (the token-rate watch's listener:
        a settlement, a decision or the server's sweep judged it): the log, the metrics and
        the ledger's event."""
        policy = self.policy
        label = change.tenant if change.tenant in policy.tenants else OTHER_TENANTS
        if change.flagged:
            self.metrics.token_rate_anomalies.labels(label).inc()
            self.metrics.token_rate_flagged.labels(label).inc()
            log.warning("token-rate anomaly: tenant %s settles %.0f tokens a minute, "
                        "%.0fx its usual %.0f (policy anomaly.action: %s)", change.tenant[:128],
                        change.tokens_per_minute, change.tokens_per_minute /
                        max(change.baseline_per_minute, 1.0), change.baseline_per_minute,
                        policy.anomaly.action)
        else:
            self.metrics.token_rate_flagged.labels(label).dec()
            log.info("token-rate anomaly over: tenant %s settles %.0f tokens a minute, its "
                     "usual %.0f", change.tenant[:128], change.tokens_per_minute,
                     change.baseline_per_minute)
        events.token_rate(self.ledger, policy, change)

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task referenced until it is done."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle_usage(self, request_id: str, tenant: Optional[str], model: Optional[str],
                           input_tokens: int, output_tokens: int,
                           source: str = "report", cached_tokens: int = 0,
                           cache_write_tokens: int = 0,
                           settled_by: Optional[str] = None,
                           settle_id: Optional[str] = None,
                           reservation: Optional[Reservation] = None,
                           outcome: str = "settled",
                           reservation_local: bool = True,
                           att: Attribution = attribution.NONE) -> SettleResult:
        """Replace a request's reserved estimate by its actual usage, once per (tenant, id).

        ``request_id`` names the reservation (the id the sidecar made, `x-kt-reservation`);
        ``settle_id``, when given, is the idempotency key instead (ext_proc settles a
        request it holds no reservation id for under a fresh one: it never retries, and
        a client's x-request-id must not make two requests one).
        ``input_tokens`` counts every input token; ``cached_tokens`` and
        ``cache_write_tokens`` of them are priced at the model's cache prices.
        ``settled_by`` names how the usage was read, for the ledger (default: ``source``).
        ``reservation``: one already taken out of the book or the shared record (a charge
        at the bound, bound.py; ``reservation_local``: from this sidecar's book),
        settled as it is; ``outcome`` its ledger outcome. ``att``: the request's
        attribution as the access log carried it, for usage without a reservation (the
        reservation's own, made by the decision, comes first).
        Without a reservation (RLS, a fail-open, another replica, or a report-only
        gateway) the whole actual usage is charged in the current period."""
        if not request_id or len(request_id) > 256:
            raise UsageError("request_id must be 1..256 characters")
        if not (0 <= input_tokens <= 10**9 and 0 <= output_tokens <= 10**9):
            raise UsageError("input_tokens and output_tokens must be integers in 0..1e9")
        if not (0 <= cached_tokens and 0 <= cache_write_tokens
                and cached_tokens + cache_write_tokens <= input_tokens):
            raise UsageError("cached_tokens and cache_write_tokens must be >= 0 and together "
                             "at most input_tokens (they are part of it)")
        policy = self.policy
        res = reservation if reservation is not None else self.reservations.pop(request_id)
        # held here, not taken from another replica's record: its shared copy is dropped
        # once settled
        local = res is not None if reservation is None else reservation_local
        if reservation is not None:
            tenant = reservation.tenant
        elif res is not None:
            if tenant and tenant != res.tenant:
                # a usage report must never move a charge from one tenant to another
                self.reservations.put(request_id, *dataclasses.astuple(res))
                raise UsageError(f"request id {request_id!r} was reserved for another tenant")
            tenant = res.tenant
        elif not tenant:
            tenant = self._settled_tenant.get(request_id)
        if not tenant or not valid_tenant(tenant):
            raise UsageError("unknown request id and no valid tenant given")
        if res is None and self.backend.shares_reservations:
            # decided by another replica: its reservation, if it shared one (and no
            # replica took it before)
            record = await self.backend.take_reservation(tenant, request_id)
            res = parse_reservation(tenant, record if record != TAKEN_RESERVATION else None)
        rule = policy.rule_for(tenant)
        if rule is None:
            raise UsageError(f"unknown tenant {tenant!r}")
        model = model or (res.model if res is not None else policy.tiers[0].model)
        nano, unpriced = price(policy, model, Usage(input_tokens, output_tokens, cached_tokens,
                                                    cache_write_tokens))
        cost = nano if rule.budget_unit == "usd" else input_tokens + output_tokens
        charged_tokens = res.charged_tokens if res is not None else 0
        charged_cost = res.charged_cost if res is not None else 0
        period_start = res.period_start_us if res is not None else -1
        delta_tokens = input_tokens + output_tokens - charged_tokens
        delta_cost = cost - charged_cost if rule.limits.budget >= 0 else 0
        # a decision over a path of cells settles every cell it was charged on, each in its
        # unit (docs/budgets.md); usage without a reservation goes to the tenant's path now
        target: Union[_core.Limits, PathSettlement] = rule.limits
        if res is not None and res.path_charge is not None:
            target = path_deltas(res.path_charge.path, res.path_charge.charges,
                                 input_tokens + output_tokens, nano)
        elif res is None and (path := rule.path_for(model)) is not None:
            target = path_deltas(path, tuple((0, -1) for _ in path.cells),
                                 input_tokens + output_tokens, nano)
        # the ledger's durable spend, written by the same atomic settlement (nothing for a
        # release: a failed request costs nothing)
        # (keyed by the model's name when the policy knows it; any other name, which an
        # upstream or a client may invent, under one `_other` cell per day: bounded, as the
        # metric labels are; each event in the event log keeps the exact name)
        spend_model = model if (model in policy.pricing or model in policy.tier_by_model) \
            else OTHER_MODELS
        spend = None if source == "release" else SpendRecord(
            spend_model, 1, input_tokens, output_tokens, cached_tokens, cache_write_tokens, nano)
        recorded = functools.partial(
            self._record_settlement, request_id, tenant, rule, res, model, source,
            "released" if source == "release" else outcome, settled_by or source,
            input_tokens, output_tokens, cached_tokens, cache_write_tokens, nano, cost,
            unpriced, delta_tokens, spend, _attribution_of(res, att))
        # the key is this sidecar's alone (its reservation, an id it made: found settled
        # after a lost reply, it was this settlement) unless a usage report named it
        # without a reservation here: a reporter's own id, which an earlier report of the
        # same request may have settled
        ours = res is not None or settle_id is not None or source != "report"
        try:
            st = await self.settler.settle(
                tenant, target, settle_id or request_id, delta_tokens, delta_cost,
                period_start, spend, ours=ours,
                on_resolved=recorded,
                on_unknown=functools.partial(self._settlement_unknown, request_id, res))
        except BackendError:
            # not put back in the book, where it would expire as kept: the settlement may
            # have been applied, and its outcome is read from the store (resend.py), then
            # recorded by _record_settlement
            self.metrics.backend_errors.labels(self.backend.name).inc()
            raise
        await recorded(st)
        if local and self.backend.shares_reservations:
            self.backend.forget_reservation(tenant, request_id)
        return SettleResult(
            applied=st.applied, request_id=request_id, tenant=tenant, model=model,
            input_tokens=input_tokens, output_tokens=output_tokens,
            reserved_tokens=charged_tokens, delta_tokens=delta_tokens, delta_cost=delta_cost,
            cost_usd=nano / 1e9, budget_spent=st.budget_spent, unpriced=unpriced,
            cached_tokens=cached_tokens, cache_write_tokens=cache_write_tokens)

    async def _record_settlement(self, request_id: str, tenant: str, rule: TenantRule,
                                 res: Optional[Reservation], model: str, source: str,
                                 outcome: str, settled_by: str, input_tokens: int,
                                 output_tokens: int, cached_tokens: int,
                                 cache_write_tokens: int, nano: int, cost: int,
                                 unpriced: bool, delta_tokens: int,
                                 spend: Optional[SpendRecord], att: Attribution,
                                 st: Settlement) -> None:
        """What follows a settlement the store applied (or found settled before): the
        provider's correction, metrics, the ledger's event. Also run later, for a
        settlement whose reply was lost, once the store confirmed its outcome."""
        self._settled_tenant[request_id] = tenant
        if len(self._settled_tenant) > RESERVATIONS_MAX:
            self._settled_tenant.popitem(last=False)
        if not st.applied:
            return
        if res is not None and res.provider:
            await self._settle_provider(request_id, res.provider, delta_tokens)
        if res is None:
            # a late decision reply (fail open, or Envoy's failure mode) that came in while
            # this settled (both on one link, in order) left a reservation for a request
            # just charged in full
            late = self.reservations.pop(request_id)
            if late is not None:
                self.late.refund(tenant, rule.limits if late.path_charge is None else
                                 path_deltas(late.path_charge.path, late.path_charge.charges,
                                             0, 0),
                                 late.charged_tokens, late.charged_cost, late.period_start_us)
        self._count_usage(request_id, tenant, rule, model, source, input_tokens,
                          output_tokens, cached_tokens, nano, unpriced)
        if self.anomalies is not None and input_tokens + output_tokens:
            # a flag started or cleared by these tokens reaches anomaly_changed
            self.anomalies.observe(tenant, input_tokens + output_tokens)
        events.settled(self.ledger, self.policy, request_id, tenant, rule, res, model,
                       outcome, settled_by, input_tokens, output_tokens, cached_tokens,
                       cache_write_tokens, nano, cost, unpriced, st.budget_spent, st.at_us,
                       att)
        self.attributed.add(tenant, att, spend, day_of(st.at_us or time.time_ns() // 1000),
                            named=bool(rule.name))

    def _count_usage(self, request_id: str, tenant: str, rule: TenantRule, model: str,
                     source: str, input_tokens: int, output_tokens: int,
                     cached_tokens: int, nano: int, unpriced: bool) -> None:
        policy = self.policy
        m = self.metrics
        # labels stay bounded whatever a report or an upstream's reply names: tenants
        # and models the policy does not name are one series each
        label = tenant if rule.name else OTHER_TENANTS
        model_label = (model if model in policy.pricing or model in policy.tier_by_model
                       else OTHER_MODELS)
        # labelled children looked up once per (tenant label, model label, source):
        # .labels() costs microseconds, and usage comes back for every admitted request
        key = (label, model_label, source)
        children = self._usage_children.get(key)
        if children is None:
            if len(self._usage_children) > 100_000:
                self._usage_children.clear()
            children = self._usage_children[key] = (
                m.tokens_total.labels(label, model_label, "input"),
                m.tokens_total.labels(label, model_label, "output"),
                m.cost_dollars.labels(label, model_label), m.settlements.labels(source),
                m.tokens_total.labels(label, model_label, "cached_input"))
        children[0].inc(input_tokens)
        children[1].inc(output_tokens)
        children[2].inc(nano / 1e9)
        children[3].inc()
        if cached_tokens:
            children[4].inc(cached_tokens)
        if unpriced:
            m.unpriced_tokens.labels(model_label).inc(input_tokens + output_tokens)
            self._unpriced_log.warning(
                "usage of unpriced model %r charged at the dearest listed price "
                "(tenant %s, request %s)", model[:200], tenant, request_id)

    def _settlement_unknown(self, request_id: str, res: Optional[Reservation]) -> None:
        """A settlement the store never confirmed nor denied: the estimate stays charged."""
        if res is not None:
            self.metrics.reservations_closed.labels("kept_settle_unknown").inc()
            self.keep_estimate(request_id, res, "kept", "settle_unknown")

    def upstream_answered(self, provider: str, status: int) -> None:
        """Count an upstream response ext_proc saw, by provider and status (a provider's own
        429s): with providers in the policy only. Both labels are bounded: a provider id
        the policy does not know (a header the sidecar did not set) counts as "unknown"."""
        plan = self.policy.providers
        if plan is None:
            return
        label = provider if provider in plan.by_id else ("none" if not provider else "unknown")
        code = str(status) if 100 <= status <= 599 else "other"
        self.metrics.upstream_responses.labels(label, code).inc()

    async def _settle_provider(self, request_id: str, provider: str, delta_tokens: int) -> None:
        """The provider's token bucket takes the same correction as the tenant's (once per
        request id). A failure is logged, never fails the settlement: the tenant's spend is
        right; the provider's bucket keeps the estimate until it refills."""
        plan = self.policy.providers
        rule = plan.by_id.get(provider) if plan is not None else None
        if rule is None or delta_tokens == 0:
            return  # a reload removed the provider, or nothing to correct
        try:
            await self.backend.settle_provider(provider, rule.quota, request_id, delta_tokens)
        except BackendError as exc:
            log.warning("provider %s not corrected for request %s (%+d tokens): %s", provider,
                        request_id, delta_tokens, exc)

    def keep_estimate(self, request_id: str, res: Reservation, outcome: str, why: str) -> None:
        """A reservation whose settlement never happened (its charge at the bound was
        refused, or a lost settlement's outcome stayed unknown): its estimate stays charged,
        recorded with its tokens and their price (in the ledger and the durable spend,
        whatever the budget's unit)."""
        rule = self.policy.rule_for(res.tenant)
        unit = rule.budget_unit if rule is not None and rule.limits.budget >= 0 else ""
        inp, out = bound.estimate_tokens(res)
        nano, unpriced = price(self.policy, res.model, Usage(inp, out))
        # (a path's charge is not held: docs/budgets.md)
        spend = SpendRecord(res.model, 1, inp, out, 0, 0, nano)
        self._record_spend(res.tenant, spend, res.period_start_us,
                           res.charged_cost if unit and res.path_charge is None else 0)
        att = _attribution_of(res)
        events.kept(self.ledger, self.policy, request_id, res, outcome, why, inp, out, nano,
                    unpriced, att)
        self.attributed.add(res.tenant, att, spend, day_of(time.time_ns() // 1000),
                            named=rule is not None and bool(rule.name))

    def _record_spend(self, tenant: str, spend: SpendRecord, period_start_us: int = -1,
                      held: int = 0) -> None:
        """The durable spend of a request whose estimate stays charged (no settlement call
        carries it; its charge ``held`` leaves the held part): written in the background,
        never waited on by a decision."""
        async def write() -> None:
            try:
                await self.backend.record_spend(tenant, spend, period_start_us, held)
            except BackendError as exc:
                log.warning("spend of a kept reservation not recorded (tenant %s, model %s, "
                            "%d nano-USD): %s", tenant, spend.model, spend.cost_nano_usd, exc)

        try:
            task = asyncio.get_running_loop().create_task(write())
        except RuntimeError:  # not on the event loop: never in the sidecar itself
            log.error("spend of a kept reservation not recorded (tenant %s): called off the "
                      "event loop", tenant)
            return
        self.track(task)

    def _expired(self, request_id: str, res: Reservation) -> None:
        """No usage came within the reservation's life: charged at the bound."""
        if not self.backend.shares_reservations:
            self._charge_at_bound_soon(request_id, res, "expired", "expiry")
            return

        # Shared reservations: another replica may have settled this one from the shared
        # record (an ext_authz and its usage log or ext_proc stream on different replicas
        # is the usual case); then it wrote the event and the spend, and an expiry here
        # would count the request twice. The record says which: taken, or still ours.
        async def claim() -> None:
            try:
                record = await self.backend.take_reservation(res.tenant, request_id)
            except BackendError as exc:
                record = None
                log.warning("reservation %s of tenant %s expired and the shared record could "
                            "not be read (%s): recorded as expired here", request_id,
                            res.tenant, exc)
            if record != TAKEN_RESERVATION:  # ours (or gone: charged rather than lost)
                await self._charge_at_bound(request_id, res, "expired", "expiry", local=False)

        try:
            task = asyncio.get_running_loop().create_task(claim())
        except RuntimeError:  # not on the event loop: never in the sidecar itself
            self.keep_estimate(request_id, res, "expired", "expiry")
            return
        self.track(task)

    async def release(self, request_id: str, why: str) -> Optional[SettleResult]:
        """The upstream failed without usage: refund the whole reservation."""
        res = self.reservations.get(request_id)
        if res is None:
            return None
        self.metrics.reservations_closed.labels("released_" + why).inc()
        return await self.settle_usage(request_id, res.tenant, res.model, 0, 0, "release")

    async def charge_unread(self, request_id: str, why: str,
                            tenant: Optional[str] = None,
                            body_seen: Optional[str] = None) -> None:
        """No usage will come (client gone, usage missing or unreadable): the request is
        charged at what the provider could have billed (bound.py). A request another
        replica decided is charged from its shared reservation (``tenant``: the decision's
        x-kt-tenant), which that replica then does not charge again at expiry.
        ``body_seen``: the usage filter's view of the whole body (bound.with_body_seen)."""
        res = self.reservations.pop(request_id)
        if (res is None and tenant and valid_tenant(tenant)
                and self.backend.shares_reservations):
            try:
                record = await self.backend.take_reservation(tenant, request_id)
            except BackendError as exc:
                # the deciding replica still holds it: charged at the bound when it expires
                log.warning("shared reservation %s of tenant %s not read (%s): left to the "
                            "replica that decided it", request_id, tenant, exc)
                return
            res = parse_reservation(tenant, record if record != TAKEN_RESERVATION else None)
            if res is not None:
                res = bound.with_body_seen(self.policy, res, body_seen)
                await self._charge_at_bound(request_id, res, "kept", why, local=False)
            return
        if res is not None:
            res = bound.with_body_seen(self.policy, res, body_seen)
            await self._charge_at_bound(request_id, res, "kept", why)

    def abandon(self, request_id: str, why: str, body_seen: Optional[str] = None) -> None:
        """``charge_unread`` in the background, for a caller that cannot wait."""
        res = self.reservations.pop(request_id)
        if res is not None:
            res = bound.with_body_seen(self.policy, res, body_seen)
            self._charge_at_bound_soon(request_id, res, "kept", why)

    # --- a reservation no usage comes for: charged at its bound (bound.py) ----
    async def settle_at_bound(self, request_id: str, res: Reservation, outcome: str,
                              why: str, local: bool = True) -> bool:
        """Settle ``res`` (already out of the book, or taken from another replica's shared
        record: ``local`` False) at the bound, counted as ``bound_<why>`` when the store
        applied it (the answer). ``outcome`` is the ledger's (``kept``, ``expired``), ``why``
        its settled_by. Raises as settle_usage does: each caller has its own fallback."""
        inp, out = bound.tokens(res)
        settled = await self.settle_usage(request_id, res.tenant, res.model, inp, out,
                                          bound.SOURCE, settled_by=why, reservation=res,
                                          outcome=outcome, reservation_local=local)
        if settled.applied:  # else settled before: nothing changed, nothing counted
            self.metrics.reservations_closed.labels("bound_" + why).inc()
        return settled.applied

    async def _charge_at_bound(self, request_id: str, res: Reservation, outcome: str,
                               why: str, local: bool = True) -> None:
        """``settle_at_bound``, never raising: a charge the store refused keeps the
        estimate, recorded (keep_estimate)."""
        try:
            await self.settle_at_bound(request_id, res, outcome, why, local)
        except SettlementPending as exc:
            # sent, its reply lost: the store is asked whether it was applied, and the
            # answer recorded then (settled at the bound; kept, with the estimate, if it
            # never comes)
            log.warning("charge at the bound of request %s of tenant %s not confirmed yet: "
                        "%s", request_id, res.tenant, exc)
            return
        except (UsageError, BackendError) as exc:
            inp, out = bound.tokens(res)
            log.warning("request %s of tenant %s not charged at its bound (%d input, %d "
                        "output tokens): %s; its estimate stays charged", request_id,
                        res.tenant, inp, out, exc)
            self.metrics.reservations_closed.labels("kept_" + why).inc()
            self.keep_estimate(request_id, res, outcome, why)

    def _charge_at_bound_soon(self, request_id: str, res: Reservation, outcome: str,
                              why: str) -> None:
        """``_charge_at_bound`` in the background, for callers that cannot wait (the
        reservation book's expiry, ext_proc's stream end); kept referenced until done."""
        try:
            task = asyncio.get_running_loop().create_task(
                self._charge_at_bound(request_id, res, outcome, why))
        except RuntimeError:  # not on the event loop: never in the sidecar itself
            log.error("request %s of tenant %s not charged at its bound: called off the "
                      "event loop; its estimate stays charged", request_id, res.tenant)
            self.keep_estimate(request_id, res, outcome, why)
            return
        self.track(task)


def _attribution_of(res: Optional[Reservation],
                    carried: Attribution = attribution.NONE) -> Attribution:
    """The decision's attribution, kept in its reservation; else what the access log
    carried (usage without a reservation: RLS, Envoy's own failure mode)."""
    if res is not None and (res.user or res.tags):
        return Attribution(res.user, attribution.split(res.tags))
    return carried
