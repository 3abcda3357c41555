"""envoy.service.auth.v3.Authorization/Check (ext_authz over gRPC): translation only."""
from __future__ import annotations

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from sidecar import contract
from sidecar.model import Request
from sidecar.service import DecisionService

METADATA_NAMESPACE = "kt"  # dynamic metadata: filter_metadata["envoy.filters.http.ext_authz"]["kt"]
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK = status_pb2.Status(code=code_pb2.OK)
_DENIED = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)


def header_options(pairs) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v),
                                       append_action=_OVERWRITE) for k, v in pairs]


def metadata_struct(md: dict | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if md:
        s.update({METADATA_NAMESPACE: md})
    return s


def request_from_check(req: external_auth_pb2.CheckRequest) -> Request:
    http = req.attributes.request.http
    if http.headers:
        headers = dict(http.headers)
    else:  # Envoy configured with encode_raw_headers sends header_map instead
        headers = {h.key.lower(): (h.raw_value.decode("utf-8", "replace") or h.value)
                   for h in http.header_map.headers}
    body = http.raw_body or http.body.encode()
    truncated = headers.get("x-envoy-auth-partial-body") == "true"
    # x-request-id, not http.id: ext_proc and usage reports see the same x-request-id
    return Request(headers=headers, body=body, body_truncated=truncated,
                   request_id=headers.get("x-request-id", ""))


def check_response(ans: contract.Answer) -> external_auth_pb2.CheckResponse:
    if ans.allowed:
        return external_auth_pb2.CheckResponse(
            status=_OK,
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=header_options(ans.upstream_headers),
                response_headers_to_add=header_options(ans.response_headers)),
            dynamic_metadata=metadata_struct(ans.metadata))
    return external_auth_pb2.CheckResponse(
        status=_DENIED,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=ans.status),
            headers=header_options(ans.response_headers),
            body=ans.body.decode()),
        dynamic_metadata=metadata_struct(ans.metadata))


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, service: DecisionService) -> None:
        self.service = service

    async def Check(self, request, context):  # noqa: N802 (gRPC method name)
        decision = await self.service.decide(request_from_check(request), "authz")
        ans = contract.answer(decision)
        if ans.unavailable:
            # UNAVAILABLE, not UNKNOWN: Envoy treats UNKNOWN as OK, and must see a failure
            await context.abort(grpc.StatusCode.UNAVAILABLE, ans.body.decode())
        return check_response(ans)
