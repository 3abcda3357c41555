"""Usage reports for gateways without ext_proc: kt.v1.Usage/Report over gRPC
(proto/usage.proto) and `POST /v1/usage` (JSON) on the admin port. Both translate to
SettlementService.settle_usage and nothing more. A report rewrites a tenant's books, so
it is authenticated: the admin port always (sidecar/server.py); the gRPC method takes
the admin token in `authorization` metadata, or a caller on loopback (docs/security.md).
`request_id` is the reservation id the upstream received (`x-kt-reservation`), or any
id of the reporter's own for a request it holds no reservation id for."""
from __future__ import annotations

from typing import Optional

import grpc
import msgspec

from sidecar import attribution
from sidecar._proto import usage_pb2
from sidecar.auth import TokenFile, bearer_from_metadata, is_loopback_peer
from sidecar.backends.base import BackendError
from sidecar.metrics import Metrics
from sidecar.settlement.service import SettlementService, SettleResult
from sidecar.settlement.usage import UsageError

REPORT_METHOD = "/kt.v1.Usage/Report"


class UsageReportJson(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    input_tokens: int
    output_tokens: int
    tenant: Optional[str] = None
    model: Optional[str] = None
    cached_tokens: int = 0  # of input_tokens: read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens: written to it
    # attribution below the tenant (docs/budgets.md): the reporter holds the admin token,
    # so its word stands for a request no reservation attributed; each value bounded
    # (one that fails is dropped and counted, as a header's)
    user: str = ""
    tags: list[str] = []


_decode_report = msgspec.json.Decoder(UsageReportJson).decode
_encode = msgspec.json.Encoder().encode


def ack_fields(r: SettleResult) -> dict:
    return {"applied": r.applied, "tenant": r.tenant, "model": r.model,
            "reserved_tokens": r.reserved_tokens, "delta_tokens": r.delta_tokens,
            "cost_usd": r.cost_usd, "unpriced": r.unpriced}


async def report_json(service: SettlementService, body: bytes) -> tuple[int, bytes]:
    """POST /v1/usage → (HTTP status, JSON body). 400 malformed, 503 backend down."""
    try:
        rep = _decode_report(body)
    except RecursionError:
        return 400, _encode({"error": {"type": "invalid_request_error", "code": "invalid_report",
                                       "message": "usage report: nested too deeply"}})
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return 400, _encode({"error": {"type": "invalid_request_error", "code": "invalid_report",
                                       "message": f"usage report: {exc}"}})
    att = attribution.NONE
    if rep.user or rep.tags:
        dropped = service.metrics.attribution_dropped
        att = attribution.bounded(rep.user, rep.tags,
                                  lambda field, why: dropped.labels(field, why).inc())
    try:
        res = await service.settle_usage(rep.request_id, rep.tenant, rep.model,
                                         rep.input_tokens, rep.output_tokens, "report",
                                         rep.cached_tokens, rep.cache_write_tokens, att=att)
    except UsageError as exc:
        return 400, _encode({"error": {"type": "invalid_request_error", "code": "invalid_report",
                                       "message": f"usage report: {exc}"}})
    except BackendError as exc:
        return 503, _encode({"error": {"type": "service_unavailable",
                                       "code": "limiter_unavailable",
                                       "message": f"usage not recorded, retry: {exc}"}})
    return 200, _encode(ack_fields(res))


def _report_handler(service: SettlementService, admin_token: Optional[TokenFile],
                    metrics: Metrics):
    refused = metrics.auth_failures.labels("grpc_usage")

    async def report(request: usage_pb2.UsageReport, context) -> usage_pb2.UsageAck:
        allowed = (admin_token is not None and admin_token.matches(
            bearer_from_metadata(context.invocation_metadata()))) or is_loopback_peer(
            context.peer())
        if not allowed:
            refused.inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a usage report needs "
                                "`authorization: Bearer <admin token>` metadata")
        try:
            res = await service.settle_usage(request.request_id, request.tenant or None,
                                             request.model or None, request.input_tokens,
                                             request.output_tokens, "report",
                                             request.cached_tokens, request.cache_write_tokens)
        except UsageError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except BackendError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"usage not recorded, retry: {exc}")
        return usage_pb2.UsageAck(**ack_fields(res))

    return report


def usage_service_handler(service: SettlementService, admin_token: Optional[TokenFile] = None,
                          metrics: Optional[Metrics] = None) -> grpc.GenericRpcHandler:
    """kt.v1.Usage registered from the compiled messages (no generated stub module needed)."""
    return grpc.method_handlers_generic_handler("kt.v1.Usage", {
        "Report": grpc.unary_unary_rpc_method_handler(
            _report_handler(service, admin_token, metrics or service.metrics),
            request_deserializer=usage_pb2.UsageReport.FromString,
            response_serializer=usage_pb2.UsageAck.SerializeToString),
    })
