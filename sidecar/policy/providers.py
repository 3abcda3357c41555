"""The policy's `providers:`, `routing:` and `queue:` sections: meaning checks and the
compiled form the service and the backends use (docs/providers.md).

Every error names the field path and what was expected, through the same ``fail``
callable as the rest of the policy (sidecar/policy/load.py adds the file name).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

from sidecar import _core
from sidecar.policy import schema

PRIORITY_RANK = {"low": _core.PRIO_LOW, "normal": _core.PRIO_NORMAL, "high": _core.PRIO_HIGH}
# a provider id becomes a header value, an Envoy cluster name, a Redis key and a metric label
PROVIDER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}\Z")
QUEUE_MAX_WAIT_MS = 60_000
QUEUE_MAX_SIZE = 1_000_000

# records one error (field path, what was expected) and returns: every check runs, so one
# pass reports every error of the file (sidecar/policy/load.py)
# (a path as "$.a.b" text, or as a tuple of its parts where a part may hold a dot: a
# model or provider name)
Fail = Callable[[Union[str, tuple], str], None]


@dataclass(frozen=True)
class ProviderRule:
    """One provider (one quota), compiled."""

    id: str
    index: int  # in `providers`, so in ProviderPlan.providers
    models: tuple[str, ...]
    quota: _core.Quota
    rate_limits: schema.ProviderRateLimits
    host: Optional[str] = None
    port: Optional[int] = None
    tls: bool = True
    sni: Optional[str] = None
    ca_file: Optional[str] = None
    api_key_file: Optional[str] = None
    api_key_header: str = "authorization"


@dataclass(frozen=True)
class ModelRoute:
    """How a model's providers share its traffic: ``providers`` (indices into
    ProviderPlan.providers) in the order they are tried when nothing else decides;
    ``weights`` (same order) for `weighted`, where the first tried is picked by a smooth
    weighted round robin and providers without a weight come after those with one."""

    model: str
    strategy: str  # "weighted" | "priority"
    providers: tuple[int, ...]
    weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class ProviderPlan:
    providers: tuple[ProviderRule, ...]
    routes: dict[str, ModelRoute]  # by model, for every tier's model
    by_id: dict[str, ProviderRule]


class _Checks:
    """Counts the errors ``fail`` records, so a part can tell whether its own checks passed."""

    def __init__(self, fail: Fail) -> None:
        self._fail = fail
        self.count = 0

    def __call__(self, where: Union[str, tuple], what: str) -> None:
        self.count += 1
        self._fail(where, what)


def floors_of(where: str, reserve: dict[str, float], fail: Fail) -> tuple[float, float, float]:
    """`reserve: {high: 0.2, normal: 0.1}` → the share of a bucket each priority must leave
    (low, normal, high): a share is kept for its priority and those above it, so shares
    stack downwards (low leaves 0.3, normal 0.2, high 0). Errors are recorded; a faulty
    share counts as 0."""
    ok: dict[str, float] = {}
    for name, share in reserve.items():
        if name == "low":
            fail(f"{where}.low", "nothing can be kept for `low`: it is the lowest "
                 "priority (reserve for `normal` or `high`)")
        elif name not in PRIORITY_RANK:
            fail(f"{where}.{name}", "unknown priority; expected one of: high, normal")
        elif not (isinstance(share, (int, float)) and math.isfinite(share) and 0 <= share < 1):
            fail(f"{where}.{name}", f"a share in [0, 1) expected, got {share!r}")
        else:
            ok[name] = float(share)
    high, normal = ok.get("high", 0.0), ok.get("normal", 0.0)
    if high + normal >= 1:
        fail(where, f"the shares add up to {high + normal:g}; they must leave "
             "something below 1 for the lowest priority")
        return (0.0, 0.0, 0.0)
    return (high + normal, high, 0.0)


def compile_queue(queue: Optional[schema.Queue], fail: Fail) -> Optional[schema.Queue]:
    if queue is None:
        return None
    if not (1 <= queue.max_wait_ms <= QUEUE_MAX_WAIT_MS):
        fail("$.queue.max_wait_ms", f"must be between 1 and {QUEUE_MAX_WAIT_MS} "
             "(and under Envoy's ext_authz timeout: `kt envoy-config` sets it)")
    if not (1 <= queue.max_size <= QUEUE_MAX_SIZE):
        fail("$.queue.max_size", f"must be between 1 and {QUEUE_MAX_SIZE}")
    if not (math.isfinite(queue.tenant_share) and 0 < queue.tenant_share <= 1):
        fail("$.queue.tenant_share", f"a share in (0, 1] expected, got {queue.tenant_share!r}")
    return queue


def _limit(where: str, value: Optional[int], fail: Fail) -> int:
    """A provider limit: absent means none (0 inside); 0 itself would read as "nothing"."""
    if value is None:
        return 0
    if not (1 <= value <= _core.MAX_RATE):
        fail(where, f"must be in 1..{_core.MAX_RATE}, got {value} (omit it for no limit)")
        return 0
    return value


def _provider(i: int, p: schema.Provider, fail: _Checks) -> Optional[ProviderRule]:
    where = f"$.providers[{i}]"
    before = fail.count
    if not PROVIDER_ID.match(p.id):
        fail(f"{where}.id", f"{p.id!r}: 1..64 characters of A-Z a-z 0-9 . _ - expected")
    if not p.models or any(not m for m in p.models):
        fail(f"{where}.models", "a list of model names expected")
    elif len(set(p.models)) != len(p.models):
        fail(f"{where}.models", "a model is listed twice")
    rl = p.rate_limits
    rwhere = f"{where}.rate_limits"
    rpm = _limit(f"{rwhere}.requests_per_minute", rl.requests_per_minute, fail)
    tpm = _limit(f"{rwhere}.tokens_per_minute", rl.tokens_per_minute, fail)
    rpd = _limit(f"{rwhere}.requests_per_day", rl.requests_per_day, fail)
    burst_ok = math.isfinite(rl.burst) and 0 < rl.burst <= 1
    if not burst_ok:
        fail(f"{rwhere}.burst", f"must be in (0, 1], got {rl.burst!r}")
    elif 0 < rpm * rl.burst < 1:
        fail(f"{rwhere}.burst", f"requests_per_minute x burst = {rpm * rl.burst:g}: "
             "the bucket would never hold one request")
    floors = floors_of(f"{where}.reserve", p.reserve, fail)
    if burst_ok and rpm and 1 <= rpm * rl.burst and 1 > rpm * rl.burst * (1 - floors[0]):
        fail(f"{where}.reserve", "keeps the whole request bucket from `low`: raise "
             "requests_per_minute x burst or lower the shares")
    if p.port is not None and not (1 <= p.port <= 65535):
        fail(f"{where}.port", "must be between 1 and 65535")
    if p.port is not None and not p.host:
        fail(f"{where}.port", "a port needs a `host`")
    if p.host is not None and not p.host.strip():
        fail(f"{where}.host", "a host name or address expected")
    tls = p.tls if p.tls is not None else (p.port in (None, 443))
    if p.sni is not None and not tls:
        fail(f"{where}.sni", "SNI needs `tls: true`")
    if p.ca_file is not None and not tls:
        fail(f"{where}.ca_file", "a CA file needs `tls: true`")
    if (p.api_key_file is not None or p.ca_file is not None) and not p.host:
        fail(f"{where}.host", "a provider Envoy reaches (ca_file, api_key_file) needs a `host`")
    if not HEADER_NAME.match(p.api_key_header.lower()):
        fail(f"{where}.api_key_header", f"{p.api_key_header!r} is not a header name")
    if fail.count != before:
        return None
    return ProviderRule(
        id=p.id, index=i, models=tuple(p.models), rate_limits=rl,
        quota=_core.Quota(rpm=rpm, tpm=tpm, rpd=rpd, burst=rl.burst, floors=floors),
        host=p.host, port=p.port if p.port is not None else (443 if tls else 80),
        tls=tls, sni=p.sni, ca_file=p.ca_file, api_key_file=p.api_key_file,
        api_key_header=p.api_key_header.lower())


def compile_providers(policy: schema.Policy, record: Fail) -> Optional[ProviderPlan]:
    """The compiled providers and routes, or None (without `providers:`, or with errors,
    each recorded)."""
    fail = _Checks(record)
    if not policy.providers:
        if policy.routing:
            fail("$.routing", "routing needs a `providers:` section")
        return None
    rules: list[ProviderRule] = []
    by_id: dict[str, ProviderRule] = {}
    seen: set[str] = set()
    for i, p in enumerate(policy.providers):
        if p.id in seen:
            fail(f"$.providers[{i}].id", f"duplicate provider id {p.id!r}")
            continue
        seen.add(p.id)
        rule = _provider(i, p, fail)
        if rule is not None:
            rules.append(rule)
            by_id[p.id] = rule
    serving: dict[str, list[int]] = {}
    for p_index, p in enumerate(policy.providers):
        for m in p.models:
            serving.setdefault(m, []).append(p_index)
    tier_models = [t.model for t in policy.tiers]
    for i, model in enumerate(tier_models):
        if model not in serving:
            fail(f"$.tiers[{i}].model", f"no provider serves {model!r} (add it to a "
                 "provider's `models`)")
    known = {p.id: p for p in policy.providers}
    routes: dict[str, ModelRoute] = {}
    for model, r in policy.routing.items():
        where: tuple = ("routing", model)
        before = fail.count
        if model not in tier_models:
            fail(where, f"no tier uses model {model!r}; expected one of: "
                 f"{', '.join(dict.fromkeys(tier_models))}")
            continue
        named = list(r.weights) if r.strategy == "weighted" else list(r.order)
        field = "weights" if r.strategy == "weighted" else "order"
        if r.strategy == "weighted" and r.order:
            fail(where + ("order",), "`order` goes with strategy: priority")
        if r.strategy == "priority" and r.weights:
            fail(where + ("weights",), "`weights` go with strategy: weighted")
        for pid in named:
            at = where + ((field, pid) if field == "weights" else (field, named.index(pid)))
            if pid not in known:
                fail(at, f"no provider has the id {pid!r}")
            elif model not in known[pid].models:
                fail(at, f"provider {pid!r} does not serve {model!r} "
                     f"(its models: {', '.join(known[pid].models)})")
        if len(set(named)) != len(named):
            fail(where + (field,), "a provider is named twice")
        for pid, w in r.weights.items():
            if not (math.isfinite(w) and w > 0):
                fail(where + ("weights", pid), f"a weight > 0 expected, got {w!r}")
        if fail.count != before:
            continue
        first = [policy.providers.index(known[pid]) for pid in named]
        weights: list[float] = []
        if r.strategy == "weighted":
            if not first:  # no weights given: every provider of the model, equally
                first = list(serving[model])
                weights = [1.0] * len(first)
            else:
                pairs = sorted(zip(first, [r.weights[p] for p in named], strict=True),
                               key=lambda x: -x[1])
                first, weights = [p for p, _ in pairs], [w for _, w in pairs]
        rest = [i for i in serving[model] if i not in first]
        routes[model] = ModelRoute(model=model, strategy=r.strategy,
                                   providers=tuple(first + rest), weights=tuple(weights))
    if fail.count:
        return None
    for model in tier_models:
        if model not in routes:  # default: priority, in the order of `providers`
            routes[model] = ModelRoute(model=model, strategy="priority",
                                       providers=tuple(serving[model]))
    return ProviderPlan(providers=tuple(rules), routes=routes, by_id=by_id)
