"""envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs: usage by Envoy's access log.

`kt envoy-config` (usage "als", the default) has Envoy's Lua filter leave the usage of each
response in dynamic metadata (envoy/usage.lua) and Envoy's gRPC access logger send one
entry per admitted request, many per message, on one long-lived stream per Envoy worker.
Each entry is translated here to the rule that ends its reservation (sidecar/settlement/reconcile.py):
the usage text is read by the same parser ext_proc uses (sidecar/settlement/usage.py).

Translation only: the reservation id and tenant (the decision's own `x-kt-reservation` and
`x-kt-tenant`, logged as additional request headers; Envoy strips a client's own at the
edge), the x-request-id when Envoy's failure mode let the request through, status, whether the response was cut short (response flags),
and the usage text, and what the Lua filter read in a request body larger than the
decision saw (`kt.usage` / `request`: n, max_tokens..., for the bound; sidecar/settlement/bound.py).
Envoy sends an entry once the response is over, however it ended, so
every admitted request gets one unless Envoy drops it (docs/usage.md: the stream down).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from sidecar import contract
from sidecar.settlement import bound
from sidecar.settlement.reconcile import close_reservation
from sidecar.settlement.service import SettlementService
from sidecar.settlement.usage import Usage, UsageScanner
from sidecar.upstream_sli import from_access_log

log = logging.getLogger("kt.als")
# access-log messages being settled at once per stream: the next one is read while one
# settles (Envoy's stream never waits on a round trip), but a burst (a backlog after a
# stall) queues here, not as thousands of settlements on the Redis link ahead of decisions
IN_FLIGHT_MAX = 2
# response flags that mean the response did not run to its end
_CUT_SHORT = ("local_reset", "upstream_remote_reset", "upstream_connection_termination",
              "downstream_connection_termination", "downstream_remote_reset",
              "stream_idle_timeout", "downstream_protocol_error", "upstream_protocol_error",
              "upstream_max_stream_duration_reached", "duration_timeout",
              "upstream_request_timeout")
# how long the usage text of one entry may be (the Lua filter keeps at most three SSE
# lines of 16 KiB, or a JSON reply's model and usage values)
MAX_USAGE_TEXT = 64 * 1024


# response flags of an answer Envoy made itself, on its own timeouts, while the provider
# was still working: the status (504, 408) is Envoy's, not a failure of the provider's,
# which goes on generating and billing (a client that left has status 0: already "cut
# short"; a provider's own error with the client gone after it stays the provider's)
_ENVOYS_OWN_ANSWER = ("upstream_request_timeout", "upstream_max_stream_duration_reached",
                      "duration_timeout", "stream_idle_timeout")


def _cut_short(flags) -> bool:
    # most entries carry no flag at all: one size check instead of eleven field reads
    return flags.ByteSize() > 0 and any(getattr(flags, name) for name in _CUT_SHORT)


def _envoys_own_answer(flags) -> bool:
    return flags.ByteSize() > 0 and any(getattr(flags, name) for name in _ENVOYS_OWN_ANSWER)


def _usage_fields(entry):
    """The usage filter's fields in the entry's metadata (a Struct's map), or None."""
    fm = entry.common_properties.metadata.filter_metadata
    if contract.USAGE_METADATA_NAMESPACE not in fm:
        return None
    return fm[contract.USAGE_METADATA_NAMESPACE].fields


def body_seen_of(entry, fields=False) -> Optional[str]:
    """What the usage filter read in the whole request body (sidecar/settlement/bound.py), or
    None. ``fields``: the entry's usage fields when already read (_usage_fields)."""
    if fields is False:
        fields = _usage_fields(entry)
    if fields is None:
        return None
    field = fields.get(bound.BODY_METADATA_KEY)
    return field.string_value if field is not None else None


def usage_of(entry, fields=False) -> tuple[Optional[str], Optional[Usage], str]:
    """(model, Usage or None, how it was read) from the text the Lua filter left in the
    entry's metadata. ``fields``: as body_seen_of."""
    if fields is False:
        fields = _usage_fields(entry)
    if fields is None:
        return None, None, ""
    field = fields.get("sse")
    streamed = field is not None
    if not streamed:
        field = fields.get("json")
        if field is None:
            return None, None, ""
    text = field.string_value
    if len(text) > MAX_USAGE_TEXT:
        return None, None, ""
    # the filter cut out whole lines (or one JSON document): read at once, not as chunks
    scanner = UsageScanner(streamed=streamed)
    scanner.read_whole(text.encode())
    return scanner.model, scanner.usage, "access_log_sse" if streamed else "access_log_json"


class UsageLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, service: SettlementService) -> None:
        self.service = service
        self._entries = service.metrics.usage_log_entries
        self._streams = service.metrics.usage_log_streams

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 (gRPC name)
        self._streams.inc()
        in_flight: set[asyncio.Task] = set()
        try:
            async for msg in request_iterator:
                if not msg.HasField("http_logs"):
                    continue
                entries = msg.http_logs.log_entry
                task = asyncio.get_running_loop().create_task(self._close_all(entries))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if len(in_flight) >= IN_FLIGHT_MAX:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if in_flight:
                await asyncio.wait(in_flight)
        finally:
            self._streams.dec()
        return als_pb2.StreamAccessLogsResponse()

    async def _close_all(self, entries) -> None:
        closing = []
        service = self.service
        slis, policy = service.metrics.upstream_slis, service.policy
        for entry in entries:
            # each sub-message read once: every attribute read of upb builds a wrapper
            request = entry.request
            fields = _usage_fields(entry)
            model, usage, settled_by = usage_of(entry, fields)
            headers = request.request_headers
            status = entry.response.response_code.value
            provider = headers.get(contract.H_PROVIDER, "")
            # a provider's own answers, its 429s among them (docs/providers.md)
            service.upstream_answered(provider, status)
            # its latency, time to first byte, sizes (sidecar/upstream_sli.py)
            upstream = from_access_log(
                slis, policy, entry, provider, headers.get(contract.H_MODEL), status, model,
                usage.completion_tokens if usage is not None else 0,
                settled_by == "access_log_sse")
            flags = entry.common_properties.response_flags
            flagged = flags.ByteSize() > 0
            closing.append(close_reservation(
                service, headers.get(contract.H_RESERVATION, ""), request.request_id,
                headers.get(contract.H_TENANT), status, usage, model,
                flagged and _cut_short(flags), "access_log", settled_by or "access_log",
                provider_failed=not (flagged and _envoys_own_answer(flags)),
                body_seen=body_seen_of(entry, fields) if fields is not None else None,
                upstream=upstream))
        # concurrently: the backend sends what one loop tick queued in one write
        await asyncio.gather(*closing)
        self._entries.inc(len(closing))
