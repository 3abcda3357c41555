"""Red-team probe: the usage filter's request selector (lua/envoy_usage.lua, select_feed)
against Python's json, on bodies a hostile client may write, cut into random chunks.

The selector's Lua (from "local MAX_LINE" up to report_body) runs unchanged in Valkey's
Lua 5.1 (EVAL; Envoy runs LuaJIT, the same language and string library): fed the chunks,
it returns what it would report for each of the bound's keys. Python's json (the last of
a repeated key, as providers' parsers keep) says what a provider reads. A body where the
provider reads a larger n / max-output than the filter reports is a hidden-n finding.

  PYTHONPATH=. python bench/redteam_filter_fuzz.py [--cases 3000] [--seed 1]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.valkey import Valkey  # noqa: E402

KEYS = ["n", "best_of", "max_tokens", "max_completion_tokens", "max_output_tokens",
        "previous_response_id", "conversation"]


def lua_source() -> str:
    src = (ROOT / "lua" / "envoy_usage.lua").read_text()
    start = src.index("local MAX_LINE")
    end = src.index("local function is_object")
    # with_stream_usage etc. are plain functions: harmless; the driver feeds the chunks
    return src[start:end] + """
local sel = selector(REQUEST_PATHS, true)
for i = 1, #ARGV do select_feed(sel, ARGV[i]) end
local out = {}
for _, k in ipairs(REQUEST_KEYS) do
  local v = sel.found[k]
  if sel.over[k] then v = '"?"' end
  out[#out + 1] = k
  out[#out + 1] = v or ''
end
return out
"""


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return [c for c in out if c]


def esc(key: str, rng: random.Random) -> str:
    return "".join(f"\\u{ord(c):04x}" if rng.random() < 0.4 else c for c in key)


def body(rng: random.Random) -> str:
    parts = ['"model": "gpt-4o"']
    filler = ['"messages": [{"role": "user", "content": "a \\\\\\" }, {\\"n\\": 99 \\\\"}]',
              '"metadata": {"n": 77, "max_tokens": 5}', '"x": "\\\\"', '"y": [1, {"n": 3}, "]"]',
              '"s": "\\\\\\\\\\"n\\": 55"', '"e": {}', '"a": []']
    for _ in range(rng.randint(1, 6)):
        r = rng.random()
        if r < 0.5:
            k = rng.choice(KEYS[:5])
            v = rng.choice(["8", "1", "64", "8.0", "1e1", "null", "2.5", '"8"', "0", "-1"])
            ws = rng.choice(["", " ", "\n\t ", "   "])
            parts.append(f'"{esc(k, rng)}"{ws}:{ws}{v}{ws}')
        else:
            parts.append(rng.choice(filler))
    rng.shuffle(parts)
    return "{" + ", ".join(parts) + "}"


def provider_reads(text: str) -> dict:
    doc = json.loads(text)
    return {k: doc[k] for k in KEYS if k in doc}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    findings = []
    with tempfile.TemporaryDirectory() as d:
        v = Valkey(Path(d)).start()
        try:
            r = redis.Redis(port=v.port)
            script = r.register_script(lua_source())
            for _ in range(args.cases):
                text = body(rng)
                try:
                    want = provider_reads(text)
                except ValueError:
                    continue
                data = text.encode()
                parts = chunks(data, rng)
                got_flat = script(args=parts)
                got = {got_flat[i].decode(): got_flat[i + 1].decode()
                       for i in range(0, len(got_flat), 2) if got_flat[i + 1]}
                for k, val in want.items():
                    seen = got.get(k)
                    ok = seen is not None and (seen == '"?"' or json.loads(seen) == val)
                    if not ok:
                        findings.append({"body": text, "chunks": [p.decode() for p in parts],
                                         "key": k, "provider": val, "filter": seen})
                        break
                else:
                    extra = set(got) - set(want)
                    if extra:
                        findings.append({"body": text, "key": sorted(extra),
                                         "provider": None, "filter": got})
        finally:
            v.kill()
    print(json.dumps({"cases": args.cases, "findings": len(findings),
                      "first": findings[:3]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
