"""envoy.service.auth.v3.Authorization/Check (ext_authz over gRPC): translation only.

The allow answer is the hot path, so it is written as wire bytes: a sequence of
one-field CheckResponse fragments. Protobuf parsers merge repeated occurrences
of a message field and append repeated fields, so the concatenation is exactly
the message with all fields set. A header fragment is encoded here (three
length-delimited fields and a varint: ~0.5 µs, against ~2-3 µs to build and
serialize a message object per header, x 10 headers per answer);
tests/transports/test_authz_wire.py holds it equal to the protobuf library's own encoding.
Low-cardinality fragments (status, metadata) are serialized by the library once
and memoized. Denials are rarer and use plain message objects.
"""
from __future__ import annotations

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
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
# status OK and an explicitly present (possibly empty) ok_response
_OK_STATUS_BYTES = external_auth_pb2.CheckResponse(
    status=_OK, ok_response=external_auth_pb2.OkHttpResponse()).SerializeToString()
# memoized fragments; values such as remaining counts vary, so the cache is bounded
_FRAGMENTS_MAX = 100_000
_fragments: dict[tuple, bytes] = {}


def header_options(pairs) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v),
                                       append_action=_OVERWRITE) for k, v in pairs]


def metadata_struct(md: dict | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if md:
        s.update({METADATA_NAMESPACE: md})
    return s


def _fragment(key: tuple, build) -> bytes:
    frag = _fragments.get(key)
    if frag is None:
        if len(_fragments) >= _FRAGMENTS_MAX:
            _fragments.clear()
        frag = _fragments[key] = build().SerializeToString()
    return frag


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [_varint(i) for i in range(1 << 14)]  # every length under 16 KiB
_LEN_TAGS = {n: _varint(n << 3 | 2) for n in (1, 2, 3, 6)}


def _len_field(number: int, payload: bytes) -> bytes:
    n = len(payload)
    return _LEN_TAGS[number] + (_SMALL_VARINTS[n] if n < 16384 else _varint(n)) + payload


# field numbers: CheckResponse.ok_response = 3; OkHttpResponse.headers = 2,
# .response_headers_to_add = 6; HeaderValueOption.header = 1, .append_action = 3;
# HeaderValue.key = 1, .value = 2
_OK_FIELDS = {"headers": 2, "response_headers_to_add": 6}
_APPEND_OVERWRITE = bytes([3 << 3 | 0]) + _varint(_OVERWRITE)
_UNIQUE = contract.H_RESERVATION


def _ok_header(field: str, k: str, v: str) -> bytes:
    """CheckResponse{ok_response{<field>: [HeaderValueOption{header{k, v}, OVERWRITE}]}}."""
    key = (field, k, v)
    frag = _fragments.get(key)
    if frag is None:
        header = _len_field(1, k.encode()) + _len_field(2, v.encode())
        option = _len_field(1, header) + _APPEND_OVERWRITE
        frag = _len_field(3, _len_field(_OK_FIELDS[field], option))
        if k is _UNIQUE:  # a value seen once (the reservation id): memoizing it would
            return frag   # only flush the fragments that repeat
        if len(_fragments) >= _FRAGMENTS_MAX:
            _fragments.clear()
        _fragments[key] = frag
    return frag


def _metadata(md: dict | None) -> bytes:
    if not md:
        return b""
    return _fragment(("md",) + tuple(md.items()),
                     lambda: external_auth_pb2.CheckResponse(dynamic_metadata=metadata_struct(md)))


def tenant_from_metadata(req: external_auth_pb2.CheckRequest,
                         where: tuple[str, tuple[str, ...]]) -> str:
    """The string at namespace/path of the request's metadata_context; "" when absent
    (which the service answers as a missing tenant: never a fallback to a header)."""
    namespace, path = where
    fm = req.attributes.metadata_context.filter_metadata
    if namespace not in fm:
        return ""
    value = None
    fields = fm[namespace].fields
    for key in path:
        if key not in fields:
            return ""
        value = fields[key]
        if value.HasField("struct_value"):
            fields = value.struct_value.fields
    if value is None or not value.HasField("string_value"):
        return ""
    return value.string_value


def request_from_check(req: external_auth_pb2.CheckRequest,
                       tenant_metadata: tuple[str, tuple[str, ...]] | None = None) -> Request:
    http = req.attributes.request.http
    if http.headers:
        headers = dict(http.headers)
    else:  # Envoy configured with encode_raw_headers sends header_map instead
        headers = {h.key.lower(): (h.raw_value.decode("utf-8", "replace") or h.value)
                   for h in http.header_map.headers}
    body = http.raw_body or http.body.encode()
    truncated = headers.get("x-envoy-auth-partial-body") == "true"
    # x-request-id, not http.id: ext_proc and usage reports see the same x-request-id
    tenant = tenant_from_metadata(req, tenant_metadata) if tenant_metadata else None
    return Request(headers=headers, body=body, body_truncated=truncated, tenant=tenant,
                   request_id=headers.get("x-request-id", ""))


def check_response_bytes(ans: contract.Answer) -> bytes:
    """The serialized CheckResponse for an answer."""
    if ans.allowed:
        parts = [_OK_STATUS_BYTES]
        parts += [_ok_header("headers", k, v) for k, v in ans.upstream_headers]
        parts += [_ok_header("response_headers_to_add", k, v) for k, v in ans.response_headers]
        parts.append(_metadata(ans.metadata))
        return b"".join(parts)
    return check_response(ans).SerializeToString()


def check_response(ans: contract.Answer) -> external_auth_pb2.CheckResponse:
    if ans.allowed:
        return external_auth_pb2.CheckResponse.FromString(check_response_bytes(ans))
    return external_auth_pb2.CheckResponse(
        status=_DENIED,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=ans.status),
            headers=header_options(ans.response_headers),
            body=ans.body.decode()),
        dynamic_metadata=metadata_struct(ans.metadata))


def authorization_handler(service: DecisionService) -> grpc.GenericRpcHandler:
    """envoy.service.auth.v3.Authorization with Check answering pre-serialized bytes."""

    async def check(request: external_auth_pb2.CheckRequest, context) -> bytes:
        decision = await service.decide(
            request_from_check(request, service.policy.tenant_metadata), "authz",
            context.time_remaining())  # Envoy's grpc-timeout, less what has passed
        ans = contract.answer(decision)
        if ans.unavailable:
            # UNAVAILABLE, not UNKNOWN: Envoy treats UNKNOWN as OK, and must see a failure
            await context.abort(grpc.StatusCode.UNAVAILABLE, ans.body.decode())
        return check_response_bytes(ans)

    return grpc.method_handlers_generic_handler("envoy.service.auth.v3.Authorization", {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=bytes),
    })
