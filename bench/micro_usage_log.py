"""The usage path's own Python, in process: access-log messages as Envoy sends them (many
entries each, the usage the Lua filter leaves in metadata), handed to the sidecar's
receiver after the decisions that reserved them, on uvloop. The embedded backend by
default, or a real Valkey (`--redis`, started here): what is left is the sidecar's CPU
per settled request (decode, parse the usage, settle, count), the part a code change can
move; with `--redis` also Valkey's CPU and commands per settled request.

  python bench/micro_usage_log.py [--entries N] [--batch B] [--runs R] [--redis] [--profile]
                                  [--slis-ab] [--ledger] [--sort tottime]

Prints the median (min–max) of R runs in µs of CPU per settled request. `--slis-ab`: each
run twice, with the upstream SLIs (sidecar/upstream_sli.py: read the timings, observe the
histograms, carry them to the event) and without (the access-log receiver's call to them
replaced by one returning nothing), alternated in the same process, and both medians.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import FULL_HOT, full_path_requests, policy, valkey_calls  # noqa: E402
from upstream import USAGE, completion, stream  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2  # noqa: E402
from sidecar import contract  # noqa: E402
from sidecar.model import Request  # noqa: E402
from sidecar.policy.load import parse_policy  # noqa: E402
from sidecar.flows import Flows  # noqa: E402
from sidecar.transports import als  # noqa: E402
from sidecar.transports.als import UsageLogReceiver  # noqa: E402


def lua_selection(streamed: bool) -> tuple[str, str]:
    """What envoy/usage.lua leaves in metadata for the bench upstream's replies."""
    if streamed:
        lines = [line for line in stream("gpt-4o").split("\n") if line.startswith("data:")]
        keep = [lines[0]] + [line for line in lines if '"usage":{' in line]
        return "sse", "".join(line + "\n\n" for line in keep)
    doc = json.loads(completion("gpt-4o"))
    return "json", json.dumps({"usage": doc["usage"], "model": doc["model"]},
                              separators=(",", ":"))


def messages(n: int, batch: int, run: int, reservations: list[str]) -> list[bytes]:
    """n entries (tenants and streaming as the full-path bench), `batch` per message, each
    naming the reservation its decision made (x-kt-reservation, as Envoy logs it)."""
    reqs = full_path_requests()
    out, msg = [], None
    for i in range(n):
        if msg is None:
            msg = als_pb2.StreamAccessLogsMessage()
        tenant, streamed = reqs[i % len(reqs)]
        e = msg.http_logs.log_entry.add()
        e.request.request_id = f"r{run}-{i}"
        e.request.request_headers[contract.H_TENANT] = tenant
        e.request.request_headers[contract.H_RESERVATION] = reservations[i]
        e.response.response_code.value = 200
        # what Envoy's access log carries besides (the upstream SLIs read it): the route's
        # name, the routed model, body sizes and the upstream timings
        e.request.request_headers[contract.H_MODEL] = "gpt-4o"
        e.request.request_body_bytes = 900
        e.response.response_body_bytes = 2400 if streamed else 600
        cp = e.common_properties
        cp.route_name = "POST /v1/chat/completions"
        cp.time_to_first_upstream_tx_byte.FromMilliseconds(2)
        cp.time_to_first_upstream_rx_byte.FromMilliseconds(350)
        cp.time_to_last_upstream_rx_byte.FromMilliseconds(2900 if streamed else 1500)
        key, text = lua_selection(streamed)
        e.common_properties.metadata.filter_metadata[
            contract.USAGE_METADATA_NAMESPACE].fields[key].string_value = text
        if len(msg.http_logs.log_entry) == batch:
            out.append(msg.SerializeToString())
            msg = None
    if msg is not None:
        out.append(msg.SerializeToString())
    return out


async def one_run(service: Flows, n: int, batch: int, run: int,
                  valkey=None, prof=None) -> tuple[float, float, float]:
    """(sidecar µs CPU, Valkey µs CPU, Valkey commands) per settled request."""
    body = json.dumps({"model": "gpt-4o", "max_tokens": USAGE[1],
                       "messages": [{"role": "user", "content": "x" * 760}]}).encode()
    reqs = full_path_requests()
    reservations = []
    for i in range(n):  # the decisions that reserved what the log entries settle
        tenant, _ = reqs[i % len(reqs)]
        d = await service.decider.decide(Request(headers={"x-tenant-id": tenant}, body=body,
                                         request_id=f"r{run}-{i}"))
        reservations.append(d.reservation_id)
    wire = messages(n, batch, run, reservations)
    receiver = UsageLogReceiver(service.settlement)

    # as gRPC hands the messages over: bytes (sidecar/transports/als.py's handler), or
    # decoded by upb for code before it read them itself (bench/ab_micro.sh's control)
    raw = hasattr(als, "read_entries")

    async def incoming():
        for data in wire:
            yield data if raw else als_pb2.StreamAccessLogsMessage.FromString(data)

    settled0 = sum(s.value for s in service.metrics.settlements.collect()[0].samples
                   if s.name.endswith("_total"))
    if valkey is not None:
        calls0, v0 = sum(valkey_calls(valkey.port).values()), _cpu(valkey.pid)
    if prof is not None:  # the receiver alone, not the decisions or the bench's messages
        prof.enable()
    t0 = time.process_time()
    await receiver.StreamAccessLogs(incoming(), None)
    events = service.ledger.events
    if events is not None:  # the writer thread's share (encode, write) is counted too
        events.flush()
    cpu = time.process_time() - t0
    if prof is not None:
        prof.disable()
    v_us = v_cmds = float("nan")
    if valkey is not None:
        v_us = 1e6 * (_cpu(valkey.pid) - v0) / n
        v_cmds = (sum(valkey_calls(valkey.port).values()) - calls0) / n
    settled = sum(s.value for s in service.metrics.settlements.collect()[0].samples
                  if s.name.endswith("_total")) - settled0
    if settled != n:
        raise SystemExit(f"settled {settled} of {n}")
    return 1e6 * cpu / n, v_us, v_cmds


async def main_async(a) -> None:
    valkey = None
    if a.redis:
        from sidecar.backends.redis import RedisBackend
        from tests.support.procs import workdir
        from tests.support.valkey import Valkey

        wd = workdir("kt-micro-")
        d = wd.__enter__()
        valkey = Valkey(d).start()
        pol = parse_policy(policy(valkey.url).encode(), "<bench>")
        backend = RedisBackend(pol.backend)
    else:
        from sidecar.backends.memory import MemoryBackend

        text = policy("redis://unused").split("backend:")[0]
        pol = parse_policy(text.encode(), "<bench>")
        backend = MemoryBackend()
    await backend.start()
    ledger = None
    if a.ledger:  # the default ledger: JSON Lines files, written by its thread (no fsync)
        import tempfile

        from sidecar.ledger.config import LedgerConfig
        from sidecar.ledger.recorder import build_ledger

        ledger = build_ledger(LedgerConfig(dir=tempfile.mkdtemp(prefix="kt-micro-ledger-"),
                                           fsync=False))
        ledger.start()
    service = Flows(pol, backend, ledger=ledger)
    try:
        await one_run(service, min(a.entries, 2000), a.batch, -1)  # warm up
        results: list[float] = []
        valkey_us: list[float] = []
        valkey_cmds: list[float] = []
        prof = cProfile.Profile() if a.profile else None
        if a.slis_ab:
            await slis_ab(service, a, valkey)
            return
        for run in range(a.runs):
            us, v_us, v_cmds = await one_run(service, a.entries, a.batch, run, valkey, prof)
            results.append(us)
            valkey_us.append(v_us)
            valkey_cmds.append(v_cmds)
        print(f"{statistics.median(results):.1f} µs CPU per settled request (decision excluded"
              f"; min {min(results):.1f}, max {max(results):.1f}; {a.runs} runs of "
              f"{a.entries} entries, {a.batch} per message, backend {backend.name}"
              f"{', file ledger' if a.ledger else ''})")
        if valkey is not None:
            print(f"Valkey: {statistics.median(valkey_us):.1f} µs CPU and "
                  f"{statistics.median(valkey_cmds):.2f} commands (a script's own included) "
                  "per settled request")
        if prof:
            pstats.Stats(prof).sort_stats(a.sort).print_stats(30)
    finally:
        await backend.close()
        if ledger is not None:
            ledger.close()
        if valkey is not None:
            valkey.stop()


async def slis_ab(service: Flows, a, valkey) -> None:

    with_slis = als.from_access_log
    results: dict[bool, list[float]] = {True: [], False: []}
    for run in range(a.runs):
        for on in ((True, False) if run % 2 == 0 else (False, True)):
            als.from_access_log = with_slis if on else (lambda *args: None)
            try:
                us, _, _ = await one_run(service, a.entries, a.batch, 2 * run + on, valkey)
            finally:
                als.from_access_log = with_slis
            results[on].append(us)
    # the minimum too: on a shared machine, the run least disturbed by others
    for what, f in (("median", statistics.median), ("min", min)):
        on, off = f(results[True]), f(results[False])
        print(f"{what}: with SLIs {on:.1f} µs, without {off:.1f} µs CPU per settled request: "
              f"{on - off:+.1f} µs ({100 * (on - off) / off:+.1f}%)")
    print(f"({a.runs} runs each, alternated; with {sorted(round(x, 1) for x in results[True])}, "
          f"without {sorted(round(x, 1) for x in results[False])})")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--slis-ab", action="store_true")
    ap.add_argument("--ledger", action="store_true",
                    help="with the default ledger (JSON Lines files, its writer thread "
                         "counted; fsync off); without it the ledger records nothing")
    ap.add_argument("--sort", default="cumulative", help="--profile's order (tottime, ...)")
    a = ap.parse_args()
    assert FULL_HOT > 0
    uvloop.run(main_async(a))


if __name__ == "__main__":
    main()
