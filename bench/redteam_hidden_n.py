"""Red-team probe: `n` in a body larger than the part Envoy passes to the decision
(64 KiB), in a streamed chat request the client leaves before its usage chunk. A truncated
body is not parsed at all, so `n` is unseen wherever it is written (first or last).

  PYTHONPATH=. python bench/redteam_hidden_n.py [--n 64] [--output 1500]

The stack of bench/attacks.py (`kt serve`, embedded backend; Envoy from `kt envoy-config`'s
renderer; the fake upstream, which bills the body's size as input and --output tokens per
choice, and holds the stream after its first chunk). The decision sees a truncated body
sized from content-length: no `n`, no `max_tokens`, so the bound for unreadable usage is
one choice of the model's max_output_tokens. Printed: spend (GET /v1/spend) against the bill,
for the same request with `n` first in the body and last.

Measured (--n 64 --output 1500, bill $1.0054 each): on 9441c9d 20.8% of the bill for both
(bench/results/redteam-hidden-n-9441c9d-before.json, run from an export of that commit);
after the usage filter's whole-body report, 1047% for both: 64 choices of the bound
(bench/results/redteam-hidden-n-after.json).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.attacks import CHARGE_POLICY, LOOP, _spend_row, target  # noqa: E402


def leave_before_usage(t, tenant: str, data: bytes, inp: int, out: int) -> dict:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\nx-tenant-id: %s\r\n"
            b"x-fake-usage: %d,%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % (tenant.encode(), inp, out, len(data)))
    t.upstream.release_stream.clear()
    try:
        with socket.create_connection((LOOP, t.envoy.listen_port), timeout=10) as sock:
            sock.sendall(head + data)
            received = b""
            while b'"first"' not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        t.upstream.release_stream.set()
    return _spend_row(t, tenant, int(received.split(b" ", 2)[1]), inp, out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--output", type=int, default=1500, help="output tokens per choice")
    args = ap.parse_args()
    policy = CHARGE_POLICY % {"max_out": ", max_output_tokens: 16384"}
    prompt = "Tell me a long story. " * 3300  # ~72 KB: over the 64 KiB the decision reads
    out: dict = {}
    with target(policy) as t:
        for where in ("n_first", "n_last"):
            body = {"n": args.n} if where == "n_first" else {}
            body.update({"model": "gpt-4o", "stream": True,
                         "messages": [{"role": "user", "content": prompt}]})
            if where == "n_last":
                body["n"] = args.n
            data = json.dumps(body).encode()
            out[where] = leave_before_usage(t, f"hidden-{where}", data, -(-len(data) // 4),
                                            args.output * args.n)
            print(where, out[where], flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
