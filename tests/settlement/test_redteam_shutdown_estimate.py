"""Red team: a clean stop (every rolling deploy, every scale-down) settled each open
reservation at its *estimate* and set the request's idempotency marker, so the real usage
arriving after the restart charged nothing and the client paid its own estimate (a chat
body without max_tokens: its input and the policy's default 256 output tokens). Fixed:
the stop charges each at its bound, what the provider could bill, as every reservation
closed without readable usage is (sidecar/settlement/open_reservations.py, bound.py).

In process (the embedded backend on a state file, two sidecars one after the other), so
it costs well under a second."""
from __future__ import annotations

import json
import urllib.request

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.support.inproc import RunningSidecar
from tests.support.procs import post_json

POLICY = """
tenant: {header: x-tenant-id, unknown: defaults}
tiers: [{name: default, model: gpt-4o}]
pricing:
  gpt-4o: {input: 0.0025, output: 0.01, max_output_tokens: 16384}
defaults:
  limits: {rpm: 100000, tpm: 100000000}
  budget: {usd: 100, period: month}
tenants:
  acme: {}
"""
BODY = json.dumps({"model": "gpt-4o", "stream": True,
                   "messages": [{"role": "user", "content": "Write a long story."}]})
GENERATED = 12_000  # output tokens the provider generated and billed (under 16,384)


def _check(sc: RunningSidecar) -> str:
    with grpc.insecure_channel(sc.grpc_target) as ch:
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.body = "POST", "/v1/chat/completions", BODY
        http.headers["x-tenant-id"] = "acme"
        http.headers["content-type"] = "application/json"
        http.headers["content-length"] = str(len(BODY))
        resp = external_auth_pb2_grpc.AuthorizationStub(ch).Check(req, timeout=5)
    assert resp.status.code == 0, resp
    rid = {o.header.key: o.header.value for o in resp.ok_response.headers}.get(
        "x-kt-reservation", "")
    assert rid
    return rid


def _output_tokens(sc: RunningSidecar) -> int:
    with urllib.request.urlopen(sc.admin_base + "/v1/spend", timeout=5) as r:
        doc = json.load(r)
    return sum(m["output_tokens"] for m in doc["tenants"].get("acme", {}).values())


def test_a_stream_open_at_a_clean_stop_is_not_charged_at_its_estimate(tmp_path):
    state = str(tmp_path / "state.json")
    with RunningSidecar(POLICY, state_file=state) as sc:
        rid = _check(sc)
    # the stop (RunningSidecar's exit: Sidecar.stop) kept it at its bound
    with RunningSidecar(POLICY, state_file=state) as sc:
        # today 256 here: the policy's default output, what the client chose to show
        status, ack = post_json(sc.admin_base + "/v1/usage", {
            "request_id": rid, "tenant": "acme", "model": "gpt-4o", "input_tokens": 10,
            "output_tokens": GENERATED})
        assert status == 200, ack
        # what the provider billed, or what it could have billed (the bound), not 256
        assert _output_tokens(sc) >= GENERATED, ack
