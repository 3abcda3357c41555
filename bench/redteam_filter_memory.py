"""Red-team probe: the usage filter's request selector (lua/envoy_usage.lua, select_feed)
keeps one Lua table per open "[" or "{" of a body over the part the decision reads
(sel.stack, no depth limit), so a body of brackets costs Envoy tens of bytes of Lua
memory per byte sent, held until the request ends: a few concurrent requests of a few MB
each (admitted: a body over 64 KiB is sized from content-length, never parsed) take
hundreds of MB of the Envoy that fronts every tenant.

  PYTHONPATH=. python bench/redteam_filter_memory.py [--mb 4] [--concurrent 1]

A real Envoy from `kt envoy-config`'s renderer, `kt serve`, the fake upstream (it reads
and refuses to parse the body, like a provider). Printed: Envoy's peak RSS (VmHWM) after
a body of plain JSON text and after a body of the same size made of "[", each request
answered before the next; and the ratio of the growth to the bytes sent.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.test_redteam_findings import gateway  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(port: int, tenant: str, body: bytes) -> bytes:
    head = (b"POST /v1/responses HTTP/1.1\r\nhost: llm\r\nx-tenant-id: %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (tenant.encode(), len(body)))
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head)
        view = memoryview(body)
        for i in range(0, len(body), 1 << 16):
            sock.sendall(view[i:i + (1 << 16)])
        got = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got[:64]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--concurrent", type=int, default=1)
    args = ap.parse_args()
    size = int(args.mb * 1024 * 1024)
    plain = json.dumps({"model": "gpt-4o", "input": "x" * size}).encode()
    brackets = b'{"model": "gpt-4o", "input": ' + b"[" * size + b"}"
    # structure without depth: a string, an object, a comma every few bytes
    flat = b'{"model": "gpt-4o", "input": [' + b'"",{},' * (size // 6) + b'""]}'
    out = {}
    with FakeUpstream("llm") as up, gateway(up.address) as (_sidecar, envoy):
        pid = envoy.proc.pid
        out["start_kb"] = rss_kb(pid, "VmHWM")
        for name, body in (("plain", plain), ("flat", flat), ("brackets", brackets)):
            before = rss_kb(pid, "VmHWM")
            cpu0 = cpu_s(pid)
            threads = [threading.Thread(target=lambda i=i, name=name, body=body: out.setdefault(
                f"{name}_status_{i}", send(envoy.listen_port, f"t{i}", body)[:12].decode()))
                for i in range(args.concurrent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = rss_kb(pid, "VmHWM")
            out[name] = {"envoy_cpu_s": round(cpu_s(pid) - cpu0, 2),"bytes_sent": len(body) * args.concurrent, "peak_rss_kb_before": before,
                         "peak_rss_kb_after": after,
                         "growth_per_byte_sent": round((after - before) * 1024
                                                       / (len(body) * args.concurrent), 1)}
            print(name, out[name], flush=True)
        out["envoy_alive"] = envoy.proc.poll() is None
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
