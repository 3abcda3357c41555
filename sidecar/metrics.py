"""Every Prometheus metric of the sidecar, defined once, on a registry per server
(so tests can run several servers in one process)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sidecar.upstream_sli import UpstreamSLIs

# Decisions take microseconds in process and ~1 ms over Redis: buckets from 50 µs to 250 ms.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015,
                   0.02, 0.05, 0.1, 0.25)
# queue waits: up to queue.max_wait_ms (at most 60 s)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class RecentCount:
    """Events over the last ``window_s`` seconds, in one-second slots: an add is two list
    writes, whatever the rate (an outage sends every decision through it)."""

    def __init__(self, window_s: int = 60, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_s
        self.clock = clock
        self._second = [-1] * window_s
        self._count = [0] * window_s

    def add(self, n: int = 1) -> None:
        now = int(self.clock())
        slot = now % self.window
        if self._second[slot] != now:
            self._second[slot], self._count[slot] = now, 0
        self._count[slot] += n

    def total(self) -> int:
        now = int(self.clock())
        return sum(c for s, c in zip(self._second, self._count, strict=True)
                   if now - s < self.window)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kt_requests", "Decisions made, by decision (allow, downgrade, rate_limited, "
            "budget_exhausted, too_large, unknown_tenant, missing_tenant, bad_request, fail_open, "
            "fail_closed, unavailable, overloaded) and transport.", ["decision", "transport"], registry=r)
        self.shadow_denials = Counter(
            "kt_shadow_denials", "Requests shadow mode let through that would have been refused.",
            ["decision"], registry=r)
        self.tenant_capacity_refusals = Counter(
            "kt_tenant_capacity_refusals", "Requests of tenants the policy does not name refused "
            "because the embedded backend holds backend.max_tenants tenants already (answered "
            "403 unknown_tenant; docs/embedded.md).", registry=r)
        self.latency = Histogram(
            "kt_decision_latency_seconds", "Time to decide one request, inside the sidecar.",
            ["transport"], buckets=LATENCY_BUCKETS, registry=r)
        # one family, two kinds of series: {tenant} and {provider} (docs/providers.md)
        self.tokens_remaining = Gauge(
            "kt_tokens_remaining", "Tokens left in the tenant's TPM bucket after its last decision "
            "(tenants named in the policy only, to bound cardinality), or in a provider's TPM "
            "bucket after this sidecar's last decision for it.", ["tenant"], registry=None)
        self.provider_tokens_remaining = Gauge(
            "kt_tokens_remaining", "", ["provider"], registry=None)
        r.register(_OneFamily(self.tokens_remaining, self.provider_tokens_remaining))
        self.budget_remaining = Gauge(
            "kt_budget_remaining", "Budget left in the current period after the tenant's last "
            "decision, in the budget's unit (tokens or USD).", ["tenant", "unit"], registry=r)
        self.budget_limit = Gauge(
            "kt_budget_limit", "The tenant's budget for one period, in the budget's unit "
            "(tokens or USD), as of its last decision.", ["tenant", "unit"], registry=r)
        self.budget_period_end = Gauge(
            "kt_budget_period_end_timestamp_seconds", "When the tenant's current budget period "
            "ends (Unix time; no series for a `total` budget): with kt_budget_remaining and the "
            "spend rate, the burn-rate alerts project whether the budget lasts the period.",
            ["tenant"], registry=r)
        self.backend_errors = Counter(
            "kt_backend_errors", "Decisions the backend could not make (then the failure mode "
            "applies).", ["backend"], registry=r)
        self.failure_mode = Counter(
            "kt_failure_mode_decisions", "Decisions made by a failure mode instead of the backend.",
            ["mode"], registry=r)
        self.policy_reloads = Counter(
            "kt_policy_reloads", "Policy reload attempts, by result (ok, error).", ["result"],
            registry=r)
        self.policy_info = Gauge(
            "kt_policy_info", "The policy being served (value 1).", ["source", "digest"], registry=r)
        # the management API's overlay of holders (sidecar/overlay_sync.py)
        self.overlay_applied = Counter(
            "kt_overlay_changes", "Overlay versions of the management API read from its store, "
            "by result: ok (served here), error (not served: the store did not answer, or the "
            "overlay does not compile over the policy file; the last good one still serves).",
            ["result"], registry=r)
        self.overlay_version = Gauge(
            "kt_overlay_version", "The management API overlay's version served here (0: none).",
            registry=r)
        self.overlay_set_aside = Gauge(
            "kt_overlay_holders_set_aside", "Holders whose overlay block does not compile over "
            "this sidecar's policy file, refused here until it does (docs/budgets.md).",
            registry=r)
        self.tokens_total = Counter(
            "kt_tokens", "Actual tokens used, from responses and usage reports, by tenant "
            "(named tenants; others as _other), model and type (input, output; cached_input: "
            "the part of input the provider read from its prompt cache, already in input).",
            ["tenant", "model", "type"], registry=r)
        self.cost_dollars = Counter(
            "kt_cost_dollars", "Actual cost in USD priced with the policy's pricing, by tenant "
            "and model.", ["tenant", "model"], registry=r)
        self.unpriced_tokens = Counter(
            "kt_unpriced_tokens", "Tokens of models missing from `pricing`, charged at the "
            "dearest listed price (never as free).", ["model"], registry=r)
        self.settlements = Counter(
            "kt_settlements", "Reservations settled, by source (ext_proc, "
            "access_log, report: actual usage; release: refunded; bound: usage unreadable, "
            "charged at the provider's bound).", ["source"], registry=r)
        self.reservations_closed = Counter(
            "kt_reservations_closed", "Reservations closed without usage, by outcome "
            "(released_upstream_error: refunded; bound_abandoned, bound_no_usage, bound_expiry: "
            "charged at what the provider could have billed; kept_*: that charge failed, the "
            "estimate stays charged).", ["outcome"], registry=r)
        self.settle_outcomes = Counter(
            "kt_settle_outcomes", "Settlements whose reply was lost (the store stalled, the "
            "link dropped), by what the store said once it answered again "
            "(sidecar/settlement/resend.py): applied (its idempotency marker was there: "
            "recorded as settled), resent (it was not: sent again), settled_before (a key "
            "not this sidecar's alone, found settled), unknown (no answer in 10 minutes, or "
            "the sidecar stopped first: the estimate stays charged).", ["outcome"], registry=r)
        self.usage_log_entries = Counter(
            "kt_usage_log_entries", "Entries of Envoy's usage access log handled (one per "
            "admitted request: settled, released or kept; docs/usage.md).", registry=r)
        self.usage_log_streams = Gauge(
            "kt_usage_log_streams", "Envoy access-log streams open to this sidecar (one per "
            "Envoy worker when usage comes by the access log; 0 means usage is not arriving).",
            registry=r)
        self.late_replies = Counter(
            "kt_backend_late_replies", "Redis decisions whose reply came after the timeout "
            "(answered by the failure mode meanwhile), by what was done with the charge Redis "
            "applied: refunded (the sidecar refused the request: fail closed), kept (the "
            "request went on: fail open, held as its reservation; or Envoy's own failure mode "
            "decided, unknown here), refund_failed, nothing_charged.", ["action"], registry=r)
        self.auth_failures = Counter(
            "kt_auth_failures", "Calls refused for a missing or wrong credential, by listener "
            "(grpc, grpc_usage, http_authz, admin).", ["listener"], registry=r)
        self.token_rate_anomalies = Counter(
            "kt_token_rate_anomalies", "Tenants flagged for settling tokens at many times "
            "their own usual rate (policy `anomaly:`, sidecar/anomaly.py), counted when a flag "
            "starts (tenants not named in the policy as _other).", ["tenant"], registry=r)
        self.token_rate_flagged = Gauge(
            "kt_token_rate_flagged_tenants", "Tenants flagged now for a token-rate anomaly "
            "(policy `anomaly:`, sidecar/anomaly.py): 1 while a named tenant is flagged, 0 "
            "once it clears (tenants not named in the policy counted together as _other; "
            "with --workers, one per worker that flags it).",
            ["tenant"], registry=r)
        self.token_rate_refusals = Counter(
            "kt_token_rate_refusals", "Requests of flagged tenants refused or downgraded by "
            "the policy's `anomaly.action`, by action.", ["action"], registry=r)
        # attribution (sidecar/attribution.py): bounded labels only, never a user or a tag
        self.attribution_dropped = Counter(
            "kt_attribution_dropped", "End-user ids and tags refused where they enter (too "
            "long, a character outside their set, tags past the count), by field and why: the "
            "request goes on without them.", ["field", "why"], registry=r)
        self.attribution_spend_other = Counter(
            "kt_attribution_spend_other", "Users and tags whose spend went to the `_other` "
            "cell: their tenant's day already named the most this sidecar keeps, by dimension.",
            ["dimension"], registry=r)
        self.backend_ready = Gauge(
            "kt_backend_ready", "1 when the backend answers, 0 when decisions fall back to the "
            "failure mode.", ["backend"], registry=r)

        # --- provider quotas and the admission queue (docs/providers.md) ---------------
        self.provider_requests = Counter(
            "kt_provider_requests", "Requests admitted to a provider, by decision (allow, "
            "downgrade), and refused by provider quota (rate_limited, too_large: counted "
            "against the first provider that refused).", ["provider", "decision"], registry=r)
        self.provider_requests_remaining = Gauge(
            "kt_provider_requests_remaining", "Requests left in a provider's RPM bucket after "
            "this sidecar's last decision for it.", ["provider"], registry=r)
        self.provider_limit = Gauge(
            "kt_provider_limit", "A provider's configured limit (requests_per_minute, "
            "tokens_per_minute, requests_per_day).", ["provider", "limit"], registry=r)
        self.provider_utilisation = Gauge(
            "kt_provider_utilisation", "Share of a provider's bucket in use after this "
            "sidecar's last decision for it (0..1), by limit (requests, tokens).",
            ["provider", "limit"], registry=r)
        self.upstream_responses = Counter(
            "kt_upstream_responses", "Upstream responses ext_proc saw, by provider and HTTP "
            "status: a provider's own 429s show here.", ["provider", "status"], registry=r)
        # latency, time to first byte, tokens per second, sizes (sidecar/upstream_sli.py)
        self.upstream_slis = UpstreamSLIs()
        r.register(self.upstream_slis)
        self.queue_depth = Gauge(
            "kt_request_queue_depth", "Requests waiting in the admission queue of this sidecar "
            "process.", registry=r)
        self.queue_wait = Histogram(
            "kt_queue_wait_seconds", "Time requests spent in the admission queue, by result "
            "(admitted, rejected).", ["result"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.queue_rejections = Counter(
            "kt_queue_rejections", "Requests answered 429 by the admission queue, by reason "
            "(full: no place; tenant_share: the tenant holds its share of the places; "
            "preempted: its place went to a higher priority; wait_too_long: the bucket has "
            "no room within max_wait_ms).",
            ["reason"], registry=r)
        # failure-mode decisions over the last minute, for `kt status` (not exported: the
        # counter above is; a rate is Prometheus's to compute)
        self.failure_mode_recent = RecentCount(60)
        # Counters whose label values are a fixed set start at 0, so a scrape shows them
        # before the first event and an alert's increase() sees that first event (a
        # series born at 1 reads as no increase) — Prometheus's "avoid missing metrics".
        for mode in ("open", "closed", "envoy"):
            self.failure_mode.labels(mode)
        for result in ("ok", "error"):
            self.policy_reloads.labels(result)
            self.overlay_applied.labels(result)
        for action in ("refunded", "kept", "refund_failed", "nothing_charged"):
            self.late_replies.labels(action)
        for outcome in ("applied", "resent", "settled_before", "unknown"):
            self.settle_outcomes.labels(outcome)
        for outcome in ("released_upstream_error", "bound_abandoned", "bound_no_usage",
                        "bound_expiry", "bound_shutdown"):
            self.reservations_closed.labels(outcome)

    def watch_backend(self, backend) -> None:
        """Export the backend's own counters (round trips and decisions), read at scrape time."""
        self.registry.register(_BackendCollector(backend))
        self.backend_errors.labels(backend.name)  # at 0 from the start (see __init__)

    def watch_ledger(self, ledger) -> None:
        """Export the ledger's counters (sidecar/ledger/), read at scrape time."""
        self.registry.register(_LedgerCollector(ledger))


class _OneFamily:
    """Gauges of one name with different labels, exported as one family (a registry holds
    one collector per name)."""

    def __init__(self, *gauges: Gauge) -> None:
        self.gauges = gauges

    def collect(self):
        families = [f for g in self.gauges for f in g.collect()]
        first = families[0]
        for f in families[1:]:
            first.samples.extend(f.samples)
        yield first


class _LedgerCollector:
    """The ledger's writer and budget thresholds, read at scrape time (no work per event)."""

    STATES = ("accepted", "written", "spilled", "replayed", "dead_lettered", "lost")

    def __init__(self, ledger) -> None:
        self.ledger = ledger

    def collect(self):
        ev = self.ledger.events
        states = CounterMetricFamily(
            "kt_ledger_events", "Ledger events by state: accepted (handed to the writer), "
            "written (by the sink, replays included), spilled (to the local spill file while "
            "the sink failed), replayed (from the spill), dead_lettered (refused by the sink, "
            "or unstorable: set aside with the reason in the dead-letter file), lost (buffer "
            "full, spill or dead-letter file failing or full, a spilled line torn by a crash).",
            labels=["state"])
        buffered = GaugeMetricFamily("kt_ledger_buffered_events",
                                     "Events in memory waiting for the writer thread.")
        up = GaugeMetricFamily("kt_ledger_sink_up", "1 while the ledger's sink takes events, "
                               "0 while they spill.", labels=["sink"])
        spill = GaugeMetricFamily("kt_ledger_spill_bytes", "Bytes of events waiting in the "
                                  "spill file for the sink (bounded by ledger.spill_max_mb).")
        timeouts = CounterMetricFamily(
            "kt_ledger_sink_timeouts", "Sink calls abandoned at ledger.sink_timeout_s (a hung "
            "sink); their events spilled.", labels=["sink"])
        ready = GaugeMetricFamily(
            "kt_ledger_ready", "0 for a minute after a ledger event was lost (the books are "
            "not being written: /readyz fails too), else 1.")
        if ev is not None:
            for state in self.STATES:
                states.add_metric([state], ev.lost_total if state == "lost"
                                  else getattr(ev, state))
            buffered.add_metric([], ev.buffered)
            up.add_metric([ev.sink.name], 0 if ev.last_error else 1)
            spill.add_metric([], ev.spill.waiting_bytes())
            timeouts.add_metric([ev.sink.name], ev.caller.timeouts)
        ready.add_metric([], 1 if self.ledger.status()[0] else 0)
        crossings = CounterMetricFamily(
            "kt_budget_thresholds_crossed", "Budget fractions reached for the first time in a "
            "period (tenants not named in the policy as _other).", labels=["tenant", "fraction"])
        for (label, fraction), n in sorted(self.ledger.crossings.items()):
            crossings.add_metric([label, f"{fraction:g}"], n)
        yield from (states, buffered, up, spill, timeouts, ready, crossings)


@dataclass(frozen=True, slots=True)
class LeaseStats:
    """Capacity leases (sidecar/backends/redis/lease.py): leases by event since start, the
    decisions made within them, and those held now."""

    taken: int
    refused: int
    returned: int
    reported: int
    failed: int
    local_decisions: int
    held: int


@dataclass(frozen=True, slots=True)
class StateFileStats:
    """The embedded backend's state file: failed writes by what (snapshot, journal), and
    how long the last snapshot took."""

    write_failures: Mapping[str, int]
    snapshot_seconds: float


@dataclass(frozen=True, slots=True)
class BackendStats:
    """What a backend counts, read at scrape time (``Backend.stats()``, backends/base.py):
    declared here, where it is read. A field left None is something this backend does not
    keep: its metric family is not exported."""

    round_trips: int = 0  # one pipeline (one write) = one round trip
    decisions: int = 0
    connection_attempts: Optional[tuple[int, int]] = None  # (opened, failed)
    expired_decisions: Optional[int] = None  # refused by the store past their deadline
    store_resets: Optional[int] = None  # times the shared store lost its data
    leases: Optional[LeaseStats] = None
    provider_refunds: Optional[Mapping[str, int]] = None  # by result: ok, failed
    state_file: Optional[StateFileStats] = None



class _BackendCollector:
    def __init__(self, backend) -> None:
        self.backend = backend

    def collect(self):
        b = self.backend
        st = b.stats()
        trips = CounterMetricFamily("kt_backend_round_trips", "Round trips to the backend "
                                    "(one pipeline = one round trip).", labels=["backend"])
        trips.add_metric([b.name], st.round_trips)
        calls = CounterMetricFamily("kt_backend_decisions", "Decisions the backend made.",
                                    labels=["backend"])
        calls.add_metric([b.name], st.decisions)
        yield trips
        yield calls
        yield from _backend_health(b.name, st)
        if st.provider_refunds is not None:
            refunds = CounterMetricFamily(
                "kt_provider_refunds", "Redis Cluster: provider holds given back because the "
                "tenant's step refused, by result (ok, failed: the hold stays taken until it "
                "refills).", labels=["result"])
            for result, n in st.provider_refunds.items():
                refunds.add_metric([result], n)
            yield refunds


def _backend_health(name: str, st: BackendStats):
    """The backends' own failure counters (BackendStats), read at scrape time; each family
    only for a backend that keeps it."""
    if st.connection_attempts is not None:
        opened, failed = st.connection_attempts
        attempts = CounterMetricFamily(
            "kt_backend_connection_attempts", "Connections to the backend attempted, by result "
            "(opened, failed); failed attempts back off exponentially with jitter, capped.",
            labels=["backend", "result"])
        attempts.add_metric([name, "opened"], opened)
        attempts.add_metric([name, "failed"], failed)
        yield attempts
    if st.expired_decisions is not None:
        expired = CounterMetricFamily(
            "kt_backend_expired_decisions", "Decisions Redis refused to apply because they "
            "reached it after their deadline (their callers had been answered by the failure "
            "mode): nothing charged.", labels=["backend"])
        expired.add_metric([name], st.expired_decisions)
        yield expired
    leases = st.leases
    if leases is not None:  # capacity leases for hot tenants (sidecar/backends/redis/lease.py)
        events = CounterMetricFamily(
            "kt_leases", "Capacity leases, by event: taken, refused (the pool could not fill a "
            "useful lease: per-request decisions), returned (what was left went back), "
            "reported (what a lease used so far told to Redis), failed (Redis did not answer; "
            "a return is sent again, and Redis closes a lease not returned after its end).",
            labels=["backend", "event"])
        for event, n in (("taken", leases.taken), ("refused", leases.refused),
                         ("returned", leases.returned), ("reported", leases.reported),
                         ("failed", leases.failed)):
            events.add_metric([name, event], n)
        yield events
        local = CounterMetricFamily(
            "kt_lease_decisions", "Decisions made in process within a lease (no Redis round "
            "trip); the rest of kt_backend_decisions_total went to Redis one by one.",
            labels=["backend"])
        local.add_metric([name], leases.local_decisions)
        yield local
        held = GaugeMetricFamily("kt_leases_held", "Leases this process holds now.",
                                 labels=["backend"])
        held.add_metric([name], leases.held)
        yield held
    if st.store_resets is not None:
        resets = CounterMetricFamily(
            "kt_backend_store_resets", "Times the shared store was found to have lost its "
            "data (its marker key gone or replaced: a restart without persistence, FLUSHALL, "
            "failover to an empty replica): budgets and buckets restarted from zero.",
            labels=["backend"])
        resets.add_metric([name], st.store_resets)
        yield resets
    if st.state_file is not None:
        failures = CounterMetricFamily(
            "kt_state_write_failures", "Failed writes of the embedded backend's state file, "
            "by what (snapshot: spend of every tenant; journal: settlements, written before "
            "they are acknowledged). /readyz fails until a write succeeds.", labels=["what"])
        for what, n in st.state_file.write_failures.items():
            failures.add_metric([what], n)
        yield failures
        took = GaugeMetricFamily(
            "kt_state_snapshot_seconds", "How long the last snapshot of the state file took "
            "(in its own thread, off the event loop).", labels=[])
        took.add_metric([], st.state_file.snapshot_seconds)
        yield took
