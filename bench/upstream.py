"""A fake OpenAI-compatible upstream fast enough not to be what the full path measures.

An Envoy (`--concurrency 1`) answering every POST with a direct response after reading
the body (the buffer filter: a direct response to an unread body closes the connection),
one listener per tier so each answers with its own model:
- a `chat.completion` JSON body with a `usage` block;
- with the request header `x-bench-stream` present, a `text/event-stream` body: a few
  content chunks, then the usage chunk of `stream_options.include_usage`, then [DONE]
  (Envoy sends a direct response's body in one piece, so a filter that works per chunk
  sees one chunk: the best case for it; a real stream has one chunk per few tokens).

tests/support/upstream.py is the test suite's fake (Python, per-request controls); it
serves a few hundred requests per second, this one tens of thousands
(`python bench/run.py` measures it alone as `upstream_alone`).
"""
from __future__ import annotations

import json

import yaml

TYPE = "type.googleapis.com/"
# tokens every reply reports (the chat-short profile: 200 in, 150 out)
USAGE = (200, 150)
STREAM_HEADER = "x-bench-stream"
CONTENT_CHUNKS = 8


def completion(model: str, usage: tuple[int, int] = USAGE) -> str:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": "ok " * 40}}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                  "total_tokens": usage[0] + usage[1]}}, separators=(",", ":"))


def stream(model: str, usage: tuple[int, int] = USAGE) -> str:
    def event(doc: dict) -> str:
        return "data: " + json.dumps(doc, separators=(",", ":")) + "\n\n"

    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "system_fingerprint": "fp_bench"}
    out = [event(dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                      usage=None))]
    out += [event(dict(head, choices=[{"index": 0, "delta": {"content": "ok ok ok ok ok "}}],
                       usage=None)) for _ in range(CONTENT_CHUNKS)]
    out.append(event(dict(head, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
                          usage=None)))
    out.append(event(dict(head, choices=[], usage={
        "prompt_tokens": usage[0], "completion_tokens": usage[1],
        "total_tokens": usage[0] + usage[1]})))
    out.append("data: [DONE]\n\n")
    return "".join(out)


def _listener(name: str, port: int, model: str) -> dict:
    routes = [
        {"match": {"prefix": "/", "headers": [{"name": STREAM_HEADER, "present_match": True}]},
         "direct_response": {"status": 200, "body": {"inline_string": stream(model)}},
         "response_headers_to_add": [{"header": {"key": "content-type",
                                                 "value": "text/event-stream"}}]},
        {"match": {"prefix": "/"},
         "direct_response": {"status": 200, "body": {"inline_string": completion(model)}},
         "response_headers_to_add": [{"header": {"key": "content-type",
                                                 "value": "application/json"}}]},
    ]
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": TYPE + "envoy.extensions.filters.network.http_connection_manager.v3."
                                "HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [
                    {"name": name, "domains": ["*"], "routes": routes}]},
                "http_filters": [
                    {"name": "envoy.filters.http.buffer", "typed_config": {
                        "@type": TYPE + "envoy.extensions.filters.http.buffer.v3.Buffer",
                        "max_request_bytes": 1 << 20}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


def bootstrap(admin_port: int, tiers: dict[str, tuple[int, str]]) -> str:
    """tiers: name -> (port, model the replies name)."""
    return yaml.safe_dump({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                  "port_value": admin_port}}},
        "static_resources": {"listeners": [_listener(f"upstream_{name}", port, model)
                                           for name, (port, model) in tiers.items()]},
    }, sort_keys=False, width=1 << 20)
