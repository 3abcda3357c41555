"""The ledger across a fleet, end to end: two gateways (a real Envoy and a `kt serve`
each) on one Valkey, writing events to one real PostgreSQL. OpenAI and Anthropic
formats, buffered and streamed, cached prompt tokens, a failed upstream, a downgrade,
sidecar A killed with SIGKILL and restarted on its ports mid-run, PostgreSQL stopped
for part of the run. Afterwards the events in PostgreSQL, `kt spend` from any sidecar
and the budget in Valkey all equal what the fake upstreams reported, to the token and
the nano-dollar, with no event lost or counted twice."""
from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest

from sidecar.cli import main as kt
from sidecar.ledger.postgres import migrate
from tests.support.postgres import Postgres
from tests.support.procs import wait_until, workdir
from tests.support.valkey import Valkey, command
from tests.e2e.test_e2e_envoy import chat, stack

pytestmark = [pytest.mark.envoy, pytest.mark.postgres, pytest.mark.valkey]

PRICE = {"gpt-4o": (2500, 10000), "gpt-4o-mini": (150, 600)}  # nano-USD per token


def cost(model: str, inp: int, out: int) -> int:
    return inp * PRICE[model][0] + out * PRICE[model][1]


def test_two_gateways_one_valkey_one_postgres_everything_adds_up(capsys):
    reported: list[tuple[str, str, int, int]] = []  # tenant, model, input, output
    with workdir("kt-fleet-") as d, Valkey(d) as v, Postgres(d) as pg:
        migrate(pg.dsn)
        backend = (f'backend: {{kind: redis, url: "{v.url}", timeout_ms: 500}}\n'
                   f"ledger: {{sink: postgres, dsn: '{pg.dsn}', flush_interval_s: 0.05, "
                   f"retry_interval_s: 0.3}}")
        with stack("authz", backend=backend) as a, stack("authz", backend=backend) as b:
            for s in (a, b):
                s.upstreams["default"].release_stream.set()
                s.upstreams["compact"].release_stream.set()

            def send(s, tenant="finops", inp=100, out=10, stream=False, fmt="openai",
                     cached=0, model="gpt-4o", expect=200) -> dict:
                h = {"x-fake-usage": f"{inp},{out}", "x-fake-cached": str(cached)}
                if fmt == "anthropic":
                    h["x-fake-format"] = "anthropic"
                status, headers, body = s.post(tenant, chat(stream=stream, max_tokens=40), h)
                assert status == expect, (status, body[:300])
                if status == 200:
                    reported.append((tenant, model, inp, out))
                return headers

            for i in range(3):
                send(a, inp=100 + i, out=10 + i, cached=50 * i)
            for i in range(2):
                send(b, inp=200 + i, out=20, stream=True)
            for i in range(2):
                send(a, inp=300 + i, out=30, fmt="anthropic", cached=100)
            for i in range(2):
                send(b, inp=400 + i, out=40, fmt="anthropic", stream=True, cached=200)
            status, _, _ = a.post("finops", chat(max_tokens=40), {"x-fake-status": "503"})
            assert status == 503
            # a downgrade: tenant t-down's token budget (10,000, low water 0.5) runs low
            send(b, tenant="t-down", inp=6000, out=0)
            _, headers, body = b.post("t-down", chat(max_tokens=40), {"x-fake-usage": "70,7"})
            assert json.loads(body)["served_by"] == "compact"
            reported.append(("t-down", "gpt-4o-mini", 70, 7))

            time.sleep(0.3)  # past the ledger's flush interval: what A settled is written
            a.sidecar.proc.send_signal(signal.SIGKILL)  # sidecar A dies mid-run
            a.sidecar.proc.wait(10)
            pg.stop()  # PostgreSQL down: B's events spill to its local disk
            for i in range(2):
                send(b, inp=500 + i, out=50)
            # A comes back on its ports; Envoy A routes to it again
            args = a.sidecar.args
            for flag, port in (("--grpc", a.sidecar.grpc_port), ("--http", a.sidecar.http_port),
                               ("--http-authz", a.sidecar.http_authz_port),
                               ("--admin", a.sidecar.admin_port)):
                args[args.index(flag) + 1] = f"127.0.0.1:{port}"
            a.sidecar.start()
            for i in range(2):
                send(a, inp=600 + i, out=60)
            pg.start()
            send(a, inp=700, out=70, stream=True)
            for s in (a, b):
                wait_until(lambda s=s: 'kt_ledger_sink_up{sink="postgres"} 1.0'
                           in s.sidecar.metrics(), 15, "the ledger's sink back")
            # a stream is settled as its last chunk passes, maybe just after the client has it
            wait_until(lambda: a.spend()["finops"]["gpt-4o"]["requests"] == 14, 10,
                       "the last stream settled")
            assert kt(["spend", "--admin", f"127.0.0.1:{a.sidecar.admin_port}", "--json"]) == 0
            spend_doc = json.loads(capsys.readouterr().out)
            # leases (on by default): one sidecar A held when killed (finops is hot: it does,
            # most runs) comes back after its end, closed by a live sidecar; the live
            # sidecars return theirs when idle
            wait_until(lambda: command(v.port, "EXISTS", "kt:{finops}:leases") == b":0\r\n",
                       15, "every lease of finops closed")
            a.sidecar.stop()
            b.sidecar.stop()
        budget_reply = command(v.port, "HGET", "kt:{finops}:budget", "s")
        budget_spent = int(budget_reply.split(b"\r\n")[1])

        with psycopg.connect(pg.dsn) as conn:
            rows = conn.execute(
                "SELECT tenant, model_served, outcome, decision, count(*), sum(input_tokens), "
                "sum(output_tokens), sum(cached_tokens), sum(cost_nano_usd), "
                "sum(budget_charge) FROM kt_usage_events GROUP BY 1, 2, 3, 4").fetchall()
            n, distinct = conn.execute("SELECT count(*), count(DISTINCT (tenant, request_id))"
                                       " FROM kt_usage_events").fetchone()

    settled = {(r[0], r[1], r[3]): r[4:] for r in rows if r[2] == "settled"}
    released = [r for r in rows if r[2] == "released"]
    finops = [u for u in reported if u[0] == "finops"]
    got = settled[("finops", "gpt-4o", "allow")]
    # to the token
    assert got[0] == len(finops) == 14
    assert (got[1], got[2]) == (sum(u[2] for u in finops), sum(u[3] for u in finops))
    assert got[3] == 50 + 100 + 2 * 100 + 2 * 200  # cached prompt tokens, both formats
    # to the nano-dollar (no cache prices in this policy: cached tokens cost the input price)
    assert got[4] == sum(cost("gpt-4o", u[2], u[3]) for u in finops)
    # the budget in Valkey holds exactly the events' charges
    assert got[5] == budget_spent
    assert len(released) == 1 and released[0][9] == 0
    # the downgrade was served and priced as the compact model
    down = settled[("t-down", "gpt-4o-mini", "downgrade")]
    assert (down[0], down[1], down[2], down[4]) == (1, 70, 7, cost("gpt-4o-mini", 70, 7))
    # no event lost or doubled
    assert n == distinct == 14 + 1 + 2
    # kt spend, from the sidecar that was killed and restarted, answers for the fleet
    rec = spend_doc["tenants"]["finops"]["gpt-4o"]
    assert (rec["requests"], rec["input_tokens"], rec["output_tokens"], rec["cost_nano_usd"]) \
        == (14, got[1], got[2], got[4])
    assert spend_doc["tenants"]["t-down"]["gpt-4o-mini"]["cost_nano_usd"] == down[4]
