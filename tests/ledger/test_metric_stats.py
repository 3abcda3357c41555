"""`kt events stats --metric`: count, p50, p95, p99 and max of a number of the usage events
(docs/ledger.md), from a file sink's directory: nearest-rank values that were seen, each
event key once, only the events that have the number; one-line errors. (The same from
PostgreSQL: tests/ledger/test_ledger_postgres.py.)"""
from __future__ import annotations

import json
import time

import pytest

from sidecar.cli import main as kt
from sidecar.ledger.events import UsageEvent
from sidecar.ledger.metric_stats import MINUTE_US, MetricError, from_directory, from_events
from sidecar.ledger.sinks import FileSink
from tests.support.clock import T0_US


def event(i: int, at_us: int = T0_US, **kw) -> UsageEvent:
    fields = dict(request_id=f"req-{i}", tenant="acme", outcome="settled",
                  settled_by="access_log_json", decided_us=at_us - 1000, settled_us=at_us,
                  model_asked="gpt-4o", model_served="gpt-4o", tier="default",
                  decision="allow", estimate_tokens=100, input_tokens=i, output_tokens=5,
                  cost_nano_usd=i * 2500, budget_unit="usd", budget_charge=i * 2500,
                  instance="t")
    fields.update(kw)
    return UsageEvent(**fields)


def row(st, metric: str, group: str = ""):
    (found,) = [r for r in st.rows if r.metric == metric and r.group == group]
    return found


def test_percentiles_are_nearest_rank_values_of_the_events_in_the_window():
    evs = [event(i) for i in range(1, 101)]  # input_tokens 1..100
    evs += evs[:7]  # a replayed spill: each key once
    evs.append(event(500, outcome="released", input_tokens=0, output_tokens=0))  # no tokens
    evs.append(event(1000, at_us=T0_US - 2 * 3600 * 10**6))  # before the window
    st = from_events(evs, T0_US - 3600 * 10**6, T0_US + 1,
                     ["input_tokens", "cost_usd", "estimate_tokens"])
    r = row(st, "input_tokens")
    assert (r.count, r.p50, r.p95, r.p99, r.max) == (100, 50, 95, 99, 100)
    assert (row(st, "cost_usd").p50, row(st, "cost_usd").max) == (50 * 2500 / 1e9,
                                                                    100 * 2500 / 1e9)
    # the estimate is the reservation's, released or not
    assert row(st, "estimate_tokens").count == 101


def test_times_are_of_answered_replies_and_tokens_per_second_of_streams():
    evs = [
        # a stream: 0.5 s to the first byte, 300 tokens in the 1.5 s after it
        event(1, settled_by="access_log_sse", status=200, upstream_us=2_000_000,
              ttft_us=500_000, output_tokens=300),
        # a buffered reply: a latency and a ttft, no generation time
        event(2, status=200, upstream_us=1_000_000, ttft_us=900_000, output_tokens=50),
        event(3, status=503, upstream_us=40_000, ttft_us=40_000),  # a provider's failure
        event(4, outcome="expired", settled_by="expiry"),  # no reply: nothing measured
    ]
    st = from_events(evs, T0_US - 10**6, T0_US + 1, ["upstream_latency_seconds",
                                                     "ttft_seconds", "output_tokens_per_second"])
    lat, ttft, tps = (row(st, m) for m in ("upstream_latency_seconds", "ttft_seconds",
                                          "output_tokens_per_second"))
    assert (lat.count, lat.p50, lat.max) == (2, 1.0, 2.0)
    assert (ttft.count, ttft.p50, ttft.max) == (2, 0.5, 0.9)
    assert (tps.count, tps.p50) == (1, 200.0)


def test_per_minute_metrics_count_the_quiet_minutes_between_the_first_and_the_last():
    start = T0_US - T0_US % MINUTE_US
    evs = [event(i, at_us=start + i * 1000) for i in range(3)]  # 3 in the first minute
    evs.append(event(9, at_us=start + 2 * MINUTE_US + 5, input_tokens=95))  # 1 two later
    st = from_events(evs, start - MINUTE_US, start + 3 * MINUTE_US,
                     ["requests_per_minute", "tokens_per_minute"])
    rpm = row(st, "requests_per_minute")  # minutes: 3, 0, 1
    assert (rpm.count, rpm.p50, rpm.p95, rpm.max) == (3, 1, 3, 3)
    tpm = row(st, "tokens_per_minute")  # (0+5)+(1+5)+(2+5), 0, 95+5
    assert (tpm.p50, tpm.max) == (18, 100)


def test_by_model_gives_a_row_per_model_served():
    evs = [event(i, input_tokens=10) for i in range(3)]
    evs += [event(10 + i, model_served="gpt-4o-mini", input_tokens=1000) for i in range(2)]
    st = from_events(evs, T0_US - 10**6, T0_US + 1, ["input_tokens"], by="model")
    assert [(r.group, r.count, r.p50) for r in st.rows] == [
        ("gpt-4o", 3, 10), ("gpt-4o-mini", 2, 1000)]
    with pytest.raises(MetricError, match="queue_depth: a live gauge"):
        from_events([], 0, 1, ["queue_depth"])


@pytest.fixture
def sink_dir(tmp_path):
    now = time.time_ns() // 1000  # kt events stats --last reads back from the wall clock
    sink = FileSink(tmp_path, fsync=False)
    sink.write([event(i, at_us=now - 1000 * i, tenant=t)
                for t in ("acme", "beta") for i in range(1, 21)])
    sink.close()
    return tmp_path


def test_the_command_prints_a_table_and_json(sink_dir, capsys):
    assert kt(["events", "stats", "--dir", str(sink_dir), "--last", "1h",
               "--metric", "input_tokens", "--metric", "requests_per_minute", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (tokens, rpm) = doc["metrics"]
    assert tokens == {"metric": "input_tokens", "count": 40, "p50": 10, "p95": 19,
                      "p99": 20, "max": 20}
    assert rpm["metric"] == "requests_per_minute" and rpm["max"] >= 20
    assert kt(["events", "stats", "--dir", str(sink_dir), "--last", "1h",
               "--metric", "input_tokens", "--by", "tenant"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "tenant", "count", "p50", "p95", "p99", "max"]
    assert lines[1].split() == ["input_tokens", "acme", "20", "10", "19", "20", "20"]
    assert lines[2].split() == ["input_tokens", "beta", "20", "10", "19", "20", "20"]


@pytest.mark.parametrize("flags,fragment", [
    (["--metric", "queue_depth"], "kt_request_queue_depth on /metrics, or kt status"),
    (["--metric", "latency"], "is not a metric of the usage events; one of: input_tokens"),
    (["--metric", "x\x1b[31m\nforged"], r"'x\x1b[31m\x0aforged'"),
    (["--by", "model"], "--by groups the rows of --metric"),
])
def test_a_wrong_request_is_one_line_and_exit_2(sink_dir, capsys, flags, fragment):
    assert kt(["events", "stats", "--dir", str(sink_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


def test_an_unreadable_line_is_skipped_and_named(sink_dir):
    with open(sink_dir / "events.jsonl", "ab") as f:
        f.write(b'{"type": "usage", "torn\n')
    now = time.time_ns() // 1000
    st = from_directory(str(sink_dir), now - 3600 * 10**6, now + 1, ["output_tokens"])
    assert row(st, "output_tokens").count == 40 and len(st.skipped_lines) == 1
