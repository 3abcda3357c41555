"""The decision service: Request → Decision. One instance per server, shared by
every transport. It knows nothing of Envoy or Redis: it resolves the tenant,
estimates, asks the backend, applies shadow mode and the failure mode, counts."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import msgspec

from sidecar import _core, bound
from sidecar.backends.base import (TAKEN_RESERVATION, Backend, BackendError, BackendOverloaded,
                                   BackendTimeout, Candidate, LateReply, Settlement)
from sidecar.estimate import EstimateError, LengthRequired, estimate
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.spend import SpendRecord
from sidecar.metrics import Metrics
from sidecar.model import (CORE_KINDS, REASON_PROVIDER_FULL, REASON_PROVIDER_QUOTA, Decision,
                           Kind, Request)
from sidecar.policy import schema
from sidecar.policy.load import CompiledPolicy, TenantRule
from sidecar.policy.providers import PRIORITY_RANK
from sidecar.providers import ProviderRouter
from sidecar.queue import AdmissionQueue, Timer
from sidecar.settle_outcome import Settler
from sidecar.usage import ModelPrice, Usage, cost_nano, model_price

log = logging.getLogger("kt.service")
MAX_TENANT_LEN = 128
_STRICTNESS = {"open": 0, "envoy": 1, "closed": 2}


# An unsettled reservation is forgotten after this long, or when this many are open
# (oldest first): its estimate stays charged. A gateway without ext_proc or usage
# reports never settles, so the book must stay small and cheap for the GC.
RESERVATION_TTL_S = 600.0
RESERVATIONS_MAX = 100_000
OTHER_TENANTS = "_other"  # metric label for tenants not named in the policy
OTHER_MODELS = "_other"  # metric label for models outside the policy's tiers and pricing
# The reservation key of a request Envoy's own failure mode let through (no answer of
# ours reached Envoy, so no reservation id did): its x-request-id, under this prefix so it
# can never collide with a reservation id the sidecar made.
REQUEST_ID_KEY = "x-request-id:"


def reservation_key(reservation_id: str, request_id: str) -> str:
    """Where a finished request's reservation is held: under the id the sidecar made
    (x-kt-reservation), else, when Envoy's own failure mode let the request through and
    no answer of ours reached it, under its x-request-id (REQUEST_ID_KEY)."""
    if reservation_id:
        return reservation_id
    return REQUEST_ID_KEY + request_id if request_id else ""


class ReservationIds:
    """Reservation ids the sidecar makes, so a client cannot pick (or replay) the id its
    settlement is keyed by: 96 random bits each, unguessable and unique across replicas
    sharing one Redis. Drawn from a pool of random bytes refilled every 256 ids (one
    `os.urandom` per id would cost more than the rest of the id's handling)."""

    _BATCH = 256

    def __init__(self) -> None:
        self._pool: list[str] = []

    def next(self) -> str:
        try:
            return self._pool.pop()
        except IndexError:
            raw = os.urandom(12 * self._BATCH).hex()
            self._pool.extend(raw[i:i + 24] for i in range(0, len(raw), 24))
            return self._pool.pop()


@dataclass(frozen=True)
class Reservation:
    """What an admitted request was charged, kept until its usage is known."""

    tenant: str
    tier: int
    model: str
    charged_tokens: int
    charged_cost: int
    period_start_us: int
    created_s: float
    model_asked: str = ""  # for the ledger: what the request asked for, and the answer
    decision: str = ""
    provider: str = ""  # the provider charged too (docs/providers.md): settled with it
    # what it is charged at if its usage cannot be read (sidecar/bound.py); output -1:
    # not known when it was made (a late decision reply)
    bound_input: int = 0
    bound_output: int = -1
    # the input a stored conversation may add (a Responses previous_response_id): the
    # bound's input is the larger of this and bound_input (sidecar/bound.py)
    stored_input: int = 0


# a shared reservation's provider field (provider ids are [A-Za-z0-9._-], never "|"), and
# its bound (sidecar/bound.py: "<input>,<output>")
_PROVIDER_FIELD = "p="
_BOUND_FIELD = "b="


def _reservation_record(tier: int, model: str, tokens: int, cost: int, period_start: int,
                        provider: str = "", bound_input: int = 0,
                        bound_output: int = -1, stored_input: int = 0) -> str:
    """A reservation as shared through the backend (model last: it may hold any character).
    Its bound (`b=<input>,<output>`), so the replica that learns its usage cannot be read
    charges it; with providers, the provider charged too (`p=<id>` before the model): the
    replica that settles corrects that provider's bucket and names it in the ledger."""
    head = f"{tier}|{tokens}|{cost}|{period_start}|"
    if bound_output >= 0:
        head += f"{_BOUND_FIELD}{bound_input},{bound_output}" + (
            f",{stored_input}|" if stored_input else "|")
    if provider:
        head += f"{_PROVIDER_FIELD}{provider}|"
    return head + model


def _parse_reservation(tenant: str, record: Optional[str]) -> Optional["Reservation"]:
    if record is None:
        return None
    try:
        tier, tokens, cost, period_start, model = record.split("|", 4)
        bound_input, bound_output, stored_input = 0, -1, 0
        if model.startswith(_BOUND_FIELD) and "|" in model:
            bounds, model = model[len(_BOUND_FIELD):].split("|", 1)
            text_in, text_out, *stored = bounds.split(",", 2)
            bound_input, bound_output = int(text_in), int(text_out)
            stored_input = int(stored[0]) if stored else 0
        provider = ""
        if model.startswith(_PROVIDER_FIELD) and "|" in model:
            provider, model = model[len(_PROVIDER_FIELD):].split("|", 1)
        return Reservation(tenant, int(tier), model, int(tokens), int(cost), int(period_start),
                           time.monotonic(), provider=provider, bound_input=bound_input,
                           bound_output=bound_output, stored_input=stored_input)
    except ValueError:
        log.warning("ignoring a malformed shared reservation for tenant %s: %r", tenant,
                    record[:200])
        return None


class ReservationBook:
    """Reservations by request id, oldest first; bounded in size and age, so none leaks.

    Entries are kept as plain tuples of atomic values: the garbage collector stops
    tracking those, so a full book costs the collector nothing (a dataclass per entry
    made every full collection walk 100,000 objects)."""

    def __init__(self, ttl_s: float = RESERVATION_TTL_S, max_entries: int = RESERVATIONS_MAX,
                 clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._book: OrderedDict[str, tuple] = OrderedDict()
        self.expired = 0
        # told of each reservation forgotten unsettled (the ledger records it as expired)
        self.on_expired: Optional[Callable[[str, Reservation], None]] = None

    def __len__(self) -> int:
        return len(self._book)

    def put(self, request_id: str, tenant: str, tier: int, model: str, charged_tokens: int,
            charged_cost: int, period_start_us: int, created_s: float, model_asked: str = "",
            decision: str = "", provider: str = "", bound_input: int = 0,
            bound_output: int = -1, stored_input: int = 0) -> None:
        self._book[request_id] = (tenant, tier, model, charged_tokens, charged_cost,
                                  period_start_us, created_s, model_asked, decision, provider,
                                  bound_input, bound_output, stored_input)
        self._book.move_to_end(request_id)
        self.expire()

    def open_ids(self) -> list[str]:
        """The ids of the reservations open now, oldest first."""
        return list(self._book)

    def pop(self, request_id: str) -> Optional[Reservation]:
        t = self._book.pop(request_id, None)
        return Reservation(*t) if t is not None else None

    def get(self, request_id: str) -> Optional[Reservation]:
        t = self._book.get(request_id)
        return Reservation(*t) if t is not None else None

    def expire(self) -> int:
        limit = self.clock() - self.ttl_s
        n = 0
        book = self._book
        while book:
            first = next(iter(book.values()))
            if first[6] >= limit and len(book) <= self.max_entries:
                break
            request_id, entry = book.popitem(last=False)
            n += 1
            if self.on_expired is not None:
                self.on_expired(request_id, Reservation(*entry))
        self.expired += n
        return n


class BurstLog:
    """Logs the first of a burst of like events at once, then at most one line per
    ``interval_s`` saying how many more came: a client sending a thousand bad requests
    a second costs one log line a minute, not a thousand tracebacks a second."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock=time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last = -interval_s
        self._suppressed = 0

    def warning(self, msg: str, *args, **kwargs) -> bool:
        """Log (True) or count (False) one event."""
        now = self.clock()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (%d more like it in the %.0f s before, not logged)"
            args = (*args, self._suppressed, now - self._last)
        self._last = now
        self._suppressed = 0
        self.logger.warning(msg, *args, **kwargs)
        return True


class UsageError(ValueError):
    """A usage report that cannot be applied; the message says why."""


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


def _ledger_decision(kind: Kind, downgraded: bool) -> str:
    """How an admitted request was let through, as the ledger records it."""
    if kind in (Kind.ALLOW, Kind.DOWNGRADE):
        return "downgrade" if downgraded else "allow"
    return "shadow"  # a refusal shadow mode let through


def _valid_tenant(t: str) -> bool:
    return 0 < len(t) <= MAX_TENANT_LEN and t.isprintable() and not any(c in t for c in "{}")


class DecisionService:
    def __init__(self, policy: CompiledPolicy, backend: Backend, metrics: Optional[Metrics] = None,
                 ledger: Optional[Ledger] = None, queue_timer: Optional[Timer] = None):
        self.policy = policy
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.reservations = ReservationBook()
        # what was spent, request by request (sidecar/ledger/); Ledger(None) records nothing
        self.ledger = ledger or Ledger(None)
        self.reservations.on_expired = self._ledger_expired
        # settlements, and the outcome of those whose reply was lost (settle_outcome.py)
        self.settler = Settler(backend, lambda outcome: self.metrics.settle_outcomes.labels(
            outcome).inc())
        self.new_reservation_id = ReservationIds().next
        self._children: dict = {}
        self._usage_children: dict = {}
        self._last_failure_log = 0.0
        self._background: set[asyncio.Task] = set()  # late refunds in flight (kept referenced)
        self._tenant_gauges: dict = {}
        # a flood of bad input logs one line per burst, not one per request
        self._unpriced_log = BurstLog(log)
        self.rejected_log = BurstLog(log)
        self.overload_log = BurstLog(log)
        # tenant of recently settled request ids, so a repeated report without a
        # tenant still reaches the backend's idempotency check (bounded, oldest out)
        self._settled_tenant: OrderedDict[str, str] = OrderedDict()
        # provider quotas and the admission queue (docs/providers.md): only with a policy
        # that has them
        self._router: Optional[ProviderRouter] = None
        self.queue: Optional[AdmissionQueue] = None
        self._queue_timer = queue_timer
        self._providers_for(policy)

    def replace_policy(self, policy: CompiledPolicy) -> None:
        self.policy = policy
        self._providers_for(policy)

    def _providers_for(self, policy: CompiledPolicy) -> None:
        self._router = ProviderRouter(policy, self.metrics) if policy.providers else None
        if policy.queue is None:
            self.queue = None  # requests already waiting finish their wait
        elif self.queue is None:
            self.queue = AdmissionQueue(policy.queue, self.metrics, self._queue_timer)
        else:
            self.queue.settings = policy.queue

    def router(self, policy: CompiledPolicy) -> Optional[ProviderRouter]:
        """The provider router of ``policy`` (the one a decision started with)."""
        r = self._router
        if r is not None and r.policy is policy:
            return r
        return ProviderRouter(policy, self.metrics) if policy.providers else None

    async def decide(self, req: Request, transport: str = "authz",
                     caller_wait_s: Optional[float] = None) -> Decision:
        """``caller_wait_s``: how long the caller still waits, when it says (the queue's
        waits end before it)."""
        started = time.perf_counter()
        queue = self.queue
        arrived = queue.timer.now() if queue is not None else 0.0
        decision = await self._decide(req)
        elapsed = time.perf_counter() - started  # the decision alone; a wait is queue_wait
        if queue is not None and transport != "rls" and queue.may_wait(decision):
            # RLS never waits: Envoy's rate-limit filter gives up after 20 ms
            decision = await queue.hold(decision, PRIORITY_RANK.get(decision.priority, 1),
                                        functools.partial(self._decide, req), arrived,
                                        caller_wait_s)
        kind = decision.kind.value if not decision.shadow else "allow"
        # labelled children looked up once: .labels() costs microseconds per call
        children = self._children.get((kind, transport))
        if children is None:
            m = self.metrics
            children = self._children[(kind, transport)] = (
                m.requests.labels(kind, transport), m.latency.labels(transport))
        children[0].inc()
        children[1].observe(elapsed)
        if decision.shadow:
            self.metrics.shadow_denials.labels(decision.kind.value).inc()
        elif not decision.admitted:
            self.ledger.refused(decision.tenant or "-", decision.kind.value)
        return decision

    async def _decide(self, req: Request) -> Decision:
        policy = self.policy  # one policy for the whole decision, even across a reload
        tenant = req.tenant if req.tenant is not None else req.headers.get(policy.tenant_header)
        if tenant is not None:
            tenant = tenant.strip()
        if not tenant:
            if policy.missing_tenant == "deny":
                if policy.tenant_metadata is not None:
                    ns, path = policy.tenant_metadata
                    return Decision(Kind.MISSING_TENANT, message=(
                        f"No tenant: the request has no {ns}:{'.'.join(path)} metadata "
                        "(was it authenticated?)."))
                return Decision(Kind.MISSING_TENANT, message=(
                    f"No tenant: the request carries no {policy.tenant_header!r} header."))
            tenant = "anonymous"
        if not _valid_tenant(tenant):
            return Decision(Kind.BAD_REQUEST, message=(
                f"Malformed tenant in {policy.tenant_header!r}: 1..{MAX_TENANT_LEN} printable "
                "characters without braces expected."))
        rule = policy.rule_for(tenant)
        if rule is None:
            return Decision(Kind.UNKNOWN_TENANT, tenant=tenant,
                            message=f"Unknown tenant {tenant!r}.")
        if not rule.name and not self.backend.has_room_for(tenant):
            # `unknown: defaults` lets clients invent tenant names; the embedded backend
            # holds a bounded number: past it, a new one is refused, never a new state
            self.metrics.tenant_capacity_refusals.inc()
            self.rejected_log.warning("refused tenant %s: the backend holds its maximum of "
                                      "tenants", tenant)
            return Decision(Kind.UNKNOWN_TENANT, tenant=tenant, message=(
                "Tenant capacity reached: this gateway holds its maximum number of tenants "
                "that its policy does not name. Try again later, or ask its operator."))
        try:
            est = estimate(policy, req)
        except LengthRequired as exc:
            return Decision(Kind.LENGTH_REQUIRED, tenant=tenant, message=f"Length required: {exc}.")
        except EstimateError as exc:
            self.rejected_log.warning("refused a malformed request of tenant %s: %s", tenant, exc)
            return Decision(Kind.BAD_REQUEST, tenant=tenant, message=f"Malformed request: {exc}.")
        if (est.model and policy.unpriced_models == "refuse" and policy.pricing
                and est.model not in policy.pricing and est.model not in policy.tier_by_model):
            # the provider would serve and bill it at its own price, which the policy does
            # not know: the dearest listed price can be a small part of it
            self.rejected_log.warning("refused tenant %s's request for unpriced model %r",
                                      tenant, est.model[:100])
            return Decision(Kind.BAD_REQUEST, tenant=tenant, message=(
                f"Model {est.model[:100]!r} is not served by this gateway: its policy has no "
                "price for it."))
        asked = policy.tier_by_model.get(est.model, 0) if est.model else 0
        late = LateReply()
        router = self.router(policy)
        candidates = router.candidates(asked) if router is not None else []
        try:
            if router is None:
                out = await self.backend.decide(tenant, rule.limits, asked, est.input_tokens,
                                                est.output_tokens, est.firm_tokens, rule.shadow,
                                                late)
            else:
                out = await self.backend.decide_routed(
                    tenant, rule.limits, asked, est.input_tokens, est.output_tokens,
                    est.firm_tokens, rule.shadow, rule.priority_rank, router.spill(rule),
                    candidates, late)
        except BackendError as exc:
            if isinstance(exc, BackendOverloaded):
                decision = self._shed(tenant, str(exc))
            else:
                decision = self._failure(tenant, rule, asked, str(exc))
            if isinstance(exc, BackendTimeout):
                key = self._late_key(decision, req)
                late.on_outcome = functools.partial(
                    self._late_outcome, decision.kind, tenant, rule, key,
                    candidates=candidates, input_tokens=est.input_tokens)
            return decision
        except asyncio.CancelledError:
            # the caller stopped waiting (Envoy's own ext_authz timeout cancels the gRPC
            # call) and Envoy's failure mode answered: if Redis applies the decision
            # anyway, it is put right as for the "envoy" failure mode
            late.on_outcome = functools.partial(
                self._late_outcome, Kind.UNAVAILABLE, tenant, rule,
                REQUEST_ID_KEY + req.request_id if req.request_id else "",
                candidates=candidates, input_tokens=est.input_tokens)
            raise
        chosen = router.observe(out, candidates) if router is not None else None
        provider = chosen.provider if chosen is not None else ""
        self._observe(tenant, rule, out)
        if out.budget_limit >= 0:
            self.ledger.budget_seen(tenant, tenant if rule.name else OTHER_TENANTS,
                                    rule.budget_unit, out.budget_limit,
                                    out.budget_limit - out.budget_remaining, out.period_start_us)
        rid = ""
        if out.charged_tokens:
            # keyed by an id of our own, never by one the client sent: a replayed
            # x-request-id must not merge two requests into one settlement
            rid = self.new_reservation_id()
            served = policy.tiers[out.tier].model
            bound_output = bound.output_bound(policy, served, est, out.charged_tokens)
            stored = bound.stored_input_bound(policy, served, est)
            self.reservations.put(rid, tenant, out.tier, served,
                                  out.charged_tokens, out.charged_cost, out.period_start_us,
                                  time.monotonic(), est.model or policy.tiers[asked].model,
                                  _ledger_decision(CORE_KINDS[out.kind], out.tier > asked),
                                  provider, est.input_tokens, bound_output, stored)
            if self.backend.shares_reservations:
                self.backend.share_reservation(tenant, rid, _reservation_record(
                    out.tier, served, out.charged_tokens, out.charged_cost,
                    out.period_start_us, provider, est.input_tokens, bound_output, stored))
        tier = policy.tiers[out.tier]
        kind = CORE_KINDS[out.kind]
        admitted = kind in (Kind.ALLOW, Kind.DOWNGRADE)
        if not admitted and rule.shadow:
            log.info("shadow: tenant=%s would be %s", tenant, kind.value)
        reason = ""
        if out.reason == _core.R_PROVIDER:
            reason = REASON_PROVIDER_FULL if admitted else REASON_PROVIDER_QUOTA
        return Decision(kind, tenant=tenant, tier=tier.name, model=tier.model,
                        priority=rule.priority, outcome=out, shadow=not admitted and rule.shadow,
                        downgraded=out.tier > asked, budget_unit=rule.budget_unit,
                        reservation_id=rid, provider=provider, reason=reason)

    def expire_reservations(self) -> int:
        """Close reservations past their age now (a timer calls this: a decision does it
        too, but a quiet sidecar must still close them on time). Each is charged at its
        bound, and counted then (bound.charge: bound_expiry)."""
        return self.reservations.expire()

    def _late_key(self, decision: Decision, req: Request) -> str:
        """Where a timed-out decision that Redis applies after all is kept: under the
        reservation id a fail-open answer carried to Envoy, or, when Envoy's own failure
        mode answered (no id reached it), under the request's x-request-id."""
        if decision.reservation_id:
            return decision.reservation_id
        return REQUEST_ID_KEY + req.request_id if req.request_id else ""

    def _failure(self, tenant: str, rule: TenantRule, asked: int, error: str) -> Decision:
        """The backend could not decide: the configured failure mode answers, never silently."""
        self.metrics.backend_errors.labels(self.backend.name).inc()
        mode = self.failure_mode_for(rule)
        self.metrics.failure_mode.labels(mode).inc()
        now = time.monotonic()
        if now - self._last_failure_log >= 1.0:  # an outage must not flood the log
            self._last_failure_log = now
            log.warning("backend error, failure mode %s (tenant %s; further errors this second "
                        "are only counted in kt_backend_errors_total): %s", mode, tenant, error)
        tier = self.policy.tiers[asked]
        if mode == "open":
            # an id for the usage of a request that goes on: a late reply is held under it;
            # Envoy routes on the provider: name one
            router = self.router(self.policy)
            return Decision(Kind.FAIL_OPEN, tenant=tenant, tier=tier.name, model=tier.model,
                            priority=rule.priority, message=error,
                            reservation_id=self.new_reservation_id(),
                            provider=router.first(asked) if router is not None else "")
        if mode == "closed":
            return Decision(Kind.FAIL_CLOSED, tenant=tenant, message=(
                "The rate limiter is unavailable and this tenant's limits fail closed. "
                "Try again shortly."))
        return Decision(Kind.UNAVAILABLE, tenant=tenant, message=f"limiter backend: {error}")

    def _shed(self, tenant: str, error: str) -> Decision:
        """The store answered, but not this decision in time: this sidecar is overloaded.
        Refused with its own answer (503 limiter_overloaded, counted as kt_requests_total
        {decision="overloaded"}), never by the failure mode, which would switch the limits
        off (open) or blame the store (closed)."""
        self.overload_log.warning("overloaded: a decision for tenant %s was not made in time "
                                  "and is refused (503 limiter_overloaded): %s", tenant, error)
        return Decision(Kind.OVERLOADED, tenant=tenant, message=(
            "The rate limiter is overloaded and could not decide in time. Try again shortly."))

    def _late_outcome(self, answered: Kind, tenant: str, rule: TenantRule, request_id: str,
                      out: _core.Outcome, candidates: Sequence[Candidate] = (),
                      input_tokens: int = 0) -> None:
        """Redis applied a decision after it timed out and the failure mode had answered.
        The charge it made is right only if the request went on: refund it when the
        sidecar itself refused the request (fail closed); keep it, as the request's
        reservation, when the request went on (fail open; a usage report already on its
        way is settled after this reply, on the same link, and finds it: settle_usage);
        when Envoy's own failure mode decided, whether the request went on is unknown
        here, so keep it as a reservation too: a refund could lose spend, a charge cannot,
        and usage, if the request went on, replaces it instead of adding to it."""
        action = "kept"
        if not (out.charged_tokens or out.charged_cost):
            action = "nothing_charged"
        elif answered in (Kind.FAIL_CLOSED, Kind.OVERLOADED):
            self._refund_late(tenant, rule, out.charged_tokens, out.charged_cost,
                              out.period_start_us)
            if 0 <= out.provider < len(candidates):  # and the provider's request and tokens
                self._refund_provider(candidates[out.provider], out.charged_tokens, 1)
            return
        elif (answered in (Kind.FAIL_OPEN, Kind.UNAVAILABLE) and request_id
              and out.tier < len(self.policy.tiers)):
            provider = candidates[out.provider].provider if 0 <= out.provider < len(
                candidates) else ""
            # no bound (bound_output -1): without usage it stays at this charge, split as
            # the estimate was (``input_tokens``), for the ledger (sidecar/bound.py)
            self.reservations.put(request_id, tenant, out.tier, self.policy.tiers[out.tier].model,
                                  out.charged_tokens, out.charged_cost, out.period_start_us,
                                  time.monotonic(), provider=provider, bound_input=input_tokens)
        self.metrics.late_replies.labels(action).inc()

    def _refund_late(self, tenant: str, rule: TenantRule, tokens: int, cost: int,
                     period_start_us: int) -> None:
        async def refund() -> None:
            try:
                # a fresh id: this refund is applied once, never mistaken for a usage report
                await self.backend.settle(tenant, rule.limits, f"late-refund:{uuid.uuid4().hex}",
                                          -tokens, -cost, period_start_us)
            except BackendError as exc:
                log.warning("could not refund a late decision for tenant %s (%d tokens, %d "
                            "nano-units stay charged): %s", tenant, tokens, cost, exc)
                self.metrics.late_replies.labels("refund_failed").inc()
                return
            self.metrics.late_replies.labels("refunded").inc()

        task = asyncio.get_running_loop().create_task(refund())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _refund_provider(self, c: Candidate, tokens: int, requests: int) -> None:
        """Give a provider back what a decision that did not stand charged it."""
        async def refund() -> None:
            try:
                await self.backend.settle_provider(c.provider, c.quota,
                                                   f"late-refund:{uuid.uuid4().hex}",
                                                   -tokens, -requests)
            except BackendError as exc:
                log.warning("could not give provider %s back a late decision's request and "
                            "%d tokens (they refill): %s", c.provider, tokens, exc)

        task = asyncio.get_running_loop().create_task(refund())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def failure_mode_for(self, rule: TenantRule) -> str:
        """The strictest mode among the classes of limit this tenant has (closed > envoy > open)."""
        backend = self.policy.backend
        if not isinstance(backend, schema.RedisBackend):
            return "closed"  # the embedded backend has no outage to be open about
        fm = backend.failure_mode
        if isinstance(fm, str):
            return fm
        lim = rule.limits
        modes = []
        if lim.rpm > 0 or lim.tpm > 0:
            modes.append(fm.rate_limits)
        if lim.budget >= 0:
            modes.append(fm.budgets)
        if not modes:
            return "open"
        return max(modes, key=_STRICTNESS.__getitem__)

    def _observe(self, tenant: str, rule: TenantRule, out: _core.Outcome) -> None:
        if not rule.name:  # unknown tenants share the defaults: no per-tenant series
            return
        gauges = self._tenant_gauges.get(tenant)
        if gauges is None:
            gauges = self._tenant_gauges[tenant] = [None, None, None, None]
        # a series exists only for a limit the tenant has: a tenant without a budget must
        # not export kt_budget_remaining 0, which any low-budget alert would fire on
        if out.limit_tokens > 0:
            if gauges[0] is None:
                gauges[0] = self.metrics.tokens_remaining.labels(tenant)
            gauges[0].set(out.remaining_tokens)
        if out.budget_limit >= 0:
            if gauges[1] is None:
                gauges[1] = self.metrics.budget_remaining.labels(tenant, rule.budget_unit)
                gauges[2] = self.metrics.budget_limit.labels(tenant, rule.budget_unit)
            scale = 1e9 if rule.budget_unit == "usd" else 1
            gauges[1].set(out.budget_remaining / scale)
            gauges[2].set(out.budget_limit / scale)
            # the period's end as a Unix time (whole seconds: it moves only when a period
            # starts); a `total` budget has no end and no series
            if out.budget_reset_us > 0:
                if gauges[3] is None:
                    gauges[3] = self.metrics.budget_period_end.labels(tenant)
                gauges[3].set(round(time.time() + out.budget_reset_us / 1e6))

    # --- usage: reconcile reservations with what the model really used -------
    async def settle_usage(self, request_id: str, tenant: Optional[str], model: Optional[str],
                           input_tokens: int, output_tokens: int,
                           source: str = "report", cached_tokens: int = 0,
                           cache_write_tokens: int = 0,
                           settled_by: Optional[str] = None,
                           settle_id: Optional[str] = None,
                           reservation: Optional[Reservation] = None,
                           outcome: str = "settled",
                           reservation_local: bool = True) -> SettleResult:
        """Replace a request's reserved estimate by its actual usage, once per (tenant, id).

        ``request_id`` names the reservation (the id the sidecar made, `x-kt-reservation`);
        ``settle_id``, when given, is the idempotency key instead (ext_proc settles a
        request it holds no reservation id for under a fresh one: it never retries, and
        a client's x-request-id must not make two requests one).
        ``input_tokens`` counts every input token; ``cached_tokens`` and
        ``cache_write_tokens`` of them are priced at the model's cache prices.
        ``settled_by`` names how the usage was read, for the ledger (default: ``source``).
        ``reservation``: one already taken out of the book or the shared record (a charge
        at the bound, sidecar/bound.py; ``reservation_local``: from this sidecar's book),
        settled as it is; ``outcome`` its ledger outcome.
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
        if not tenant or not _valid_tenant(tenant):
            raise UsageError("unknown request id and no valid tenant given")
        if res is None and self.backend.shares_reservations:
            # decided by another replica: its reservation, if it shared one (and no
            # replica took it before)
            record = await self.backend.take_reservation(tenant, request_id)
            res = _parse_reservation(tenant, record if record != TAKEN_RESERVATION else None)
        rule = policy.rule_for(tenant)
        if rule is None:
            raise UsageError(f"unknown tenant {tenant!r}")
        model = model or (res.model if res is not None else policy.tiers[0].model)
        nano, unpriced = self._price(model, Usage(input_tokens, output_tokens, cached_tokens,
                                                  cache_write_tokens))
        cost = nano if rule.budget_unit == "usd" else input_tokens + output_tokens
        charged_tokens = res.charged_tokens if res is not None else 0
        charged_cost = res.charged_cost if res is not None else 0
        period_start = res.period_start_us if res is not None else -1
        delta_tokens = input_tokens + output_tokens - charged_tokens
        delta_cost = cost - charged_cost if rule.limits.budget >= 0 else 0
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
            unpriced, delta_tokens)
        # the key is this sidecar's alone (its reservation, an id it made: found settled
        # after a lost reply, it was this settlement) unless a usage report named it
        # without a reservation here: a reporter's own id, which an earlier report of the
        # same request may have settled
        ours = res is not None or settle_id is not None or source != "report"
        try:
            st = await self.settler.settle(
                tenant, rule.limits, settle_id or request_id, delta_tokens, delta_cost,
                period_start, spend, ours=ours,
                on_resolved=recorded,
                on_unknown=functools.partial(self._settlement_unknown, request_id, res))
        except BackendError:
            # not put back in the book, where it would expire as kept: the settlement may
            # have been applied, and its outcome is read from the store
            # (sidecar/settle_outcome.py), then recorded by _record_settlement
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
                                 st: Settlement) -> None:
        """What follows a settlement the store applied (or found settled before): the
        provider's correction, metrics, the ledger's event. Also run later, for a
        settlement whose reply was lost, once the store confirmed its outcome."""
        policy = self.policy
        self._settled_tenant[request_id] = tenant
        if len(self._settled_tenant) > RESERVATIONS_MAX:
            self._settled_tenant.popitem(last=False)
        if st.applied and res is not None and res.provider:
            await self._settle_provider(request_id, res.provider, delta_tokens)
        if res is None and st.applied:
            # a late decision reply (fail open, or Envoy's failure mode) that came in while
            # this settled (both on one link, in order) left a reservation for a request
            # just charged in full
            late = self.reservations.pop(request_id)
            if late is not None:
                self._refund_late(tenant, rule, late.charged_tokens, late.charged_cost,
                                  late.period_start_us)
        m = self.metrics
        # labels stay bounded whatever a report or an upstream's reply names: tenants
        # and models the policy does not name are one series each
        label = tenant if rule.name else OTHER_TENANTS
        model_label = (model if model in policy.pricing or model in policy.tier_by_model
                       else OTHER_MODELS)
        if st.applied:
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
        if st.applied:
            self._ledger_settled(request_id, tenant, rule, res, model, outcome,
                                 settled_by, input_tokens, output_tokens,
                                 cached_tokens, cache_write_tokens, nano, cost, unpriced,
                                 st.budget_spent, st.at_us)

    def _settlement_unknown(self, request_id: str, res: Optional[Reservation]) -> None:
        """A settlement the store never confirmed nor denied: the estimate stays charged."""
        if res is not None:
            self.metrics.reservations_closed.labels("kept_settle_unknown").inc()
            self.keep_estimate(request_id, res, "kept", "settle_unknown")

    def upstream_answered(self, provider: str, status: int) -> None:
        """Count an upstream response ext_proc saw, by provider and status (a provider's own
        429s): with providers in the policy only. Both labels are bounded: a provider id
        the policy does not know (a header the sidecar did not set) counts as "unknown"."""
        router = self._router
        if router is None:
            return
        label = provider if router.known(provider) else ("none" if not provider else "unknown")
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

    def _price(self, model: str, usage: Usage) -> tuple[int, bool]:
        """(nano-USD, unpriced) of the usage: an unpriced model is never free (docs/usage.md)."""
        price = self.policy.pricing.get(model)
        if price is not None:
            return cost_nano(usage, model_price(price)), False
        inp, out = self.policy.dearest_price()
        return cost_nano(usage, ModelPrice(inp, out, inp, inp)), True

    # --- the ledger: one event per reservation closed (sidecar/ledger/) ------
    @staticmethod
    def _decided_us(res: Optional[Reservation], settled_us: int = 0) -> int:
        """When the reservation was made, on the clock of ``settled_us`` (the backend's,
        when known; else this host's wall clock): the event's two instants on one clock."""
        if res is None:
            return 0
        now = settled_us or time.time_ns() // 1000
        return now - int((time.monotonic() - res.created_s) * 1e6)

    def _ledger_settled(self, request_id: str, tenant: str, rule: TenantRule,
                        res: Optional[Reservation], model: str, outcome: str, settled_by: str,
                        input_tokens: int, output_tokens: int, cached_tokens: int,
                        cache_write_tokens: int, nano: int, cost: int, unpriced: bool,
                        budget_spent: int, settled_us: int = 0) -> None:
        """``settled_us``: the backend's clock when it applied the settlement (0: not
        known), which dated the durable spend: the event takes it, so the PostgreSQL
        roll-up and `kt spend` put the request on the same UTC day."""
        has_budget = rule.limits.budget >= 0
        self.ledger.closed(
            request_id=request_id, tenant=tenant, outcome=outcome,
            settled_by=settled_by, decided_us=self._decided_us(res, settled_us),
            settled_us=settled_us,
            model_asked=res.model_asked if res is not None else "",
            model_served=model, tier=self.policy.tiers[res.tier].name
            if res is not None and res.tier < len(self.policy.tiers) else "",
            provider=res.provider if res is not None else "",
            decision=res.decision if res is not None else "",
            estimate_tokens=res.charged_tokens if res is not None else 0,
            input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens,
            cache_write_tokens=cache_write_tokens, cost_nano_usd=nano,
            budget_unit=rule.budget_unit if has_budget else "",
            budget_charge=cost if has_budget else 0, unpriced=unpriced)
        if has_budget and budget_spent >= 0 and res is not None:
            self.ledger.budget_seen(tenant, tenant if rule.name else OTHER_TENANTS,
                                    rule.budget_unit, rule.limits.budget, budget_spent,
                                    res.period_start_us)

    def keep_estimate(self, request_id: str, res: Reservation, outcome: str, why: str) -> None:
        """A reservation whose settlement never happened (its charge at the bound was
        refused, or a lost settlement's outcome stayed unknown): its estimate stays charged,
        recorded with its tokens and their price (in the ledger and the durable spend,
        whatever the budget's unit)."""
        rule = self.policy.rule_for(res.tenant)
        unit = rule.budget_unit if rule is not None and rule.limits.budget >= 0 else ""
        inp, out = bound.estimate_tokens(res)
        nano, unpriced = self._price(res.model, Usage(inp, out))
        self._record_spend(res.tenant, SpendRecord(res.model, 1, inp, out, 0, 0, nano),
                           res.period_start_us, res.charged_cost if unit else 0)
        self.ledger.closed(
            request_id=request_id, tenant=res.tenant, outcome=outcome, settled_by=why,
            decided_us=self._decided_us(res), model_asked=res.model_asked,
            model_served=res.model, tier=self.policy.tiers[res.tier].name
            if res.tier < len(self.policy.tiers) else "", provider=res.provider,
            decision=res.decision, estimate_tokens=res.charged_tokens, input_tokens=inp,
            output_tokens=out, cost_nano_usd=nano, budget_unit=unit,
            budget_charge=res.charged_cost if unit else 0, unpriced=unpriced)

    def track(self, task: asyncio.Task) -> None:
        """Keep a background task referenced until it is done."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _ledger_expired(self, request_id: str, res: Reservation) -> None:
        """No usage came within the reservation's life: charged at the bound."""
        if not self.backend.shares_reservations:
            bound.charge_soon(self, request_id, res, "expired", "expiry")
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
                await bound.charge(self, request_id, res, "expired", "expiry", local=False)

        try:
            task = asyncio.get_running_loop().create_task(claim())
        except RuntimeError:  # not on the event loop: never in the sidecar itself
            self.keep_estimate(request_id, res, "expired", "expiry")
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        charged at what the provider could have billed (sidecar/bound.py). A request
        another replica decided is charged from its shared reservation (``tenant``: the
        decision's x-kt-tenant), which that replica then does not charge again at expiry.
        ``body_seen``: the usage filter's view of the whole body (bound.with_body_seen)."""
        res = self.reservations.pop(request_id)
        if (res is None and tenant and _valid_tenant(tenant)
                and self.backend.shares_reservations):
            try:
                record = await self.backend.take_reservation(tenant, request_id)
            except BackendError as exc:
                # the deciding replica still holds it: charged at the bound when it expires
                log.warning("shared reservation %s of tenant %s not read (%s): left to the "
                            "replica that decided it", request_id, tenant, exc)
                return
            res = _parse_reservation(tenant, record if record != TAKEN_RESERVATION else None)
            if res is not None:
                res = bound.with_body_seen(self.policy, res, body_seen)
                await bound.charge(self, request_id, res, "kept", why, local=False)
            return
        if res is not None:
            res = bound.with_body_seen(self.policy, res, body_seen)
            await bound.charge(self, request_id, res, "kept", why)

    def abandon(self, request_id: str, why: str, body_seen: Optional[str] = None) -> None:
        """``charge_unread`` in the background, for a caller that cannot wait."""
        res = self.reservations.pop(request_id)
        if res is not None:
            res = bound.with_body_seen(self.policy, res, body_seen)
            bound.charge_soon(self, request_id, res, "kept", why)
