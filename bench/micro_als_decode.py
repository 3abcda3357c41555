"""upb against the access log's own wire reader (native/als_wire.pyx, sidecar/_als_wire):
CPU per entry to decode a StreamAccessLogsMessage and read every field the receiver reads
(headers, request id, status, response flags, the usage filter's metadata, the three
upstream timings, route name, body sizes), on the entries bench/micro_usage_log.py sends.

  python bench/micro_als_decode.py [--entries N] [--runs R]

upb's side is what the receiver did before (FromString, then the reads:
sidecar/transports/als.py's entry_fields); both must read the same values (checked first).
Prints the median and minimum of R alternated runs per reader.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from envoy.service.accesslog.v3 import als_pb2  # noqa: E402
from micro_usage_log import messages  # noqa: E402
from sidecar import _als_wire, contract  # noqa: E402
from sidecar.transports.als import _flag_set, entry_fields  # noqa: E402

NS = contract.USAGE_METADATA_NAMESPACE


def with_upb(wire: list[bytes]) -> list[tuple]:
    return [entry_fields(e) for data in wire
            for e in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry]


def with_reader(wire: list[bytes]) -> list[tuple]:
    out: list[tuple] = []
    for data in wire:
        out.extend(_als_wire.read_message(data, NS))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=6400)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    wire = messages(a.entries, 64, 0, [f"res-{i}" for i in range(a.entries)])
    same = [[r[:3] + (_flag_set(r[3]),) + r[4:] for r in read(wire)]
            for read in (with_upb, with_reader)]
    if same[0] != same[1]:
        raise SystemExit("the reader and upb read different values")
    results: dict[str, list[float]] = {"upb": [], "reader": []}
    for run in range(a.runs):
        order = [("upb", with_upb), ("reader", with_reader)]
        for name, read in (order if run % 2 else order[::-1]):
            t0 = time.process_time()
            read(wire)
            results[name].append(1e6 * (time.process_time() - t0) / a.entries)
    for name, us in results.items():
        print(f"{name}: {statistics.median(us):.2f} µs per entry (min {min(us):.2f}; "
              f"{a.runs} runs of {a.entries})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
