"""The access log's receiver settles every entry of a message with its own usage and its
own provider's answer, whether the settlements finish at once (embedded backend) or wait
together for one batched script call (Redis): the upstream answer each ledger event takes
travels in a context variable (sidecar/upstream_sli.py), which must stay each entry's own
while the others run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from sidecar import contract
from sidecar.backends.redis import RedisBackend
from sidecar.ledger.events import UsageEvent
from sidecar.ledger.recorder import Ledger
from sidecar.ledger.sinks import FileSink, SpillFile, event_files, read_events
from sidecar.ledger.writer import EventLog
from sidecar.model import Kind, Request
from sidecar.policy.load import parse_policy
from sidecar.transports.als import UsageLogReceiver
from tests.support.inproc import RunningSidecar
from tests.support.policies import TIERS_AND_PRICING

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
""" + TIERS_AND_PRICING + """defaults:
  limits: {rpm: 100000, tpm: 100000000}
  budget: {usd: 1000, period: month}
"""
ENTRIES = 40


def entry(rid: str, tenant: str, i: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """Entry i: its own usage (i+1 prompt, 2i+1 completion tokens), status and timings;
    every third a failed upstream (released), every fifth a reply without usage (kept)."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_headers[contract.H_RESERVATION] = rid
    e.request.request_headers[contract.H_TENANT] = tenant
    e.response.response_code.value = 503 if i % 3 == 2 else 200
    cp = e.common_properties
    cp.route_name = f"route-{i}"
    cp.time_to_first_upstream_tx_byte.FromMilliseconds(1)
    cp.time_to_first_upstream_rx_byte.FromMilliseconds(10 + i)
    cp.time_to_last_upstream_rx_byte.FromMilliseconds(100 + i)
    if i % 3 != 2 and i % 5 != 4:
        cp.metadata.filter_metadata[contract.USAGE_METADATA_NAMESPACE].fields[
            "json"].string_value = json.dumps(
                {"model": "gpt-4o", "usage": {"prompt_tokens": i + 1, "completion_tokens": 2 * i + 1}})
    return e


@pytest.mark.parametrize("store", ["embedded", pytest.param("redis", marks=pytest.mark.valkey)])
def test_each_entry_of_a_message_is_settled_with_its_own_usage_and_answer(store, tmp_path: Path,
                                                                          request):
    backend = None
    if store == "redis":
        valkey = request.getfixturevalue("empty_valkey")
        text = POLICY + f"backend: {{kind: redis, url: \"{valkey.url}\"}}\n"
        backend = RedisBackend(parse_policy(text.encode(), "<test>").backend)  # type: ignore[arg-type]
    else:
        text = POLICY
    led = Ledger(EventLog(FileSink(tmp_path, fsync=False), SpillFile(tmp_path / "spill.jsonl"),
                          flush_interval_s=0.01))
    with RunningSidecar(text, backend=backend, ledger=led) as sc:
        flows = sc.sidecar.service
        body = json.dumps({"model": "gpt-4o", "max_tokens": 50,
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        rids = []
        for i in range(ENTRIES):
            d = sc.run(flows.decider.decide(Request(headers={"x-tenant-id": f"t{i % 4}"},
                                                     body=body)))
            assert d.kind is Kind.ALLOW, d
            rids.append(d.reservation_id)
        msg = als_pb2.StreamAccessLogsMessage()
        msg.http_logs.log_entry.extend(entry(rid, f"t{i % 4}", i) for i, rid in enumerate(rids))

        async def one_message():
            yield msg.SerializeToString()  # as gRPC hands it over (als.handler)

        sc.run(UsageLogReceiver(flows.settlement).StreamAccessLogs(one_message(), None))
        assert led.events is not None and led.events.flush()
        events = {e.request_id: e for e in read_events(event_files(tmp_path))
                  if isinstance(e, UsageEvent)}
    assert len(events) == ENTRIES
    for i, rid in enumerate(rids):
        e = events[rid]
        assert e.tenant == f"t{i % 4}"
        assert (e.endpoint, e.status) == (f"route-{i}", 503 if i % 3 == 2 else 200), (i, e)
        assert (e.upstream_us, e.ttft_us) == ((99 + i) * 1000, (9 + i) * 1000), (i, e)
        if i % 3 == 2:
            assert (e.outcome, e.input_tokens, e.output_tokens) == ("released", 0, 0), (i, e)
        elif i % 5 == 4:
            assert (e.outcome, e.settled_by) == ("kept", "no_usage"), (i, e)
        else:
            assert (e.outcome, e.input_tokens, e.output_tokens) == (
                "settled", i + 1, 2 * i + 1), (i, e)
