"""Traces, optional: one span per request whose reservation closes (settled with its usage,
released, kept at its bound, expired), in OpenTelemetry's GenAI semantic conventions,
exported by OTLP over HTTP in batches (`kt serve --otlp-endpoint URL`; the `otlp` extra:
`pip install 'kt-sidecar[otlp]'`, OpenTelemetry's SDK).

The export is OTLP/HTTP with the JSON encoding (`OtlpJsonExporter`, msgspec), not the
SDK's protobuf exporter: that exporter needs the `opentelemetry-proto` package, whose
modules `xds-protos` (Envoy's API, a dependency of this sidecar) ships too, older and
without `InstrumentationScope`; whichever pip installs last wins, so the protobuf
exporter failed to import in a fresh environment. Every OTLP collector takes JSON
(the OpenTelemetry Collector, Jaeger, Tempo), and msgspec encodes it faster than the
Python protobuf encoder.

The span is another sink of the ledger's usage event (``Ledger.spans``): made from the
same values, when the event is, it starts at the decision and ends at the settlement.
Making it is a few attribute writes on the event loop; the SDK's BatchSpanProcessor
queues it (bounded: past its queue it drops spans, never waits) and its own thread
encodes and sends batches, so the event loop never waits for the collector. Nothing of
this runs on the decision itself: with tracing off, nothing at all runs
(bench/micro_tracing.py measures both)."""
from __future__ import annotations

import logging
import random
import urllib.error
import urllib.request
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import msgspec

from sidecar.burstlog import BurstLog
from sidecar.ledger.events import UsageEvent

try:  # the optional extra; without it --otlp-endpoint says how to get it
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SpanExporter,
                                                SpanExportResult)
    from opentelemetry.trace import SpanKind, Status, StatusCode
    AVAILABLE = True
except ImportError:  # pragma: no cover - the CI installs the extra
    AVAILABLE = False

log = logging.getLogger("kt.tracing")

# the route the request took -> gen_ai.operation.name
OPERATIONS = {
    "POST /v1/chat/completions": "chat",
    "POST /v1/responses": "chat",
    "POST /v1/messages": "chat",
    "POST /v1/completions": "text_completion",
    "POST /v1/embeddings": "embeddings",
}


# an attribute's text past this is cut (the SDK's own limit): a model's name is the
# client's word, as long as its body allows (~64 KiB), and a span is kept in the batch
# queue until the collector takes it; 8,192 queued spans of such names held ~0.5 GB
MAX_ATTRIBUTE_CHARS = 256


class TracingError(ValueError):
    """--otlp-endpoint cannot be used (not a URL, or the extra is not installed): one line."""


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a collector's base URL (http://collector:4318) gets the
    signal's path /v1/traces, as OTEL_EXPORTER_OTLP_ENDPOINT does; a URL with a path is
    used as it is."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TracingError(f"--otlp-endpoint {endpoint!r}: expected http(s)://HOST:PORT "
                           "(an OTLP/HTTP collector, e.g. http://127.0.0.1:4318)")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def check_sample_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:  # NaN fails too
        raise TracingError(f"--otlp-sample-ratio {ratio}: expected a share in (0, 1], e.g. "
                           "0.05 for one request in twenty")


class RequestSpans:
    """The span of each closed request, handed to the SDK's batch processor."""

    def __init__(self, endpoint: str, instance: str = "", sample_ratio: float = 1.0,
                 exporter: Optional["SpanExporter"] = None,
                 max_queue_size: int = 8192, schedule_delay_ms: int = 1000) -> None:
        if not AVAILABLE:
            raise TracingError("--otlp-endpoint needs OpenTelemetry's SDK and OTLP exporter: "
                               "pip install 'kt-sidecar[otlp]'")
        url = traces_url(endpoint)
        check_sample_ratio(sample_ratio)
        # a request not sampled costs one random draw: no span object, nothing to export
        self.sample_ratio = sample_ratio
        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": "kt-sidecar", "service.instance.id": instance}),
            span_limits=SpanLimits(max_span_attribute_length=MAX_ATTRIBUTE_CHARS))
        self.processor = BatchSpanProcessor(
            exporter or OtlpJsonExporter(url, timeout_s=5.0),
            max_queue_size=max_queue_size, schedule_delay_millis=schedule_delay_ms)
        self.provider.add_span_processor(self.processor)
        self._tracer = self.provider.get_tracer("kt-sidecar")
        self._failed = BurstLog(log)

    def request(self, e: UsageEvent, budget_left: Optional[int]) -> None:
        """One span for the closed request ``e``; ``budget_left``: the tenant's budget
        after it (in ``e.budget_unit``), None when not known or no budget."""
        if self.sample_ratio < 1.0 and random.random() >= self.sample_ratio:
            return
        try:
            operation = OPERATIONS.get(e.endpoint, "chat")
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": e.model_asked or e.model_served,
                "gen_ai.response.model": e.model_served,
                "gen_ai.provider.name": e.provider or "unknown",
                "gen_ai.usage.input_tokens": e.input_tokens,
                "gen_ai.usage.output_tokens": e.output_tokens,
                "kt.tenant": e.tenant,
                "kt.request_id": e.request_id,
                "kt.decision": e.decision or "unknown",
                "kt.outcome": e.outcome,
                "kt.settled_by": e.settled_by,
                "kt.usage.cached_tokens": e.cached_tokens,
                "kt.cost.usd": e.cost_nano_usd / 1e9,
            }
            if e.status:
                attributes["http.response.status_code"] = e.status
            if e.endpoint:
                attributes["http.route"] = e.endpoint
            if e.tier:  # "": no reservation (a usage report for a request not decided here)
                attributes["kt.tier"] = e.tier
            if budget_left is not None and e.budget_unit:
                attributes["kt.budget.remaining"] = (budget_left / 1e9 if e.budget_unit == "usd"
                                                     else budget_left)
                attributes["kt.budget.unit"] = e.budget_unit
            end_ns = e.settled_us * 1000
            span = self._tracer.start_span(
                f"{operation} {attributes['gen_ai.request.model'][:MAX_ATTRIBUTE_CHARS]}",
                kind=SpanKind.CLIENT,
                start_time=e.decided_us * 1000 if 0 < e.decided_us <= e.settled_us else end_ns,
                attributes=attributes)
            if e.status >= 400 or e.outcome == "released":
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=end_ns)
        except Exception as exc:  # noqa: BLE001 - a trace never fails a settlement
            self._failed.warning("a request's span was not made: %s", exc)

    def flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def close(self) -> None:
        """Send what is queued (bounded by the exporter's timeout), then stop the thread."""
        self.provider.shutdown()


def _value(v: Any) -> dict[str, Any]:
    """An attribute's value as OTLP JSON's AnyValue (int64 as a decimal string)."""
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": str(v)}


def _attributes(attrs: Any) -> list[dict[str, Any]]:
    return [{"key": k, "value": _value(v)} for k, v in (attrs or {}).items()]


_KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}


def export_request(spans: "Sequence[ReadableSpan]") -> bytes:
    """OTLP/JSON ExportTraceServiceRequest of ``spans``: one resourceSpans per resource."""
    by_resource: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
    for span in spans:
        ctx = span.context
        out: dict[str, Any] = {
            "traceId": f"{ctx.trace_id:032x}", "spanId": f"{ctx.span_id:016x}",
            "name": span.name, "kind": _KINDS.get(span.kind.name, 0),
            "startTimeUnixNano": str(span.start_time or 0),
            "endTimeUnixNano": str(span.end_time or span.start_time or 0),
            "attributes": _attributes(span.attributes)}
        if span.parent is not None:
            out["parentSpanId"] = f"{span.parent.span_id:016x}"
        if span.status.status_code.name != "UNSET":
            out["status"] = {"code": _STATUS[span.status.status_code.name]}
        key = id(span.resource)
        if key not in by_resource:
            by_resource[key] = (span.resource, [])
        by_resource[key][1].append(out)
    return msgspec.json.encode({"resourceSpans": [
        {"resource": {"attributes": _attributes(resource.attributes)},
         "scopeSpans": [{"scope": {"name": "kt-sidecar"}, "spans": made}]}
        for resource, made in by_resource.values()]})


if AVAILABLE:
    class OtlpJsonExporter(SpanExporter):
        """OTLP/HTTP, JSON encoding: one POST per batch, from the batch processor's thread
        (never the event loop); a collector that fails or does not answer in time loses
        that batch (logged once per burst), never the sidecar's work."""

        def __init__(self, url: str, timeout_s: float = 5.0) -> None:
            self.url = url
            self.timeout_s = timeout_s
            self._failed = BurstLog(log)

        def export(self, spans: "Sequence[ReadableSpan]") -> "SpanExportResult":
            req = urllib.request.Request(self.url, data=export_request(spans), method="POST",
                                         headers={"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as answer:  # noqa: S310 - the operator's collector URL, http(s) only
                    answer.read()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                self._failed.warning("%d spans not exported to %s: %s", len(spans), self.url,
                                     exc)
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True
