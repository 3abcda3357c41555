"""envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit: translation only.

Descriptor entries: `tenant` (required), `model` (optional). `hits_addend` is the
request's token estimate (0 = not given: the policy's default estimate applies). Envoy
1.40 sends it on the descriptor (`RateLimitDescriptor.hits_addend`, a UInt64Value) when the
filter's rate_limits set `hits_addend`; the request-level field is the older form and is
read only when no descriptor carries one.
Every refusal is OVER_LIMIT (Envoy answers it with 429, or its configured
`rate_limited_status`); our status, headers and OpenAI-style body ride along
in response_headers_to_add and raw_body.
"""
from __future__ import annotations

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from sidecar import contract
from sidecar.model import Request
from sidecar.decision.service import Decider
from sidecar.transports.authz import header_options, metadata_struct

TENANT_KEY = "tenant"
MODEL_KEY = "model"
_OK = rls_pb2.RateLimitResponse.OK
_OVER = rls_pb2.RateLimitResponse.OVER_LIMIT


def request_from_rls(req: rls_pb2.RateLimitRequest) -> Request:
    tenant = model = None
    hits = None
    for descriptor in req.descriptors:
        if hits is None and descriptor.HasField("hits_addend"):
            hits = descriptor.hits_addend.value
        for entry in descriptor.entries:
            if entry.key == TENANT_KEY and tenant is None:
                tenant = entry.value
            elif entry.key == MODEL_KEY and model is None:
                model = entry.value
    tokens = req.hits_addend if hits is None else hits
    return Request(headers={}, tenant=tenant if tenant is not None else "", model=model or None,
                   tokens=tokens if tokens > 0 else None)


def rls_response(ans: contract.Answer, n_descriptors: int) -> rls_pb2.RateLimitResponse:
    code = _OK if ans.allowed else _OVER
    resp = rls_pb2.RateLimitResponse(
        overall_code=code,
        statuses=[rls_pb2.RateLimitResponse.DescriptorStatus(code=code)
                  for _ in range(max(1, n_descriptors))],
        response_headers_to_add=[o.header for o in header_options(ans.response_headers)],
        dynamic_metadata=metadata_struct(ans.metadata))
    if ans.allowed:
        resp.request_headers_to_add.extend(o.header for o in header_options(ans.upstream_headers))
    else:
        resp.raw_body = ans.body
    return resp


class RateLimitServicer(rls_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, service: Decider) -> None:
        self.service = service

    async def ShouldRateLimit(self, request, context):  # noqa: N802 (gRPC method name)
        decision = await self.service.decide(request_from_rls(request), "rls")
        ans = contract.answer(decision)
        if ans.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, ans.body.decode())
        return rls_response(ans, len(request.descriptors))
