"""envoy.service.ext_proc.v3.ExternalProcessor/Process: translation only.

Runs after ext_authz on the same request (Envoy filter order), so it sees the
`x-kt-*` headers the decision set. Expected processing mode (kt envoy-config):
request headers SEND, request body BUFFERED, response headers SEND, response
body STREAMED, `allow_mode_override: true`.

- Request: for a downgraded request, rewrite the JSON body's `model` to the
  tier's model (and content-length), so any OpenAI-compatible upstream really
  serves the cheaper model. Other requests skip body processing (mode override).
- Response: pass every chunk on at once (never hold a stream back) while
  reading usage from the JSON body or the SSE usage chunk; at the end, settle
  the reservation with the actual usage (service.settle_usage).
- Rules without usage (sidecar/settlement/reconcile.py, docs/usage.md): a non-2xx reply of the
  provider's without usage releases the reservation; Envoy's own 504 on its route
  timeout (no x-envoy-upstream-service-time, which the router sets on every upstream
  answer), a 2xx reply without usage, or a stream the client abandons is charged at
  the bound (sidecar/settlement/bound.py), with the usage filter's view of a body larger than the
  decision read (its dynamic metadata, forwarded: kt envoy-config's metadata_options).
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from sidecar import attribution, contract
from sidecar.settlement import bound
from sidecar.settlement.book import reservation_key
from sidecar.settlement.reconcile import close_reservation
from sidecar.settlement.service import SettlementService
from sidecar.settlement.usage import UsageScanner
from sidecar.upstream_sli import Upstream

log = logging.getLogger("kt.ext_proc")
_PM = processing_mode_pb2.ProcessingMode
# after the request headers of a request whose body needs no rewrite
_SKIP_REQUEST_BODY = _PM(request_header_mode=_PM.SEND, response_header_mode=_PM.SEND,
                         request_body_mode=_PM.NONE, response_body_mode=_PM.STREAMED,
                         request_trailer_mode=_PM.SKIP, response_trailer_mode=_PM.SKIP)
_CONTINUE = pb.CommonResponse(status=pb.CommonResponse.CONTINUE)
# Envoy's router sets it on every response that came from an upstream, never on an answer
# of its own (sidecar/envoy_config.py leaves Envoy's headers on: no suppress_envoy_headers)
_UPSTREAM_TIME = "x-envoy-upstream-service-time"


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    return {h.key.lower(): (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
            for h in msg.headers.headers}


def _role(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == contract.H_EXT_PROC_ROLE:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""


def rewrite_model(body: bytes, model: str) -> Optional[bytes]:
    """The body with its top-level `model` replaced; None if it is not a JSON object."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply
        return None
    if not isinstance(doc, dict) or doc.get("model") == model:
        return None
    doc["model"] = model
    return msgspec.json.encode(doc)


class _Exchange:
    """What one request/response pair has shown so far."""

    def __init__(self) -> None:
        self.reservation = ""  # x-kt-reservation: the id the sidecar made (ext_authz)
        self.request_id = ""  # x-request-id
        self.tenant: Optional[str] = None
        self.rewrite_to: Optional[str] = None
        self.provider = ""  # x-kt-provider the decision set (docs/providers.md)
        # the end user and tags a trusted filter set (usage without a reservation)
        self.attribution = attribution.NONE
        self.status = 0
        self.scanner: Optional[UsageScanner] = None
        self.done = False
        self.accounting = True
        # the SLIs measured here (sidecar/upstream_sli.py): monotonic ns when the request
        # went on (its last message answered), when the response's headers came
        self.sent_ns = 0
        self.first_ns = 0
        self.endpoint = ""  # the route's name (xds.route_name)
        self.routed_model: Optional[str] = None  # x-kt-model
        self.request_bytes = 0
        self.response_bytes = 0
        # False when the response is Envoy's own answer while the provider was still
        # working (its route timeout's 504)
        self.provider_answered = True
        # what the usage filter read in the whole request body (envoy/usage.lua):
        # forwarded dynamic metadata, for the bound of a reply whose usage is unreadable
        self.body_seen: Optional[str] = None


def _read_metadata(ex: _Exchange, req: pb.ProcessingRequest) -> None:
    """The usage filter's view of the whole request body (dynamic metadata Envoy forwards
    beside each response message: kt envoy-config's metadata_options)."""
    if req.HasField("metadata_context"):
        fm = req.metadata_context.filter_metadata
        if contract.USAGE_METADATA_NAMESPACE in fm:
            field = fm[contract.USAGE_METADATA_NAMESPACE].fields.get(bound.BODY_METADATA_KEY)
            if field is not None:
                ex.body_seen = field.string_value


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, service: SettlementService) -> None:
        self.service = service

    async def Process(self, request_iterator, context):  # noqa: N802 (gRPC method name)
        ex = _Exchange()
        # a stream that only rewrites a body (kt envoy-config's "als" usage mode: usage comes
        # by the access log) does no accounting: it must not close the reservation
        ex.accounting = _role(context) != "rewrite"
        try:
            async for req in request_iterator:
                which = req.WhichOneof("request")
                if which == "request_headers":
                    # a streamed chat body was read whole by the usage filter before
                    # its headers went on: its report comes with them (a client that
                    # leaves before any reply is bounded by it too)
                    _read_metadata(ex, req)
                    ex.endpoint = _route_name(req)
                    yield self._request_headers(ex, req.request_headers)
                elif which == "request_body":
                    yield self._request_body(ex, req.request_body)
                elif which == "response_headers":
                    _read_metadata(ex, req)
                    yield await self._response_headers(ex, req.response_headers)
                elif which == "response_body":
                    _read_metadata(ex, req)
                    yield await self._response_body(ex, req.response_body)
                elif which == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif which == "response_trailers":
                    await self._finish(ex)
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        finally:
            if not ex.done and ex.accounting:
                # Envoy closed the stream before the response ended: the client went
                # away (or the upstream reset): charged at the bound
                key = reservation_key(ex.reservation, ex.request_id)
                if key:
                    self.service.abandon(key, "abandoned", ex.body_seen)

    def _request_headers(self, ex: _Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        h = _headers(msg)
        # ext_authz set x-kt-reservation on an admitted request (the edge strips a
        # client's own); without one, Envoy's failure mode let the request through
        ex.reservation = h.get(contract.H_RESERVATION, "")
        ex.request_id = h.get("x-request-id", "")
        ex.tenant = h.get(contract.H_TENANT)
        if ex.tenant is None and self.service.policy.tenant_metadata is None:
            ex.tenant = h.get(self.service.policy.tenant_header)
        ex.provider = h.get(contract.H_PROVIDER, "")
        ex.attribution = attribution.read(h, self.service.policy.attribution)
        if h.get(contract.H_DECISION) == "downgrade" and h.get(contract.H_MODEL):
            ex.rewrite_to = h[contract.H_MODEL]
        ex.routed_model = h.get(contract.H_MODEL)
        try:
            ex.request_bytes = max(0, int(h.get("content-length", "0")))
        except ValueError:
            ex.request_bytes = 0
        ex.sent_ns = time.monotonic_ns()
        if ex.rewrite_to is None or msg.end_of_stream:
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=_CONTINUE),
                                         mode_override=_SKIP_REQUEST_BODY)
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=_CONTINUE))

    def _request_body(self, ex: _Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        new = rewrite_model(msg.body, ex.rewrite_to) if ex.rewrite_to else None
        ex.request_bytes = len(msg.body) if new is None else len(new)
        ex.sent_ns = time.monotonic_ns()  # the buffered body goes on once answered
        if new is None:
            return pb.ProcessingResponse(request_body=pb.BodyResponse(response=_CONTINUE))
        common = pb.CommonResponse(
            status=pb.CommonResponse.CONTINUE,
            header_mutation=pb.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="content-length", raw_value=str(len(new)).encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)]),
            body_mutation=pb.BodyMutation(body=new))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    async def _response_headers(self, ex: _Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        ex.first_ns = time.monotonic_ns()
        h = _headers(msg)
        try:
            ex.status = int(h.get(":status", "0"))
        except ValueError:
            ex.status = 0
        self.service.upstream_answered(ex.provider, ex.status)
        # a 504 Envoy answered itself: its route timeout, the provider still generating
        # and billing (ext_proc's response attributes, which would name it, are empty on
        # Envoy 1.40). Its other answers (503: no connection) never reached a provider
        ex.provider_answered = not (ex.status == 504 and _UPSTREAM_TIME not in h)
        ex.scanner = UsageScanner(streamed="text/event-stream" in h.get("content-type", ""))
        if msg.end_of_stream:
            await self._finish(ex)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_CONTINUE))

    async def _response_body(self, ex: _Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        if ex.scanner is not None:
            ex.scanner.feed(msg.body)
        ex.response_bytes += len(msg.body)
        if msg.end_of_stream:
            await self._finish(ex)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=_CONTINUE))

    async def _finish(self, ex: _Exchange) -> None:
        if ex.done:
            return
        ex.done = True
        scanner = ex.scanner
        if scanner is not None:
            scanner.finish()
        await close_reservation(self.service, ex.reservation, ex.request_id, ex.tenant,
                                ex.status,
                                scanner.usage if scanner else None,
                                scanner.model if scanner else None, False, "ext_proc",
                                scanner.format if scanner else "ext_proc",
                                provider_failed=ex.provider_answered, body_seen=ex.body_seen,
                                upstream=self._upstream(ex, scanner), att=ex.attribution)

    def _upstream(self, ex: _Exchange, scanner: Optional[UsageScanner]) -> Upstream:
        """The SLIs as this stream saw them (docs/usage.md: what ext_proc measures)."""
        end = time.monotonic_ns()
        sent, first = ex.sent_ns, ex.first_ns
        up = Upstream(ex.status if 100 <= ex.status <= 599 else 0,
                      (end - sent) // 1000 if sent and first else 0,
                      (first - sent) // 1000 if sent and first else 0, ex.endpoint)
        if 200 <= ex.status < 300:
            usage = scanner.usage if scanner is not None else None
            streamed = scanner is not None and scanner.streamed
            slis = self.service.metrics.upstream_slis
            slis.observe(slis.labels(self.service.policy, ex.provider,
                                     scanner.model if scanner else None, ex.routed_model),
                         up.upstream_us, up.ttft_us, (end - first) // 1000 if streamed else 0,
                         usage.completion_tokens if usage is not None and streamed else 0,
                         ex.request_bytes, ex.response_bytes)
        return up


def _route_name(req: pb.ProcessingRequest) -> str:
    """The route's name Envoy sends as the attribute xds.route_name (kt envoy-config asks
    for it: request_attributes), "" without it."""
    attrs = req.attributes.get("envoy.filters.http.ext_proc")
    if attrs is None:
        return ""
    value = attrs.fields.get("xds.route_name")
    return value.string_value[:256] if value is not None else ""
