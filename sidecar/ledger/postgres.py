"""The PostgreSQL sink (psycopg 3) and its schema (``kt events migrate``).

One batch is one transaction: COPY into a temporary stage table, then one statement
inserts the new events (``ON CONFLICT DO NOTHING`` on (tenant, request id, outcome),
so a retried or replayed batch never counts twice) and adds exactly the rows it
inserted to the daily roll-up (a data-modifying CTE: ``RETURNING`` yields only the
inserted rows). The roll-up is therefore never behind the events and never needs a
refresh job; a cost dashboard reads ``kt_usage_daily`` (or ``kt_usage_daily_usd``).

PostgreSQL's own refusal of a value (SQLSTATE class 22, data exception, and 23,
integrity constraint) is a ``SinkRefused``: the writer isolates the event. Everything
else (the server down, a missing table, a lost connection) is a ``SinkError``: the
batch spills and is retried. ``interrupt()`` ends a call blocked on a hung server.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any, Optional, Sequence

from sidecar.ledger.events import (AdminEvent, AnomalyEvent, Event, RefusalsEvent,
                                   ThresholdEvent, UsageEvent)
from sidecar.ledger.sinks import SinkError, SinkRefused

log = logging.getLogger("kt.ledger")
SCHEMA_VERSION = 5
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kt_ledger_schema (version integer NOT NULL);

CREATE TABLE IF NOT EXISTS kt_usage_events (
    tenant             text        NOT NULL,
    request_id         text        NOT NULL,
    outcome            text        NOT NULL,  -- settled, released, kept, expired
    settled_by         text        NOT NULL,  -- ext_proc_json, ext_proc_sse, report, release, ...
    decided_at         timestamptz,           -- NULL: not known to the sidecar that settled
    settled_at         timestamptz NOT NULL,
    model_asked        text        NOT NULL,
    model_served       text        NOT NULL,
    tier               text        NOT NULL,
    provider           text        NOT NULL,
    decision           text        NOT NULL,
    estimate_tokens    bigint      NOT NULL,
    input_tokens       bigint      NOT NULL,  -- all input, cache reads and writes included
    output_tokens      bigint      NOT NULL,
    cached_tokens      bigint      NOT NULL,
    cache_write_tokens bigint      NOT NULL,
    cost_nano_usd      bigint      NOT NULL,  -- 1e-9 USD, exact
    budget_unit        text        NOT NULL,  -- usd (nano-USD), tokens, '' (no budget)
    budget_charge      bigint      NOT NULL,  -- what the budget was charged, in its unit
    unpriced           boolean     NOT NULL,
    instance           text        NOT NULL,
    PRIMARY KEY (tenant, request_id, outcome)
);
CREATE INDEX IF NOT EXISTS kt_usage_events_settled_at ON kt_usage_events (settled_at);

CREATE TABLE IF NOT EXISTS kt_usage_daily (
    day                date   NOT NULL,  -- UTC day of settled_at
    tenant             text   NOT NULL,
    model              text   NOT NULL,  -- model_served
    provider           text   NOT NULL,
    budget_unit        text   NOT NULL,
    events             bigint NOT NULL,
    settled            bigint NOT NULL,
    released           bigint NOT NULL,
    kept               bigint NOT NULL,  -- kept or expired: the estimate stayed charged
    input_tokens       bigint NOT NULL,
    output_tokens      bigint NOT NULL,
    cached_tokens      bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    cost_nano_usd      bigint NOT NULL,
    budget_charge      bigint NOT NULL,
    PRIMARY KEY (day, tenant, model, provider, budget_unit)
);

CREATE OR REPLACE VIEW kt_usage_daily_usd AS
    SELECT day, tenant, model, provider, events, settled, released, kept, input_tokens,
           output_tokens, cached_tokens, cache_write_tokens,
           cost_nano_usd::numeric / 1000000000 AS cost_usd
    FROM kt_usage_daily;

CREATE TABLE IF NOT EXISTS kt_refusals (
    minute   timestamptz NOT NULL,
    tenant   text        NOT NULL,
    reason   text        NOT NULL,
    instance text        NOT NULL,
    count    bigint      NOT NULL,
    PRIMARY KEY (minute, tenant, reason, instance)
);

CREATE TABLE IF NOT EXISTS kt_budget_thresholds (
    tenant       text             NOT NULL,
    period_start timestamptz      NOT NULL,
    fraction     double precision NOT NULL,
    budget       bigint           NOT NULL,
    spent        bigint           NOT NULL,
    budget_unit  text             NOT NULL,
    at           timestamptz      NOT NULL,
    instance     text             NOT NULL,
    PRIMARY KEY (tenant, period_start, fraction)
);
"""

# Each version's changes to a database of the version before, applied in order by
# `migrate` (idempotent: a migration interrupted half-way is run again whole). Columns are
# added without a default, so PostgreSQL only changes the catalog (no table rewrite) and
# the rows already there keep everything they hold; the new columns are NULL for them.
MIGRATIONS = {
    # the provider's answer (sidecar/upstream_sli.py); NULL: not known (a row written
    # before, an expiry, a usage report, no reply)
    2: """
ALTER TABLE kt_usage_events
    ADD COLUMN IF NOT EXISTS status      integer,           -- HTTP status of the reply
    ADD COLUMN IF NOT EXISTS upstream_ms double precision,  -- request sent -> reply's last byte
    ADD COLUMN IF NOT EXISTS ttft_ms     double precision,  -- request sent -> reply's first byte
    ADD COLUMN IF NOT EXISTS endpoint    text;              -- the route's name: POST /v1/...
""",
    # attribution below the tenant (sidecar/attribution.py); NULL: none (a row written
    # before, a request no trusted filter attributed). No index: building one would lock
    # the table's writes for as long as it takes; docs/ledger.md has the CONCURRENTLY one
    3: """
ALTER TABLE kt_usage_events
    ADD COLUMN IF NOT EXISTS end_user text,     -- the end user's id
    ADD COLUMN IF NOT EXISTS tags     text[];   -- the request's tags
""",
    # the management API's audit trail (docs/budgets.md, "Management API")
    4: """
CREATE TABLE IF NOT EXISTS kt_admin_audit (
    at       timestamptz NOT NULL,
    who      text        NOT NULL,
    action   text        NOT NULL,  -- set, delete, delete_overlay, freeze, unfreeze
    holder   text        NOT NULL,
    before   text        NOT NULL,  -- the holder's overlay entry before, JSON ('' none)
    after    text        NOT NULL,
    version  bigint      NOT NULL,  -- the overlay's version after the change
    instance text        NOT NULL,
    -- a retried batch repeats all five; another change differs in at or instance (the
    -- version restarts with an in-memory overlay, a Redis that lost it, two fleets)
    PRIMARY KEY (holder, version, action, at, instance)
);
""",
    # token-rate anomaly flags, started and cleared (sidecar/anomaly.py)
    5: """
CREATE TABLE IF NOT EXISTS kt_token_rate_anomalies (
    at                  timestamptz      NOT NULL,
    tenant              text             NOT NULL,
    flagged             boolean          NOT NULL,  -- true: started; false: cleared
    tokens_per_minute   bigint           NOT NULL,  -- the tenant's rate when judged
    baseline_per_minute bigint           NOT NULL,  -- its usual rate
    factor              double precision NOT NULL,  -- the policy's anomaly.factor
    action              text             NOT NULL,  -- flag, downgrade, refuse
    instance            text             NOT NULL,
    PRIMARY KEY (tenant, at, flagged, instance)
);
""",
}

USAGE_COLUMNS = ("tenant", "request_id", "outcome", "settled_by", "decided_at", "settled_at",
                 "model_asked", "model_served", "tier", "provider", "decision",
                 "estimate_tokens", "input_tokens", "output_tokens", "cached_tokens",
                 "cache_write_tokens", "cost_nano_usd", "budget_unit", "budget_charge",
                 "unpriced", "instance", "status", "upstream_ms", "ttft_ms", "endpoint",
                 "end_user", "tags")
_SUMS = ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens",
         "cost_nano_usd", "budget_charge")

_INSERT_AND_ROLL_UP = f"""
WITH ins AS (
    INSERT INTO kt_usage_events ({", ".join(USAGE_COLUMNS)})
    SELECT {", ".join(USAGE_COLUMNS)} FROM kt_usage_stage
    ON CONFLICT DO NOTHING
    RETURNING *
)
INSERT INTO kt_usage_daily (day, tenant, model, provider, budget_unit, events, settled, released,
                            kept, {", ".join(_SUMS)})
SELECT (settled_at AT TIME ZONE 'UTC')::date, tenant, model_served, provider, budget_unit,
       count(*), count(*) FILTER (WHERE outcome = 'settled'),
       count(*) FILTER (WHERE outcome = 'released'),
       count(*) FILTER (WHERE outcome IN ('kept', 'expired')),
       {", ".join(f"sum({c})::bigint" for c in _SUMS)}
FROM ins
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5  -- one lock order for every writer: concurrent sidecars cannot deadlock
ON CONFLICT (day, tenant, model, provider, budget_unit) DO UPDATE SET
    events = kt_usage_daily.events + EXCLUDED.events,
    settled = kt_usage_daily.settled + EXCLUDED.settled,
    released = kt_usage_daily.released + EXCLUDED.released,
    kept = kt_usage_daily.kept + EXCLUDED.kept,
    {", ".join(f"{c} = kt_usage_daily.{c} + EXCLUDED.{c}" for c in _SUMS)}
"""


def ts(us: int) -> datetime.datetime:
    """µs since the epoch as an exact timestamptz value (no float on the way)."""
    return EPOCH + datetime.timedelta(microseconds=us)


def us_of(t: datetime.datetime) -> int:
    d = t - EPOCH
    return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds


def connect(dsn: str, **kw: Any):
    import psycopg

    # keepalives: a server that vanished without a FIN is noticed in ~15 s, not hours
    return psycopg.connect(dsn, connect_timeout=5, application_name="kt-sidecar-ledger",
                           keepalives=1, keepalives_idle=5, keepalives_interval=2,
                           keepalives_count=3, **kw)


def migrate(dsn: str) -> int:
    """Create (or bring up to date) the ledger's tables; idempotent. Returns the version."""
    with connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(7302453)")  # two migrations at once: one waits
        conn.execute(SCHEMA)  # version 1's tables, where missing
        # None: a new database (version 1's tables just made)
        held = conn.execute("SELECT max(version) FROM kt_ledger_schema").fetchone()[0]
        if held is not None and held > SCHEMA_VERSION:
            raise RuntimeError(f"the database holds ledger schema version {held}, newer "
                               f"than this sidecar's {SCHEMA_VERSION}")
        for version in range((held or 1) + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[version])
            log.info("ledger schema migrated to version %d", version)
        if held != SCHEMA_VERSION:
            conn.execute("DELETE FROM kt_ledger_schema")
            conn.execute("INSERT INTO kt_ledger_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
    return SCHEMA_VERSION


class PostgresSink:
    name = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: Optional[Any] = None
        self._ready = False  # the connection's stage table exists

    def _connection(self):
        if self._conn is not None and not self._conn.closed and self._ready:
            return self._conn
        self.close()
        self._ready = False
        # kept at once, so interrupt() can reach a connection whose setup hangs
        self._conn = conn = connect(self.dsn, options="-c statement_timeout=30000")
        row = conn.execute("SELECT to_regclass('kt_usage_events') IS NOT NULL AND "
                           "to_regclass('kt_usage_daily') IS NOT NULL").fetchone()
        if not row or not row[0]:
            self.close()
            raise SinkError("the ledger's tables are missing: run `kt events migrate`")
        # an older schema lacks columns this sidecar writes (a sidecar of the version
        # before writes to a newer schema: its columns are all still there)
        version = conn.execute("SELECT max(version) FROM kt_ledger_schema").fetchone()[0] \
            if conn.execute("SELECT to_regclass('kt_ledger_schema')").fetchone()[0] else None
        if version is None or version < SCHEMA_VERSION:
            self.close()
            raise SinkError(f"the ledger's tables are at schema version {version or 1}, this "
                            f"sidecar writes version {SCHEMA_VERSION}: run `kt events migrate`")
        conn.execute("CREATE TEMP TABLE kt_usage_stage (LIKE kt_usage_events) "
                     "ON COMMIT DELETE ROWS")
        conn.commit()
        self._ready = True
        return conn

    def write(self, events: Sequence[Event]) -> None:
        import psycopg

        usage = [e for e in events if isinstance(e, UsageEvent)]
        refusals = [e for e in events if isinstance(e, RefusalsEvent)]
        thresholds = [e for e in events if isinstance(e, ThresholdEvent)]
        audits = [e for e in events if isinstance(e, AdminEvent)]
        anomalies = [e for e in events if isinstance(e, AnomalyEvent)]
        try:
            conn = self._connection()
            with conn.transaction():
                if usage:
                    with conn.cursor() as cur:
                        with cur.copy(f"COPY kt_usage_stage ({', '.join(USAGE_COLUMNS)}) "
                                      "FROM STDIN") as copy:
                            for e in usage:
                                copy.write_row((
                                    e.tenant, e.request_id, e.outcome, e.settled_by,
                                    ts(e.decided_us) if e.decided_us else None,
                                    ts(e.settled_us), e.model_asked, e.model_served, e.tier,
                                    e.provider, e.decision, e.estimate_tokens, e.input_tokens,
                                    e.output_tokens, e.cached_tokens, e.cache_write_tokens,
                                    e.cost_nano_usd, e.budget_unit, e.budget_charge,
                                    e.unpriced, e.instance, e.status or None,
                                    e.upstream_us / 1000 if e.upstream_us else None,
                                    e.ttft_us / 1000 if e.ttft_us else None,
                                    e.endpoint or None, e.user or None,
                                    list(e.tags) if e.tags else None))
                        cur.execute(_INSERT_AND_ROLL_UP)
                if refusals:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO kt_refusals (minute, tenant, reason, instance, count) "
                            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            [(ts(e.minute_us), e.tenant, e.reason, e.instance, e.count)
                             for e in refusals])
                if thresholds:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO kt_budget_thresholds (tenant, period_start, fraction, "
                            "budget, spent, budget_unit, at, instance) VALUES "
                            "(%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                            [(e.tenant, ts(e.period_start_us), e.fraction, e.budget, e.spent,
                              e.budget_unit, ts(e.at_us), e.instance) for e in thresholds])
                if audits:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO kt_admin_audit (at, who, action, holder, before, "
                            "after, version, instance) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT DO NOTHING",
                            [(ts(e.at_us), e.who, e.action, e.holder, e.before, e.after,
                              e.version, e.instance) for e in audits])
                if anomalies:
                    with conn.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO kt_token_rate_anomalies (at, tenant, flagged, "
                            "tokens_per_minute, baseline_per_minute, factor, action, "
                            "instance) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT DO NOTHING",
                            [(ts(e.at_us), e.tenant, e.flagged, e.tokens_per_minute,
                              e.baseline_per_minute, e.factor, e.action, e.instance)
                             for e in anomalies])
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # the transaction was rolled back; the connection is still good
            raise SinkRefused(f"postgres refused: {type(exc).__name__}: "
                              f"{str(exc).strip()[:300]}") from None
        except psycopg.Error as exc:
            self.close()
            raise SinkError(f"postgres: {type(exc).__name__}: {str(exc).strip()[:300]}") from None

    def interrupt(self) -> None:
        """Called from another thread: shut the connection's socket down, so a call waiting
        on a hung server fails at once (psycopg then closes the connection in its thread)."""
        conn = self._conn
        if conn is None:
            return  # still connecting: connect_timeout ends that
        try:
            fd = os.dup(conn.pgconn.socket)
        except Exception:  # noqa: BLE001 - already closed
            return
        try:
            # still open after the dup: the dup is this connection's socket, not another
            # one that took a closed descriptor's number in between
            if not conn.closed:
                with socket.socket(fileno=fd) as s:
                    fd = -1
                    s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
            self._conn = None
