"""Envoy's own cost of each way to pick usage out of the response, with no sidecar in the
path: Envoy -> the fake upstream (bench/upstream.py), the full path's mixed workload (half
streamed), `--concurrency 1`. Envoy's CPU per request (`/proc`), requests/s with wrk.

  python bench/usage_candidates.py [--runs R] [--seconds S]

Candidates, measured alternately in the same run:
- none:        Envoy -> upstream (the reference)
- lua:         + envoy/usage.lua (what `kt envoy-config --usage als` runs)
- native:      + Envoy's json_to_metadata (response rules, one per usage field) and
               sse_to_metadata (work-in-progress API in Envoy 1.40)
- lua_als:     + lua + the gRPC access log to a do-nothing receiver (bench/noop_authz.py als)
- native_als:  + native + the same access log
- lua_als_1s, lua_als_16k: lua_als with the access log's flush interval 1 s and buffer
               256 KiB (fewer, larger batches), or Envoy's default buffer of 16 KiB (0.1 s)

`--only a,b,...` measures those candidates alone (issue 26: the access log's knobs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run import cpu_seconds, probe, run_wrk, start_noop, wrk_script_full  # noqa: E402
from upstream import bootstrap as upstream_bootstrap  # noqa: E402
from sidecar.envoy_config import usage_filter_source  # noqa: E402
from sidecar.envoy_config import TYPE, EnvoyOptions, TierRoute, render  # noqa: E402
from tests.support.procs import EnvoyProcess, free_port, stop_process, workdir  # noqa: E402

LUA = {"name": "envoy.filters.http.lua", "typed_config": {
    "@type": TYPE + "envoy.extensions.filters.http.lua.v3.Lua",
    "default_source_code": {"inline_string": usage_filter_source()}}}
USAGE_FIELDS = (["usage", "prompt_tokens"], ["usage", "completion_tokens"],
                ["usage", "prompt_tokens_details", "cached_tokens"], ["usage", "input_tokens"],
                ["usage", "output_tokens"], ["usage", "cache_read_input_tokens"],
                ["usage", "cache_creation_input_tokens"], ["model"])
NATIVE = [
    {"name": "envoy.filters.http.json_to_metadata", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "response_rules": {"rules": [
            {"selectors": [{"key": k} for k in path],
             "on_present": {"metadata_namespace": "kt.usage", "key": ".".join(path)}}
            for path in USAGE_FIELDS]}}},
    {"name": "envoy.filters.http.sse_to_metadata", "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
        "response_rules": {"content_parser": {
            "name": "envoy.content_parsers.json", "typed_config": {
                "@type": TYPE + "envoy.extensions.content_parsers.json.v3.JsonContentParser",
                "rules": [
                    {"rule": {"selectors": [{"key": "usage"}],
                              "on_present": {"metadata_namespace": "kt.usage", "key": "usage"}}},
                    {"rule": {"selectors": [{"key": "model"}],
                              "on_present": {"metadata_namespace": "kt.usage", "key": "model"}},
                     "stop_processing_after_matches": 1}]}}}}}]


# the access log's flush interval and buffer size: kt envoy-config's (0.1 s, 64 KiB) and
# the alternatives measured against them
ALS_BUFFERS = {"lua_als": ("0.1s", 65536), "native_als": ("0.1s", 65536),
               "lua_als_1s": ("1s", 262144), "lua_als_16k": ("0.1s", 16384)}


def access_log(port: int, flush: str = "0.1s", size: int = 65536) -> dict:
    return {"name": "envoy.access_loggers.http_grpc", "typed_config": {
        "@type": TYPE + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
        "common_config": {"log_name": "kt_usage", "transport_api_version": "V3",
                          "grpc_service": {"envoy_grpc": {"cluster_name": "als"}},
                          "buffer_flush_interval": flush, "buffer_size_bytes": size},
        "additional_request_headers_to_log": ["x-kt-tenant"]}}


def config(listen: int, admin: int, up: dict[str, int], filters: list, als_port: int,
           als_buffer: tuple[str, int] = ("0.1s", 65536)) -> str:
    o = EnvoyOptions(listen_port=listen, admin_port=admin, mode="none", usage="none",
                     tiers=[TierRoute("default", "gpt-4o", f"127.0.0.1:{up['default']}"),
                            TierRoute("compact", "gpt-4o-mini", f"127.0.0.1:{up['compact']}")])
    doc = yaml.safe_load(render(o))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = filters + hcm["http_filters"]
    if als_port:
        hcm["access_log"] = [access_log(als_port, *als_buffer)]
        doc["static_resources"]["clusters"].append({
            "name": "als", "type": "STATIC", "connect_timeout": "0.25s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "als", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": als_port}}}}]}]}})
    return yaml.safe_dump(doc, width=1 << 20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", default="", help="comma-separated candidates (default: all)")
    a = ap.parse_args()
    out: dict[str, list[tuple[float, float, float]]] = {}
    with workdir("kt-usage-cand-") as d:
        ua, up = free_port(), {"default": free_port(), "compact": free_port()}
        script = d / "mixed.lua"
        wrk_script_full(script)
        drain, drain_port = start_noop("als", d)
        try:
            with EnvoyProcess(upstream_bootstrap(ua, {"default": (up["default"], "gpt-4o"),
                                                      "compact": (up["compact"], "gpt-4o-mini")}),
                              d, ua, up["default"]) as upstream:
                candidates = {"none": ([], 0), "lua": ([LUA], 0), "native": (NATIVE, 0),
                              "lua_als": ([LUA], drain_port), "native_als": (NATIVE, drain_port),
                              "lua_als_1s": ([LUA], drain_port),
                              "lua_als_16k": ([LUA], drain_port)}
                if a.only:
                    candidates = {k: candidates[k] for k in a.only.split(",")}
                for run in range(a.runs):
                    for name, (filters, als) in candidates.items():
                        sub = d / f"{name}-{run}"
                        sub.mkdir()
                        admin, listen = free_port(), free_port()
                        with EnvoyProcess(config(listen, admin, up, filters, als,
                                                 ALS_BUFFERS.get(name, ("0.1s", 65536))),
                                          sub, admin, listen) as envoy:
                            probe(envoy.url())
                            run_wrk(envoy.url(), script, 1, 32)  # warm up
                            c0, u0 = cpu_seconds(envoy.proc.pid), cpu_seconds(upstream.proc.pid)
                            r = run_wrk(envoy.url(), script, a.seconds, 32)
                            n = max(r["requests"], 1)
                            out.setdefault(name, []).append((
                                r["rps"], 1e6 * (cpu_seconds(envoy.proc.pid) - c0) / n,
                                1e6 * (cpu_seconds(upstream.proc.pid) - u0) / n))
        finally:
            stop_process(drain)
    ref = statistics.median(v[1] for v in out["none"]) if "none" in out else 0.0
    print("| candidate | req/s median (min–max) | Envoy µs CPU per request median (min–max) "
          "| added to Envoy alone | upstream µs/request |")
    print("|---|---|---|---|---|")
    for name, vals in out.items():
        rps, us, up_us = ([v[i] for v in vals] for i in range(3))
        print(f"| {name} | {statistics.median(rps):.0f} ({min(rps):.0f}–{max(rps):.0f}) "
              f"| {statistics.median(us):.1f} ({min(us):.1f}–{max(us):.1f}) "
              f"| {statistics.median(us) - ref:+.1f} | {statistics.median(up_us):.1f} |")
    print(json.dumps({k: [list(v) for v in vals] for k, vals in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
