"""Upstream SLIs: how the provider answered each admitted request (docs/usage.md, "Upstream
SLIs"), read from what the transport that closes the reservation saw.

- Envoy's access log (usage "als"): the entry's own timings, relative to the request's
  start, as Envoy measured them on the upstream connection: latency = last byte of the
  reply received - first byte of the request sent to the provider; time to first byte =
  first byte of the reply (its headers) received - first byte sent; body sizes as Envoy
  counted them; the endpoint is the name of the route the request took
  (sidecar/envoy_config.py names each route "METHOD /path"), never the client's path.
- ext_proc (usage "ext_proc"): measured at the sidecar from the stream's own messages
  (sidecar/transports/ext_proc.py): from the answer to the request's last message
  (headers, or the buffered body of a downgrade) to the response's headers (first byte)
  and to its end; it includes Envoy's hops to the sidecar.

Two outputs, both per request:
- histograms per (provider, model), labels bounded to the policy's names as the cost
  metrics are (a provider or model the policy does not name is one series); observed
  for 2xx replies only (a provider's errors are counted by status in
  kt_upstream_responses_total);
- the usage event's status, upstream_us, ttft_us, endpoint: the ``Upstream`` of the
  request rides in a context variable set by sidecar/reconcile.py around the closing of
  its reservation, with the reservation's key; the ledger's recorder reads it for an
  event of that key only (the closing task and the tasks it starts, such as a lost
  settlement's resolution, see it; an expiry does not).

The histograms are plain lists of counts filled without a lock (the sidecar's event loop
is their only writer) and exported at scrape time: an observation costs a bisect and two
additions, not prometheus_client's locked observe (~2 µs each), because every settled
request pays it (bench/micro_usage_log.py).
"""
from __future__ import annotations

import contextvars
from bisect import bisect_left
from typing import Optional

import msgspec
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

OTHER = "_other"  # a provider or model the policy does not name (as OTHER_MODELS)

# LLM replies: 100 ms (a short completion's first byte) to 120 s (a long generation)
LLM_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0,
                       30.0, 45.0, 60.0, 90.0, 120.0)
TOKENS_PER_SECOND_BUCKETS = (1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0,
                             200.0, 300.0, 500.0, 1000.0)
BYTES_BUCKETS = (256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                 16777216.0)
# (name, help, buckets) in the order of Series.counts
FAMILIES = (
    ("kt_upstream_latency_seconds", "Time the provider took to answer an admitted request "
     "(2xx replies), from the first byte sent to it to the last byte of its reply (Envoy's "
     "access-log timings; with usage by ext_proc, measured at the sidecar).",
     LLM_LATENCY_BUCKETS),
    ("kt_upstream_ttft_seconds", "Time to the first byte of the provider's reply (2xx; "
     "its headers, which a streaming provider sends with its first event: the time to "
     "first token of a stream), from the first byte sent to it.", LLM_LATENCY_BUCKETS),
    ("kt_upstream_output_tokens_per_second", "Output tokens per second of a streamed 2xx "
     "reply with usage: output tokens over the time from its first byte to its last.",
     TOKENS_PER_SECOND_BUCKETS),
    ("kt_upstream_request_bytes", "Size of the request body sent on to the provider (2xx "
     "replies), as Envoy counted it.", BYTES_BUCKETS),
    ("kt_upstream_response_bytes", "Size of the reply's body (2xx), as Envoy counted it.",
     BYTES_BUCKETS),
)
LATENCY, TTFT, TOKENS_PER_SECOND, REQUEST_BYTES, RESPONSE_BYTES = range(5)
# observed in integers (µs, bytes; only tokens per second is a float): a bisect on ints
# and an int sum per histogram, scaled once at scrape time
_LATENCY_US = tuple(round(b * 1e6) for b in LLM_LATENCY_BUCKETS)
_BYTES = tuple(int(b) for b in BYTES_BUCKETS)
_SCALE = (1e-6, 1e-6, 1.0, 1.0, 1.0)
SERIES_MAX = 10_000  # (provider, model) pairs kept; beyond it (reload after reload) reset


class Upstream(msgspec.Struct, frozen=True):
    """What the usage event records of the provider's answer (0 / "": not known). A
    msgspec Struct: built in C, once per request."""

    status: int  # HTTP status of the reply (0: none was sent)
    upstream_us: int  # first byte sent to the provider -> last byte of its reply
    ttft_us: int  # first byte sent -> first byte of the reply
    endpoint: str  # the route's name, "POST /v1/chat/completions"


NOT_KNOWN = Upstream(0, 0, 0, "")
# (reservation key, Upstream) of the request whose reservation the current task closes:
# the recorder applies it to that request's events only (a task the closing starts, or an
# expiry it triggers, may record another request's event)
current: contextvars.ContextVar[Optional[tuple[str, Upstream]]] = contextvars.ContextVar(
    "kt_upstream", default=None)


class _Series:
    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts = [[0] * (len(f[2]) + 1) for f in FAMILIES]
        self.sums: list[float] = [0] * len(FAMILIES)


class UpstreamSLIs:
    """The five histograms, per (provider, model) label pair; a scrape-time collector."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Series] = {}

    def labels(self, policy, provider: str, model: Optional[str],
               routed_model: Optional[str]) -> tuple[str, str]:
        """Bounded labels: the provider the decision charged ("none": no providers, or
        none set), the model served when the policy names it, else the model the decision
        routed to when it does (a reply without usage), else _other."""
        plan = policy.providers
        if not provider:
            p = "none"
        elif plan is not None and provider in plan.by_id:
            p = provider
        else:
            p = OTHER
        for m in (model, routed_model):
            if m and (m in policy.pricing or m in policy.tier_by_model):
                return p, m
        return p, OTHER

    def observe(self, labels: tuple[str, str], upstream_us: int, ttft_us: int,
                generating_us: int, output_tokens: int, request_bytes: int,
                response_bytes: int) -> None:
        """One 2xx reply. A time of 0 is not known (not observed); tokens per second only
        when ``output_tokens`` and ``generating_us`` (first byte to last) are both known."""
        s = self._series.get(labels)
        if s is None:
            if len(self._series) >= SERIES_MAX:
                self._series.clear()
            s = self._series[labels] = _Series()
        counts, sums = s.counts, s.sums
        if upstream_us > 0:
            counts[LATENCY][bisect_left(_LATENCY_US, upstream_us)] += 1
            sums[LATENCY] += upstream_us
        if ttft_us > 0:
            counts[TTFT][bisect_left(_LATENCY_US, ttft_us)] += 1
            sums[TTFT] += ttft_us
        if output_tokens > 0 and generating_us > 0:
            v = output_tokens * 1e6 / generating_us
            counts[TOKENS_PER_SECOND][bisect_left(TOKENS_PER_SECOND_BUCKETS, v)] += 1
            sums[TOKENS_PER_SECOND] += v
        counts[REQUEST_BYTES][bisect_left(_BYTES, request_bytes)] += 1
        sums[REQUEST_BYTES] += request_bytes
        counts[RESPONSE_BYTES][bisect_left(_BYTES, response_bytes)] += 1
        sums[RESPONSE_BYTES] += response_bytes

    def collect(self):
        families = [HistogramMetricFamily(name, doc, labels=["provider", "model"])
                    for name, doc, _ in FAMILIES]
        for (provider, model), s in list(self._series.items()):
            for i, (_, _, bounds) in enumerate(FAMILIES):
                counts = s.counts[i]
                if not any(counts):
                    continue  # e.g. no stream yet: no tokens-per-second series
                total, buckets = 0, []
                for bound, n in zip(bounds, counts[:-1], strict=True):
                    total += n
                    buckets.append((floatToGoString(bound), total))
                buckets.append(("+Inf", total + counts[-1]))
                families[i].add_metric([provider, model], buckets, s.sums[i] * _SCALE[i])
        yield from families

    def describe(self):
        return []  # families are known only at scrape time; nothing to check at register


def duration_us(d) -> int:
    """A google.protobuf.Duration in µs (0 when absent); attribute reads, not the Python
    ToMicroseconds (a function call per field on every entry)."""
    return d.seconds * 1_000_000 + d.nanos // 1000


def from_access_log(slis: UpstreamSLIs, policy, tx: int, first: int, last: int,
                    route_name: str, request_bytes: int, response_bytes: int, provider: str,
                    routed_model: Optional[str], status: int, model: Optional[str],
                    output_tokens: int, streamed: bool) -> Upstream:
    """The provider's answer as one access-log entry tells it (HTTPAccessLogEntry: the
    times to the first byte sent upstream, to the first and the last byte received, in µs;
    the route's name, the body sizes), and its observation in the histograms (a 2xx
    reply)."""
    up = Upstream(status if 100 <= status <= 599 else 0,
                  last - tx if last > tx > 0 else 0, first - tx if first > tx > 0 else 0,
                  route_name[:256])
    if 200 <= status < 300:
        slis.observe(slis.labels(policy, provider, model, routed_model), up.upstream_us,
                     up.ttft_us, last - first if streamed and last > first > 0 else 0,
                     output_tokens if streamed else 0, request_bytes, response_bytes)
    return up
