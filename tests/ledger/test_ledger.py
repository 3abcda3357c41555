"""The ledger without PostgreSQL: usage formats and exact pricing, the event schema,
the JSON Lines sink (rotation, retention), the writer (buffer, spill, replay, counters),
refusal aggregation, budget thresholds and `kt events stats` from files."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import msgspec
import pytest

from sidecar.cli import main as kt
from sidecar.ledger.events import (RefusalsEvent, ThresholdEvent, UsageEvent, decode_line,
                                   encode_line, encode_lines)
from sidecar.ledger.recorder import MINUTE_US, OVERFLOW_TENANT, REFUSAL_KEYS_MAX, Ledger
from sidecar.ledger.sinks import CURRENT, FileSink, SinkError, SpillFile, event_files, read_events
from sidecar.ledger.stats import from_directory, parse_window
from sidecar.ledger.writer import EventLog
from sidecar.policy.load import PolicyError, parse_policy
from sidecar.settlement.usage import ModelPrice, Usage, UsageScanner, cost_nano, model_price, usage_from_json


# --- usage formats ------------------------------------------------------------
def test_openai_cached_prompt_tokens_are_read_and_part_of_the_prompt():
    body = json.dumps({"model": "gpt-4o", "usage": {
        "prompt_tokens": 2000, "completion_tokens": 300,
        "prompt_tokens_details": {"cached_tokens": 1536}}}).encode()
    model, u = usage_from_json(body)
    assert model == "gpt-4o"
    assert u == Usage(2000, 300, 1536, 0) and u.uncached_tokens == 464


def test_anthropic_json_usage_counts_cache_reads_and_writes_as_input():
    body = json.dumps({"type": "message", "model": "claude-sonnet-4", "usage": {
        "input_tokens": 50, "output_tokens": 400, "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 200}}).encode()
    model, u = usage_from_json(body)
    assert model == "claude-sonnet-4"
    assert u == Usage(1250, 400, 1000, 200) and u.uncached_tokens == 50


def test_openai_responses_usage():
    body = json.dumps({"object": "response", "model": "gpt-4o", "usage": {
        "input_tokens": 900, "output_tokens": 80,
        "input_tokens_details": {"cached_tokens": 512}}}).encode()
    assert usage_from_json(body)[1] == Usage(900, 80, 512, 0)


def _sse(events: list[tuple[str, dict]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(doc)}\n\n".encode() for name, doc in events)


def test_anthropic_stream_message_start_then_cumulative_message_deltas():
    stream = _sse([
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "model": "claude-sonnet-4", "usage": {
                "input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 4000,
                "cache_creation_input_tokens": 0}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hi"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": None},
                           "usage": {"output_tokens": 40}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 97}}),
        ("message_stop", {"type": "message_stop"}),
    ])
    sc = UsageScanner(streamed=True)
    for i in range(0, len(stream), 7):  # split at awkward places
        sc.feed(stream[i:i + 7])
    sc.finish()
    assert sc.model == "claude-sonnet-4"
    assert sc.usage == Usage(4025, 97, 4000, 0)
    assert sc.format == "ext_proc_sse"


def test_openai_responses_stream_completed_event():
    stream = _sse([
        ("response.created", {"type": "response.created", "response": {"model": "gpt-4o"}}),
        ("response.completed", {"type": "response.completed", "response": {
            "model": "gpt-4o", "usage": {"input_tokens": 30, "output_tokens": 7,
                                         "input_tokens_details": {"cached_tokens": 0}}}}),
    ])
    sc = UsageScanner(streamed=True)
    sc.feed(stream)
    sc.finish()
    assert (sc.model, sc.usage) == ("gpt-4o", Usage(30, 7, 0, 0))


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1, "completion_tokens": 3},
    {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": -4},
    {"prompt_tokens": 10**12, "completion_tokens": 1},
    {"prompt_tokens": "ten"},
])
def test_a_malformed_usage_block_is_no_usage(usage):
    assert usage_from_json(json.dumps({"model": "m", "usage": usage}).encode())[1] is None


def test_cached_tokens_never_exceed_the_prompt():
    body = {"usage": {"prompt_tokens": 10, "completion_tokens": 1,
                      "prompt_tokens_details": {"cached_tokens": 50}}}
    assert usage_from_json(json.dumps(body).encode())[1] == Usage(10, 1, 10, 0)


def test_cost_is_exact_nano_usd_per_kind_of_token():
    policy = parse_policy(b"""
tiers: [{name: default, model: claude}]
pricing:
  claude: {input: 0.003, output: 0.015, cached_input: 0.0003, cache_write: 0.00375}
  plain: {input: 0.0025, output: 0.01}
""", "t.yaml")
    p = model_price(policy.pricing["claude"])
    assert p == ModelPrice(3000, 15000, 300, 3750)
    u = Usage(prompt_tokens=1250, completion_tokens=400, cached_tokens=1000, cache_write_tokens=200)
    assert cost_nano(u, p) == 50 * 3000 + 1000 * 300 + 200 * 3750 + 400 * 15000 == 7_200_000
    # without cache prices the cached tokens cost the input price: never cheaper than said
    plain = model_price(policy.pricing["plain"])
    assert plain == ModelPrice(2500, 10000, 2500, 2500)
    assert cost_nano(u, plain) == 1250 * 2500 + 400 * 10000


@pytest.mark.parametrize("fragment, message", [
    ("pricing: {m: {input: 1, output: 1, cached_input: -0.1}}", "$.pricing.m.cached_input: must be a number in 0..100"),
    ("ledger: {sink: postgres}", "$.ledger: sink postgres needs `dsn` or `dsn_file`"),
    ("ledger: {thresholds: [0.5, 0]}", "$.ledger.thresholds: fractions must be in (0, 10]"),
    ("ledger: {rotate_mb: 0}", "$.ledger.rotate_mb: must be > 0"),
    ("ledger: {sinc: file}", "sinc"),
])
def test_bad_ledger_and_cache_price_settings_are_named(fragment, message):
    with pytest.raises(PolicyError) as exc:
        parse_policy(("tiers: [{name: default, model: m}]\n" + fragment + "\n").encode(), "p.yaml")
    assert message in str(exc.value)


# --- events ---------------------------------------------------------------------
def usage_event(i: int, tenant: str = "acme", outcome: str = "settled", t_us: int = 0,
                **kw) -> UsageEvent:
    fields = dict(request_id=f"req-{i}", tenant=tenant, outcome=outcome, settled_by="report",
                  decided_us=(t_us or time.time_ns() // 1000) - 1000,
                  settled_us=t_us or time.time_ns() // 1000,
                  model_asked="gpt-4o", model_served="gpt-4o", tier="default", decision="allow",
                  estimate_tokens=100, input_tokens=10 + i, output_tokens=5,
                  cost_nano_usd=(10 + i) * 2500 + 5 * 10000, budget_unit="usd",
                  budget_charge=(10 + i) * 2500 + 5 * 10000, instance="t")
    fields.update(kw)
    return UsageEvent(**fields)


def test_an_event_is_one_json_line_and_reads_back_equal():
    for ev in (usage_event(1),
               RefusalsEvent(minute_us=60_000_000, tenant="a", reason="rate_limited", count=7),
               ThresholdEvent(tenant="a", period_start_us=0, fraction=0.8, budget=100, spent=80,
                              budget_unit="tokens", at_us=5)):
        line = encode_line(ev)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_line(line) == ev
    assert json.loads(encode_line(usage_event(1)))["type"] == "usage"


def test_a_batch_encodes_as_its_events_lines_joined():
    batch = [usage_event(1), RefusalsEvent(minute_us=0, tenant="a\\b", reason="r", count=1),
             usage_event(2, model_served="é\n\"x\"")]
    assert encode_lines(batch) == b"".join(encode_line(e) for e in batch)
    assert [decode_line(line + b"\n") for line in encode_lines(batch).splitlines()] == batch
    assert encode_lines([]) == b""


def test_the_upstream_fields_read_from_new_lines_and_default_on_old_ones():
    """Schema growth both ways: a line written before the upstream fields existed reads
    with them not known, and a reader that does not know them skips them."""
    t = 1_800_000_000_000_000
    new = usage_event(1, t_us=t, status=429, upstream_us=812_000, ttft_us=90_000,
                      endpoint="POST /v1/messages")
    doc = json.loads(encode_line(new))
    assert (doc["status"], doc["upstream_us"], doc["ttft_us"], doc["endpoint"]) == (
        429, 812_000, 90_000, "POST /v1/messages")
    old = {k: v for k, v in doc.items() if k not in ("status", "upstream_us", "ttft_us",
                                                     "endpoint")}
    back = decode_line(json.dumps(old).encode())
    assert (back.status, back.upstream_us, back.ttft_us, back.endpoint) == (0, 0, 0, "")
    assert back == usage_event(1, t_us=t) and decode_line(encode_line(new)) == new

    class OldUsageEvent(msgspec.Struct, tag_field="type", tag="usage"):  # an older reader
        request_id: str
        tenant: str

    assert msgspec.json.decode(encode_line(new), type=OldUsageEvent).request_id == "req-1"


# --- the file sink ------------------------------------------------------------------
def test_file_sink_rotates_by_size_and_deletes_past_retention(tmp_path):
    now = [1_700_000_000.0]
    sink = FileSink(tmp_path, rotate_bytes=2000, retention_s=3600, clock=lambda: now[0])
    written = [usage_event(i) for i in range(40)]
    for i in range(0, 40, 4):
        sink.write(written[i:i + 4])
        now[0] += 1
    files = event_files(tmp_path)
    assert len(files) >= 3 and all(f.name.startswith("events-") for f in files[:-1])
    batch_max = max(sum(len(encode_line(e)) for e in written[i:i + 4]) for i in range(0, 40, 4))
    assert all(f.stat().st_size < 2000 + batch_max for f in files)
    assert list(read_events(files)) == written  # nothing lost or reordered by rotation
    # files older than the retention go; the current one and young ones stay
    old = files[0]
    os.utime(old, (now[0] - 7200, now[0] - 7200))
    assert sink.sweep() == 1 and not old.exists()
    assert event_files(tmp_path) == files[1:]
    sink.close()


def test_a_torn_line_is_skipped_and_named(tmp_path):
    sink = FileSink(tmp_path, fsync=False)
    sink.write([usage_event(1)])
    with open(tmp_path / CURRENT, "ab") as f:
        f.write(b'{"type":"usage","request_id":"x"')  # a crash in the middle of a write
    sink.close()
    bad: list[str] = []
    assert [e.request_id for e in read_events(event_files(tmp_path), bad)] == ["req-1"]
    assert len(bad) == 1 and CURRENT in bad[0]


# --- the writer: buffer, spill, replay --------------------------------------------
class BrokenUntil:
    """A real file sink whose directory is replaced by a plain file while `broken`:
    writes then fail with the OS's own error (ENOTDIR), as on a lost volume."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.inner = FileSink(directory / "events", fsync=False)
        self.name = "file"

    def break_(self) -> None:
        self.inner.close()
        os.rename(self.dir / "events", self.dir / "events.moved")
        (self.dir / "events").write_text("not a directory")

    def repair(self) -> None:
        (self.dir / "events").unlink()
        os.rename(self.dir / "events.moved", self.dir / "events")

    def write(self, events):
        self.inner.write(events)

    def close(self):
        self.inner.close()


def test_events_spill_while_the_sink_fails_and_are_replayed_in_order(tmp_path):
    sink = BrokenUntil(tmp_path)
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"), batch_events=10,
                   flush_interval_s=0.01, retry_interval_s=0.05)
    log.start()
    try:
        first = [usage_event(i) for i in range(25)]
        for e in first:
            log.emit(e)
        assert log.flush()
        assert log.written == 25 and log.spilled == 0 and log.status()[0]
        sink.break_()
        during = [usage_event(i) for i in range(25, 60)]
        for e in during:
            log.emit(e)
        assert log.flush()
        ready, detail = log.status()
        # spilling is ready (nothing is lost), and /readyz says why the sink fails
        assert ready and "spill" in detail and "events.jsonl: [Errno" in detail
        assert log.spilled == 35 and log.written == 25 and log.lost == 0
        assert (tmp_path / "spill.jsonl").exists()
        sink.repair()
        after = [usage_event(i) for i in range(60, 70)]
        deadline = time.monotonic() + 10
        while (log.written < 70 or log.buffered) and time.monotonic() < deadline:
            for e in after:
                log.emit(e)
            after = []
            log.flush()
            time.sleep(0.02)
        assert log.status()[0], log.status()
        # the ten emitted after the repair may queue behind the spill (order is kept)
        assert (log.written, log.lost) == (70, 0) and log.replayed == log.spilled >= 35
        assert not (tmp_path / "spill.jsonl").exists()
    finally:
        log.close()
    got = [e.request_id for e in read_events(event_files(tmp_path / "events"))]
    assert got == [f"req-{i}" for i in range(70)]


def test_a_spill_left_by_a_killed_process_is_replayed_at_start(tmp_path):
    spill = SpillFile(tmp_path / "spill.jsonl")
    spill.append([usage_event(1), usage_event(2)])
    with open(tmp_path / "spill.jsonl", "ab") as f:
        f.write(b'{"type":"usage","req')  # killed in the middle of an append
    sink = FileSink(tmp_path / "events", fsync=False)
    log = EventLog(sink, SpillFile(tmp_path / "spill.jsonl"), flush_interval_s=0.01)
    log.start()
    log.emit(usage_event(3))
    assert log.flush()
    log.close()
    got = [e.request_id for e in read_events(event_files(tmp_path / "events"))]
    assert got == ["req-1", "req-2", "req-3"]
    assert not (tmp_path / "spill.jsonl").exists()


def test_a_full_buffer_counts_what_it_loses(tmp_path):
    log = EventLog(FileSink(tmp_path, fsync=False), SpillFile(tmp_path / "spill.jsonl"),
                   buffer_events=5)
    accepted = [log.emit(usage_event(i)) for i in range(8)]  # writer not started: nothing drains
    assert accepted == [True] * 5 + [False] * 3
    assert (log.accepted, log.lost, log.buffered) == (5, 3, 5)
    log.close()  # the buffered five are written at shutdown
    assert len(list(read_events(event_files(tmp_path)))) == 5


def test_spill_and_sink_both_failing_is_counted_lost_not_silent(tmp_path):
    (tmp_path / "blocker").write_text("x")

    class Down:
        name = "postgres"

        def write(self, events):
            raise SinkError("connection refused")

        def close(self):
            pass

    log = EventLog(Down(), SpillFile(tmp_path / "blocker" / "spill.jsonl"))
    log.emit(usage_event(1))
    log.close()
    assert (log.lost, log.written, log.spilled) == (1, 0, 0)
    assert not log.status()[0]


# --- refusals and thresholds ---------------------------------------------------------
class Collect:
    def __init__(self) -> None:
        self.events: list = []

    def emit(self, e) -> bool:
        self.events.append(e)
        return True


def test_refusals_are_one_record_per_tenant_reason_and_minute():
    sink = Collect()
    led = Ledger(sink, instance="i1")  # type: ignore[arg-type]
    t0 = 1_700_000_040_000_000 - 1_700_000_040_000_000 % MINUTE_US
    for i in range(1000):
        led.refused("acme", "rate_limited", t0 + i * 1000)
    led.refused("acme", "budget_exhausted", t0 + 5)
    led.refused("beta", "rate_limited", t0 + 6)
    assert sink.events == []  # the minute is not over
    led.refused("acme", "rate_limited", t0 + MINUTE_US + 1)  # next minute closes the first
    got = {(e.tenant, e.reason): e.count for e in sink.events}
    assert got == {("acme", "rate_limited"): 1000, ("acme", "budget_exhausted"): 1,
                   ("beta", "rate_limited"): 1}
    assert {e.minute_us for e in sink.events} == {t0} and all(e.instance == "i1" for e in sink.events)
    led.tick(everything=True)
    assert sink.events[-1].count == 1 and sink.events[-1].minute_us == t0 + MINUTE_US


def test_a_flood_of_invented_tenant_names_stays_bounded():
    sink = Collect()
    led = Ledger(sink)  # type: ignore[arg-type]
    t0 = 60 * MINUTE_US
    for i in range(REFUSAL_KEYS_MAX + 500):
        led.refused(f"t{i}", "unknown_tenant", t0)
    led.tick(t0 + MINUTE_US)
    assert len(sink.events) == REFUSAL_KEYS_MAX + 1
    assert sum(e.count for e in sink.events) == REFUSAL_KEYS_MAX + 500
    assert [e.count for e in sink.events if e.tenant == OVERFLOW_TENANT] == [500]


def test_each_threshold_is_recorded_once_per_period():
    sink = Collect()
    led = Ledger(sink, thresholds=(0.5, 0.8, 1.0))  # type: ignore[arg-type]
    budget = 1000
    for spent in (100, 499, 500, 600, 790, 500):
        led.budget_seen("acme", "acme", "tokens", budget, spent, period_start_us=0)
    assert [e.fraction for e in sink.events] == [0.5]
    assert led.budget_seen("acme", "acme", "tokens", budget, 1200, 0) == 2  # 0.8 and 1.0 at once
    assert [e.fraction for e in sink.events] == [0.5, 0.8, 1.0]
    assert led.budget_seen("acme", "acme", "tokens", budget, 5000, 0) == 0
    assert led.budget_seen("acme", "acme", "tokens", budget, 100, period_start_us=-5) == 0
    # a new period starts over; a late settlement of the old one records nothing
    assert led.budget_seen("acme", "acme", "tokens", budget, 850, period_start_us=86400) == 2
    assert led.budget_seen("acme", "acme", "tokens", budget, 999, period_start_us=0) == 0
    assert led.crossings == {("acme", 0.5): 2, ("acme", 0.8): 2, ("acme", 1.0): 1}
    assert all(isinstance(e, ThresholdEvent) for e in sink.events)


# --- kt events stats from files ---------------------------------------------------------
def test_window_parsing():
    assert [parse_window(w) for w in ("1h", "24h", "30d", "90m")] == [3600, 86400, 2592000, 5400]
    for bad in ("", "1y", "0h", "-1h", "h"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_events_stats_from_files(tmp_path, capsys):
    now = time.time_ns() // 1000
    sink = FileSink(tmp_path, fsync=False)
    evs = [usage_event(i, t_us=now - 1000 * i) for i in range(10)]
    evs += [usage_event(99, tenant="beta", outcome="released", input_tokens=0, output_tokens=0,
                        cost_nano_usd=0, t_us=now)]
    evs += [usage_event(100, t_us=now - 2 * 3600 * 10**6)]  # outside --last 1h
    sink.write(evs)
    sink.write(evs[:3])  # written twice (a replay after a crash): counted once
    sink.write([RefusalsEvent(minute_us=now - now % MINUTE_US, tenant="beta",
                              reason="rate_limited", count=42, instance="t")])
    sink.close()
    st = from_directory(str(tmp_path), now - 3600 * 10**6, now + 1)
    acme = st.usage[("acme", "gpt-4o", "")]
    assert (acme.events, acme.settled, acme.input_tokens, acme.output_tokens) == (
        10, 10, sum(10 + i for i in range(10)), 50)
    assert acme.cost_nano_usd == sum(e.cost_nano_usd for e in evs[:10])
    assert st.usage[("beta", "gpt-4o", "")].released == 1
    assert st.refusals == {("beta", "rate_limited"): 42}

    assert kt(["events", "stats", "--dir", str(tmp_path), "--last", "1h", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    row = next(r for r in doc["usage"] if r["tenant"] == "acme")
    assert row["events"] == 10 and row["cost_nano_usd"] == acme.cost_nano_usd
    assert kt(["events", "stats", "--dir", str(tmp_path), "--last", "30d"]) == 0
    text = capsys.readouterr().out
    assert "acme" in text and " 11 " in text and "rate_limited" in text
    assert kt(["events", "stats", "--dir", str(tmp_path), "--last", "1y"]) == 2
    assert "1h, 24h or 30d" in capsys.readouterr().err
    assert kt(["events", "stats", "--dir", str(tmp_path / "nope")]) == 1



@pytest.mark.subprocess
def test_the_spill_of_a_process_that_is_gone_is_adopted_and_replayed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = int(dead.stdout)
    SpillFile(tmp_path / f"spill-{gone}.jsonl").append([usage_event(1), usage_event(2)])
    alive = SpillFile(tmp_path / f"spill-{os.getppid()}.jsonl")  # a live process's: left alone
    alive.append([usage_event(9)])
    sink = FileSink(tmp_path / "events", fsync=False)
    log = EventLog(sink, SpillFile(tmp_path / f"spill-{os.getpid()}.jsonl"),
                   flush_interval_s=0.01)
    log.start()
    log.emit(usage_event(3))
    deadline = time.monotonic() + 5
    while log.written < 3 and time.monotonic() < deadline:
        log.flush()
        time.sleep(0.01)
    log.close()
    got = sorted(e.request_id for e in read_events(event_files(tmp_path / "events")))
    assert got == ["req-1", "req-2", "req-3"]
    assert not (tmp_path / f"spill-{gone}.jsonl").exists()
    assert (tmp_path / f"spill-{os.getppid()}.jsonl").exists()
