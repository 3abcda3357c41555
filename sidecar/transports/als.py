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

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from sidecar import _als_wire, attribution, contract
from sidecar.burstlog import BurstLog
from sidecar.settlement import bound
from sidecar.settlement.reconcile import close_reservation
from sidecar.settlement.service import SettlementService
from sidecar.settlement.usage import Usage, UsageScanner
from sidecar.upstream_sli import duration_us, from_access_log

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
# one entry as the receiver reads it (read_entries): the request headers logged, the
# request id, the status, the response flags' bytes, the usage filter's strings (None: it
# left nothing), the times to the first byte sent upstream and to the first and last byte
# received (µs), the route's name, the request's and the response's body bytes
EntryFields = tuple[dict[str, str], str, int, bytes, Optional[dict[str, str]], int, int, int,
                    str, int, int]


# response flags of an answer Envoy made itself, on its own timeouts, while the provider
# was still working: the status (504, 408) is Envoy's, not a failure of the provider's,
# which goes on generating and billing (a client that left has status 0: already "cut
# short"; a provider's own error with the client gone after it stays the provider's)
_ENVOYS_OWN_ANSWER = ("upstream_request_timeout", "upstream_max_stream_duration_reached",
                      "duration_timeout", "stream_idle_timeout")


def _flag_set(flags: bytes) -> tuple[bool, bool]:
    """(the response was cut short, Envoy answered itself) from the response flags' bytes
    (b"": none set, as on most entries: then nothing is parsed)."""
    if not flags:
        return False, False
    f = accesslog_pb2.ResponseFlags.FromString(flags)
    return (any(getattr(f, name) for name in _CUT_SHORT),
            any(getattr(f, name) for name in _ENVOYS_OWN_ANSWER))


def entry_fields(entry) -> EntryFields:
    """What the receiver reads of one entry (HTTPAccessLogEntry), through upb: the same
    tuple as sidecar/_als_wire.pyx's reader (native/als_wire.pyx) gives."""
    request, cp, response = entry.request, entry.common_properties, entry.response
    fm = cp.metadata.filter_metadata
    ns = contract.USAGE_METADATA_NAMESPACE
    usage = {k: v.string_value for k, v in fm[ns].fields.items()} if ns in fm else None
    return (dict(request.request_headers), request.request_id, response.response_code.value,
            cp.response_flags.SerializeToString(), usage,
            duration_us(cp.time_to_first_upstream_tx_byte),
            duration_us(cp.time_to_first_upstream_rx_byte),
            duration_us(cp.time_to_last_upstream_rx_byte), cp.route_name,
            request.request_body_bytes, response.response_body_bytes)


def read_entries(data: bytes) -> list[EntryFields]:
    """The entries of one StreamAccessLogsMessage as it came on the wire: read by our own
    reader (11.2 -> 2.7 µs per entry against upb's decode and field reads, docs/bench.md),
    or by upb when that reader meets anything beyond what Envoy writes (then upb's
    reading, or its DecodeError, stands)."""
    try:
        return _als_wire.read_message(data, contract.USAGE_METADATA_NAMESPACE)
    except Exception:  # noqa: BLE001 - whatever stops our reader, upb reads it (or refuses)
        pass
    msg = als_pb2.StreamAccessLogsMessage.FromString(data)
    return [entry_fields(e) for e in msg.http_logs.log_entry]


def body_seen_of(fields: Optional[dict[str, str]]) -> Optional[str]:
    """What the usage filter read in the whole request body (sidecar/settlement/bound.py), or
    None, from the entry's usage fields (its metadata namespace's strings)."""
    return fields.get(bound.BODY_METADATA_KEY) if fields is not None else None


def usage_of(fields: Optional[dict[str, str]]) -> tuple[Optional[str], Optional[Usage], str]:
    """(model, Usage or None, how it was read) from the text the Lua filter left in the
    entry's metadata (its usage fields, as body_seen_of)."""
    if fields is None:
        return None, None, ""
    text = fields.get("sse")
    streamed = text is not None
    if text is None:
        text = fields.get("json")
        if text is None:
            return None, None, ""
    if len(text) > MAX_USAGE_TEXT:
        return None, None, ""
    # the filter cut out whole lines (or one JSON document): read at once, not as chunks
    scanner = UsageScanner(streamed=streamed)
    scanner.read_whole(text.encode())
    return scanner.model, scanner.usage, "access_log_sse" if streamed else "access_log_json"


def handler(receiver: "UsageLogReceiver") -> grpc.GenericRpcHandler:
    """The access-log service with its messages handed over as bytes (read_entries), not
    decoded by upb first."""
    return grpc.method_handlers_generic_handler(
        "envoy.service.accesslog.v3.AccessLogService",
        {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
            receiver.StreamAccessLogs, request_deserializer=None,
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString)})


class UsageLogReceiver:
    def __init__(self, service: SettlementService) -> None:
        self.service = service
        self._entries = service.metrics.usage_log_entries
        self._streams = service.metrics.usage_log_streams
        self._unreadable = BurstLog(log)

    async def StreamAccessLogs(self, request_iterator, context):  # noqa: N802 (gRPC name)
        """``request_iterator``: each StreamAccessLogsMessage's bytes (handler())."""
        self._streams.inc()
        in_flight: set[asyncio.Task] = set()
        try:
            async for data in request_iterator:
                try:
                    entries = read_entries(data)
                except DecodeError as exc:  # not Envoy's: nothing in it is settled
                    self._unreadable.warning("access-log message not readable (%d bytes): %s",
                                             len(data), exc)
                    continue
                if not entries:
                    continue
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

    async def _close_all(self, entries: list[EntryFields]) -> None:
        closing = []
        service = self.service
        slis, policy = service.metrics.upstream_slis, service.policy
        for (headers, request_id, status, flags, fields, tx, first, last, route, request_bytes,
             response_bytes) in entries:
            model, usage, settled_by = usage_of(fields)
            provider = headers.get(contract.H_PROVIDER, "")
            # a provider's own answers, its 429s among them (docs/providers.md)
            service.upstream_answered(provider, status)
            # its latency, time to first byte, sizes (sidecar/upstream_sli.py)
            upstream = from_access_log(
                slis, policy, tx, first, last, route, request_bytes, response_bytes, provider,
                headers.get(contract.H_MODEL), status, model,
                usage.completion_tokens if usage is not None else 0,
                settled_by == "access_log_sse")
            cut_short, envoys_own = _flag_set(flags)
            closing.append(close_reservation(
                service, headers.get(contract.H_RESERVATION, ""), request_id,
                headers.get(contract.H_TENANT), status, usage, model, cut_short, "access_log",
                settled_by or "access_log", provider_failed=not envoys_own,
                body_seen=body_seen_of(fields), upstream=upstream,
                # logged only as the edge left them (stripped unless a trusted filter's);
                # bad values were counted by the decision already
                att=attribution.read(headers, policy.attribution)))
        # concurrently: the backend sends what one loop tick queued in one write
        await asyncio.gather(*closing)
        self._entries.inc(len(closing))
