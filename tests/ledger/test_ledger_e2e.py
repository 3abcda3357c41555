"""The ledger end to end: a real Envoy (as `kt envoy-config` prints it), the sidecar as a
real `kt serve` process writing its events to a real PostgreSQL, fake upstreams.
Buffered and streamed replies, a failed upstream, a client that leaves mid-stream, and
PostgreSQL stopped for part of the run: afterwards the events in PostgreSQL add up to
the usage the upstreams reported, and their budget charges to the budget's spend, to
the token and the nano-dollar, with no event lost or counted twice."""
from __future__ import annotations

import json

import psycopg
import pytest

from sidecar.ledger.postgres import migrate
from tests.support.postgres import Postgres
from tests.support.procs import log_tail, wait_until, workdir
from tests.support.streams import leave_mid_stream
from tests.e2e.test_e2e_envoy import chat, stack

pytestmark = [pytest.mark.envoy, pytest.mark.postgres]

GPT4O = (2500, 10000)  # nano-USD per input / output token (tests/support/policies.py)


def test_events_in_postgres_add_up_to_the_reported_usage_and_the_budget():
    with workdir("kt-ledger-e2e-") as d, Postgres(d) as pg:
        migrate(pg.dsn)
        ledger = (f"ledger: {{sink: postgres, dsn: '{pg.dsn}', flush_interval_s: 0.05, "
                  f"retry_interval_s: 0.3, instance: e2e}}")
        reported: list[tuple[int, int]] = []
        with stack("authz", backend=ledger) as s:
            up = s.upstreams["default"]
            up.release_stream.set()

            def buffered(i: int) -> None:
                usage = (20 + i, 5 + i % 7)
                status, _, _ = s.post("finops", chat(max_tokens=40),
                                      {"x-fake-usage": f"{usage[0]},{usage[1]}"})
                assert status == 200
                reported.append(usage)

            def streamed(i: int) -> None:
                usage = (60 + i, 9)
                status, _, body = s.post("finops", chat(stream=True, max_tokens=40),
                                         {"x-fake-usage": f"{usage[0]},{usage[1]}"})
                assert status == 200 and b"[DONE]" in body
                reported.append(usage)

            for i in range(8):
                buffered(i)
            for i in range(3):
                streamed(i)
            status, _, _ = s.post("finops", chat(max_tokens=40), {"x-fake-status": "503"})
            assert status == 503  # released: the upstream reported nothing, nothing is charged

            pg.stop()  # PostgreSQL down for part of the run: events spill to local disk
            for i in range(8, 14):
                buffered(i)
            wait_until(lambda: 'kt_ledger_events_total{state="spilled"}' in s.sidecar.metrics()
                       and 'kt_ledger_sink_up{sink="postgres"} 0.0' in s.sidecar.metrics(),
                       10, "events spilled while PostgreSQL is down")

            # a client that leaves mid-stream: charged at its bound (kept, sidecar/settlement/bound.py)
            leave_mid_stream(s.envoy.listen_port, "finops", chat(stream=True, max_tokens=40),
                             up, s.sidecar)

            pg.start()
            for i in range(14, 18):
                buffered(i)
            wait_until(lambda: 'kt_ledger_sink_up{sink="postgres"} 1.0' in s.sidecar.metrics(),
                       15, "the spill replayed once PostgreSQL is back")
            s.settled()  # the last replies' usage has come back by Envoy's access log
            # SIGTERM: the ledger and the state file are flushed. It must exit by itself,
            # however long a busy machine takes (the gRPC drain alone waits its 2 s grace
            # for Envoy's access-log stream): killed after the usual 5 s, it left a state
            # file without the last second's spend and events not yet written
            s.sidecar.stop(grace=60)
            assert s.sidecar.proc is not None and s.sidecar.proc.returncode == 0, \
                log_tail(s.sidecar.log)
            spent = json.loads((s.dir / "spend.json").read_text())["tenants"]["finops"]["spent"]

        with psycopg.connect(pg.dsn) as conn:
            rows = conn.execute(
                "SELECT outcome, settled_by, count(*), sum(input_tokens), sum(output_tokens), "
                "sum(cost_nano_usd), sum(budget_charge) FROM kt_usage_events "
                "WHERE tenant = 'finops' GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
            by = {(r[0], r[1]): r[2:] for r in rows}
            n_events, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT request_id) FROM kt_usage_events "
                "WHERE tenant = 'finops'").fetchone()
            daily = conn.execute(
                "SELECT sum(input_tokens), sum(output_tokens), sum(budget_charge) "
                "FROM kt_usage_daily WHERE tenant = 'finops'").fetchone()
            # the provider's answer in each row (sidecar/upstream_sli.py)
            slis = conn.execute(
                "SELECT outcome, status, endpoint, count(*), "
                "bool_and(0 < ttft_ms AND ttft_ms <= upstream_ms) "
                "FROM kt_usage_events WHERE tenant = 'finops' GROUP BY 1, 2, 3").fetchall()

    settled = [v for k, v in by.items() if k[0] == "settled"]
    # usage comes back by Envoy's access log (kt envoy-config's default, docs/usage.md)
    assert sorted(k for k in by) == [("kept", "abandoned"), ("released", "release"),
                                     ("settled", "access_log_json"), ("settled", "access_log_sse")]
    assert by[("settled", "access_log_json")][0] == 18
    assert by[("settled", "access_log_sse")][0] == 3
    # to the token: what the upstreams reported
    assert sum(v[1] for v in settled) == sum(u[0] for u in reported)
    assert sum(v[2] for v in settled) == sum(u[1] for u in reported)
    # to the nano-dollar: the usage priced at gpt-4o's prices
    assert sum(v[3] for v in settled) == sum(i * GPT4O[0] + o * GPT4O[1] for i, o in reported)
    assert by[("released", "release")][4] == 0 and by[("kept", "abandoned")][4] > 0
    # the budget's spend is exactly the sum of the events' charges
    assert sum(v[4] for v in by.values()) == spent
    # none lost, none doubled; the roll-up agrees
    assert n_events == distinct == 18 + 3 + 1 + 1
    kept = by[("kept", "abandoned")]
    assert kept[2] == 40  # its output bound: the request's max_tokens
    assert (daily[0], daily[1]) == (sum(u[0] for u in reported) + kept[1],
                                    sum(u[1] for u in reported) + kept[2])
    assert daily[2] == spent
    chat_endpoint = "POST /v1/chat/completions"  # the route's name
    assert {r[:4]: r[4] for r in slis if r[0] != "kept"} == {
        ("settled", 200, chat_endpoint, 21): True, ("released", 503, chat_endpoint, 1): True}
    assert [r[2] for r in slis if r[0] == "kept"] == [chat_endpoint]  # the client left
