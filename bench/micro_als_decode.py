"""upb against a reader of our own, for the access log's entries: CPU per entry to decode a
StreamAccessLogsMessage and read every field the receiver reads (headers, request id,
status, whether a response flag is set, the usage filter's metadata, the three upstream
timings, route name, body sizes), on the entries bench/micro_usage_log.py sends.

  python bench/micro_als_decode.py [--entries N] [--runs R]

The reader is bench/als_wire_reader.pyx, a prototype compiled here by pyximport (Cython
is a build dependency of the project); both must read the same values (checked first).
Prints the median and minimum of R alternated runs per reader.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyximport

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
pyximport.install(language_level=3)

import als_wire_reader  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2  # noqa: E402
from micro_usage_log import messages  # noqa: E402
from sidecar import contract  # noqa: E402
from sidecar.upstream_sli import duration_us  # noqa: E402

NS = contract.USAGE_METADATA_NAMESPACE


def with_upb(wire: list[bytes]) -> list[tuple]:
    out = []
    for data in wire:
        for e in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry:
            r, cp = e.request, e.common_properties
            fm = cp.metadata.filter_metadata
            usage = ({k: v.string_value for k, v in fm[NS].fields.items()} if NS in fm
                     else None)
            out.append((dict(r.request_headers), r.request_id, e.response.response_code.value,
                        cp.response_flags.ByteSize() > 0, usage,
                        duration_us(cp.time_to_first_upstream_tx_byte),
                        duration_us(cp.time_to_first_upstream_rx_byte),
                        duration_us(cp.time_to_last_upstream_rx_byte), cp.route_name,
                        r.request_body_bytes, e.response.response_body_bytes))
    return out


def with_reader(wire: list[bytes]) -> list[tuple]:
    out: list[tuple] = []
    for data in wire:
        out.extend(als_wire_reader.read_message(data, NS))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=6400)
    ap.add_argument("--runs", type=int, default=7)
    a = ap.parse_args()
    wire = messages(a.entries, 64, 0, [f"res-{i}" for i in range(a.entries)])
    if with_upb(wire) != with_reader(wire):
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
