"""Policy file → CompiledPolicy: decode (msgspec), check meaning, compile limits.

Every error names the file, the field path and what was expected, e.g.
``policy.yaml: $.tenants.acme.budget: set exactly one of `tokens` or `usd```.
A policy that fails to load never replaces one that is serving (see server.py).
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin

import msgspec
import yaml

from sidecar import _core, contract
from sidecar import attribution as attribution_
from sidecar.ledger import config as ledger_config
from sidecar.policy import schema
from sidecar.policy.holders import HolderPath, calendar_problem, compile_paths, is_calendar
from sidecar.policy.tls import tls_context
from sidecar.policy.url import check_redis_url
from sidecar.policy.providers import (PRIORITY_RANK, ProviderPlan, compile_providers,
                                      compile_queue)

PERIODS = {"minute": _core.P_MINUTE, "hour": _core.P_HOUR, "day": _core.P_DAY,
           "week": _core.P_WEEK, "month": _core.P_MONTH, "total": _core.P_TOTAL}
# USD per 1K tokens -> nano-USD per token
NANO_PER_USD_PER_1K = 1_000_000
NANO_PER_USD = 1_000_000_000
# bounds of the core (docs/contract.md, "Bounds") in the policy's units
MAX_PRICE_USD_PER_1K = _core.MAX_PRICE / NANO_PER_USD_PER_1K  # 100 USD per 1K tokens
MAX_BUDGET_USD = _core.MAX_BUDGET // NANO_PER_USD  # 9,007,199 USD
# a header name as Envoy's config and the decision's lower-cased header map hold it
_HEADER_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")
# headers an attribution header may not be (see _compile)
_NOT_ATTRIBUTION = ("authorization", "proxy-authorization", "cookie", "host", "x-api-key",
                    "api-key", "content-type", "content-length", "content-encoding",
                    "x-request-id", "x-forwarded-for")
MAX_ESTIMATE_TOKENS = 1_000_000_000  # sidecar.decision.estimate.MAX_TOKENS: a default is an estimate


class PolicyError(ValueError):
    """A policy file that cannot be used; the message says where and why: one line per
    error, all of them (``errors`` lists the lines)."""

    def __init__(self, message: str, errors: Optional[list[str]] = None) -> None:
        super().__init__(message)
        self.errors = errors if errors is not None else [message]

    @classmethod
    def of(cls, source: str, problems: list["_Problem"], raw: Optional[bytes] = None) -> "PolicyError":
        places = _locate(raw, problems) if raw is not None else [None] * len(problems)
        lines = [f"{source}: {pr.where}: {pr.what}" + (f" (line {at[0]}, column {at[1]})" if at else "")
                 for pr, at in zip(problems, places, strict=True)]
        return cls("\n".join(lines), lines)


# a model's dated snapshot: its name, then -YYYY-MM-DD (OpenAI, Anthropic's -YYYYMMDD) or
# -MMDD (OpenAI's older snapshots): the snapshot is the named model's for a model cell
_DATED_SNAPSHOT = re.compile(r"(.+?)-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


class TenantRule(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Everything the service needs to decide for one tenant (or the defaults). gc=False:
    a policy holds one per tenant, and untracked objects cost the cycle collector nothing
    (100,000 tracked rules made every full collection walk them)."""

    name: str
    priority: str
    limits: _core.Limits
    shadow: bool
    budget_unit: str  # "tokens", "usd" or "" (no budget)
    priority_rank: int = _core.PRIO_NORMAL  # _core.PRIO_*: the reservation rule's index
    spill_to_next_tier: bool = True  # providers: may go one tier down when its tier is full
    # budget holders (docs/budgets.md): the path of cells a request is decided on, when it
    # is more than the tenant's own cell (None: decided on ``limits`` alone, the fast path);
    # and the paths of the models with cells of their own on it
    path: Optional[HolderPath] = None
    model_paths: Optional[dict[str, HolderPath]] = None

    def path_for(self, model: str) -> Optional[HolderPath]:
        """The path a request for ``model`` is decided on (None: ``limits`` alone). A
        model cell holds the model's dated snapshots too: `gpt-4o-2024-08-06` (OpenAI's
        name in its usage, and one a client may ask for) is under `models: {gpt-4o: ...}`
        unless the policy names the dated model itself, so a cap is not escaped by a
        snapshot's name (red team, round 2)."""
        paths = self.model_paths
        if paths is None:
            return self.path
        got = paths.get(model)
        if got is None:
            dated = _DATED_SNAPSHOT.match(model)
            got = paths.get(dated.group(1)) if dated is not None else None
        return got if got is not None else self.path


@dataclass(frozen=True)
class CompiledPolicy:
    source: str
    digest: str
    tenant_header: str
    unknown_tenant: str
    missing_tenant: str
    tiers: tuple[schema.Tier, ...]
    tier_by_model: dict[str, int]
    tenants: dict[str, TenantRule]
    defaults: TenantRule
    estimate: schema.Estimate
    backend: schema.Backend
    pricing: dict[str, schema.Price] = field(default_factory=dict)
    # (namespace, path) of the dynamic metadata naming the tenant; None: the header does
    tenant_metadata: Optional[tuple[str, tuple[str, ...]]] = None
    ledger: ledger_config.LedgerConfig = field(default_factory=ledger_config.LedgerConfig)
    admin_token_file: Optional[str] = None  # policy admin.token_file
    # docs/providers.md: None without a `providers:` section (no provider quotas)
    providers: Optional[ProviderPlan] = None
    queue: Optional[schema.Queue] = None
    unpriced_models: str = "refuse"  # schema.Policy.unpriced_models
    anomaly: schema.Anomaly = schema.Anomaly()
    attribution: attribution_.AttributionConfig = attribution_.AttributionConfig()
    # holders frozen through the management API (sidecar/policy/overlay.py): every request
    # of one is refused, whatever its limits say
    frozen: frozenset[str] = frozenset()

    def price_of(self, model: Optional[str]) -> Optional[tuple[int, int]]:
        """nano-USD per (input, output) token of a model; None if the model has no price."""
        price = self.pricing.get(model) if model else None
        if price is None:
            return None
        return (round(price.input * NANO_PER_USD_PER_1K), round(price.output * NANO_PER_USD_PER_1K))

    def dearest_price(self) -> tuple[int, int]:
        """What an unpriced model is charged at: never free (docs/usage.md)."""
        prices = [self.price_of(m) for m in self.pricing] or [(0, 0)]
        return (max(p[0] for p in prices if p), max(p[1] for p in prices if p))

    def rule_for(self, tenant: str) -> Optional[TenantRule]:
        """The tenant's rule; the defaults for an unknown tenant, or None if unknown tenants are denied."""
        rule = self.tenants.get(tenant)
        if rule is not None:
            return rule
        if self.unknown_tenant == "defaults":
            return self.defaults
        return None


def read_policy_file(path: str | Path) -> bytes:
    """The policy file's bytes; a PolicyError naming it when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_policy(path: str | Path) -> CompiledPolicy:
    return parse_policy(read_policy_file(path), str(path))


# --- parsing ---------------------------------------------------------------------------
# libyaml's C parser when PyYAML was built with it (its wheels are); the pure-Python one
# is about 3.5x slower (bench/policy_load.py, docs/policy.md)
try:
    _YamlLoader: type = yaml.CSafeLoader
    YAML_LOADER = "libyaml (CSafeLoader)"
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _YamlLoader = yaml.SafeLoader
    YAML_LOADER = "pure Python (SafeLoader)"
    logging.getLogger("kt.policy").warning(
        "PyYAML has no libyaml here: policies load with the pure-Python parser, about 3.5x "
        "slower (install PyYAML's wheel, or libyaml-dev before building it)")


def read_document(raw: bytes, source: str) -> Any:
    """The policy document: JSON (a YAML subset) through msgspec when the file is JSON, a
    generated policy's natural form and ~50x faster than any YAML parser here; else YAML."""
    if raw.lstrip()[:1] == b"{":
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            pass  # a YAML flow mapping, not JSON: YAML reads it
    try:
        return yaml.load(raw, Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}: not valid YAML{where}: {problem}") from None


# a change to the decoded document before it is checked and compiled (the management
# API's overlay of holders, sidecar/policy/overlay.py), and the digest of that change
Layer = tuple[Callable[[dict], dict], str]


def parse_policy(raw: bytes, source: str, layer: Optional[Layer] = None) -> CompiledPolicy:
    """Parse, validate and compile a policy. Every error in the file is reported, each as
    ``file: $.path: what (line L, column C)`` (the position where the YAML has one), in one
    PolicyError whose ``errors`` lists them. ``layer``: the document is changed by it first
    (a layered policy's errors carry no position: a path may be the layer's, not the
    file's), and the digest is the file's and the layer's."""
    # The cycle collector is paused while the document is built: a large policy is a
    # million small objects, and each full collection would walk all of them again (100,000
    # tenants: 21 s of CPU with it, 6.5 s without; bench/policy_load.py). It also made a
    # reload in a thread stall the event loop, since a collection holds the GIL throughout.
    # Nothing built here is cyclic: plain reference counting frees what is dropped.
    collecting = gc.isenabled()
    gc.disable()
    try:
        doc = read_document(raw, source)
        digest = hashlib.sha256(raw).hexdigest()[:12]
        if layer is not None and isinstance(doc, dict):
            doc = layer[0](doc)
            digest = f"{digest}+{layer[1]}"
        problems: list[_Problem] = []
        policy = _convert(doc, problems)
        compiled = None
        if policy is not None:
            compiled = _compile(policy, source, digest, problems)
        del doc, policy
    finally:
        if collecting:
            gc.enable()
    if problems or compiled is None:
        raise PolicyError.of(source, problems, raw if layer is None else None)
    return compiled


# --- errors: every one, with its place in the file ---------------------------------------
Path_ = tuple  # ("tenants", "acme", "limits", "rpm"), ("tiers", 1, "name"); "[...]" = unknown key


@dataclass(frozen=True)
class _Problem:
    path: Path_
    what: str

    @property
    def where(self) -> str:
        return "$" + "".join(f"[{p}]" if isinstance(p, int) else
                             (p if p == "[...]" else f".{p}") for p in self.path)


_SEGMENT = re.compile(r"\.([^.\[\]]+)|\[(\d+|\.\.\.)\]")


def _path_of(text: str) -> Path_:
    """"$.ledger.rotate_mb" / "$.tiers[1].name" (msgspec's and the checks' form) as a Path_."""
    out: list = []
    for m in _SEGMENT.finditer(text):
        if m.group(1) is not None:
            out.append(m.group(1))
        else:
            out.append("[...]" if m.group(2) == "..." else int(m.group(2)))
    return tuple(out)


def _locate(raw: bytes, problems: list[_Problem]) -> list[Optional[tuple[int, int]]]:
    """(line, column), 1-based, of each problem's node, where the YAML has it: the deepest
    node its path reaches (the key itself for an unknown field). Runs only for a file with
    errors: it composes the YAML node tree, which a good file never needs."""
    try:
        root = yaml.compose(raw, Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError:
        return [None] * len(problems)
    out: list[Optional[tuple[int, int]]] = []
    for pr in problems:
        node = root
        for seg in pr.path:
            nxt = None
            if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == seg:
                        nxt = v
                        break
            elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) \
                    and 0 <= seg < len(node.value):
                nxt = node.value[seg]
            if nxt is None:
                break
            node = nxt
        unknown = re.search(r"unknown field `([^`]+)`", pr.what)
        if unknown and isinstance(node, yaml.MappingNode):
            for k, _v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == unknown.group(1):
                    node = k
                    break
        out.append((node.start_mark.line + 1, node.start_mark.column + 1) if node is not None
                   else None)
    return out


# --- conversion: msgspec for the shape, every error collected ----------------------------
# what a field of a closed set accepts, for error messages
_ALLOWED: dict[str, tuple[str, ...]] = {
    "period": get_args(schema.Period), "priority": get_args(schema.Priority),
    "unknown": ("defaults", "deny"), "missing": ("deny", "anonymous"),
    "rate_limits": get_args(schema.FailureMode), "budgets": get_args(schema.FailureMode),
    "failure_mode": get_args(schema.FailureMode), "kind": ("memory", "redis"),
    "strategy": ("weighted", "priority"), "overflow": ("reject",),
}


def _validation_problem(prefix: Path_, exc: msgspec.ValidationError) -> _Problem:
    """msgspec says "Expected `int`, got `str` - at `$.limits.rpm`" of a part converted on
    its own; make it a problem at prefix + that path, with the accepted values of a
    closed set."""
    text, sep, where = str(exc).rpartition(" - at `")
    if not sep:
        text, where = str(exc), "$"
    path = prefix + _path_of(where.rstrip("`"))
    if text.startswith("Invalid enum value") or text.startswith("Invalid value"):
        allowed = _ALLOWED.get(str(path[-1]) if path else "")
        if allowed is not None:
            text += f"; expected one of: {', '.join(allowed)}"
    return _Problem(path, text)


# top-level fields whose value is a map of names (tenants, models): converted entry by
# entry when the whole fails, so an error names the entry and every entry is checked
_NAMED_MAPS = {"tenants": schema.TenantPolicy, "pricing": schema.Price, "routing": schema.Routing}


def _convert(doc: Any, problems: list[_Problem]) -> Optional[schema.Policy]:
    """The decoded Policy; or, for a document with shape errors, every one of them in
    ``problems`` and the Policy of what remains once each faulty part is left out (a named
    entry of `tenants` or `pricing` whole, else the faulty key), so the meaning checks can
    still run on the rest; None when even that cannot be decoded."""
    if not isinstance(doc, dict):
        problems.append(_Problem((), f"expected a mapping at the top level, got "
                                     f"{type(doc).__name__}"))
        return None
    try:
        return _convert_fast(doc)  # no error: the usual case
    except msgspec.ValidationError:
        pass
    # the slow path, only for a file with errors: each part on its own, so all are found
    n = len(problems)
    drop: list[Path_] = []
    _collect(doc, schema.Policy, (), problems, drop)
    if len(problems) == n:  # pragma: no cover - the whole failed, so some part must
        problems.append(_Problem((), "invalid policy"))
    cleaned = _without(doc, drop)
    try:
        return msgspec.convert(cleaned, schema.Policy, strict=True)
    except msgspec.ValidationError:
        return None


_TENANT_CHUNK = 2000
_TenantMap = dict[str, schema.TenantPolicy]


def _convert_fast(doc: dict) -> schema.Policy:
    """msgspec.convert of the whole document, the tenants a chunk at a time: one convert
    of 100,000 tenants holds the GIL for ~0.15 s of CPU in C, and a reload runs in a
    thread beside the event loop; between chunks the loop gets its turn."""
    tenants = doc.get("tenants")
    if not isinstance(tenants, dict) or len(tenants) <= _TENANT_CHUNK:
        return msgspec.convert(doc, schema.Policy, strict=True)
    policy = msgspec.convert({**doc, "tenants": {}}, schema.Policy, strict=True)
    names = list(tenants)
    out: dict[str, schema.TenantPolicy] = {}
    for i in range(0, len(names), _TENANT_CHUNK):
        chunk = {k: tenants[k] for k in names[i:i + _TENANT_CHUNK]}
        out.update(msgspec.convert(chunk, _TenantMap, strict=True))
    return msgspec.structs.replace(policy, tenants=out)


def _struct_of(tp: Any) -> Optional[type]:
    """The Struct type of ``tp`` (also inside Optional[...]), else None."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    args = [a for a in get_args(tp) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
        return args[0]
    return None


def _collect(value: Any, tp: Any, path: Path_, problems: list[_Problem],
             drop: list[Path_]) -> None:
    """Every shape error of ``value`` against ``tp``, field by field and entry by entry
    (msgspec stops at the first); each faulty part's path goes to ``drop``."""
    struct = _struct_of(tp)
    # a tagged struct (a backend's kind) is converted whole: its tag decides its fields
    config: Any = struct.__struct_config__ if struct is not None else None  # type: ignore[attr-defined]
    tagged = config is not None and config.tag is not None
    if struct is not None and isinstance(value, dict) and not tagged:
        fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
        for key, sub in value.items():
            f = fields.get(key) if isinstance(key, str) else None
            if f is None:
                problems.append(_Problem(path, f"Object contains unknown field `{key}`"))
                drop.append(path + (key,))
            else:
                _collect(sub, f.type, path + (key,), problems, drop)
        for f in fields.values():
            if f.required and f.encode_name not in value:
                problems.append(_Problem(path, f"Object missing required field `{f.encode_name}`"))
        return
    if (get_origin(tp) is dict and isinstance(value, dict) and len(path) == 1
            and path[0] in _NAMED_MAPS):
        # tenants, pricing: each entry alone, dropped whole when faulty
        entry_type = get_args(tp)[1]
        for name, entry in value.items():
            if not isinstance(name, str):
                problems.append(_Problem(path, f"names must be strings, got {name!r}"))
                drop.append(path + (name,))
                continue
            n = len(problems)
            _collect(entry, entry_type, path + (name,), problems, [])
            if len(problems) > n:
                drop.append(path + (name,))
        return
    try:
        msgspec.convert(value, tp, strict=True)
    except msgspec.ValidationError as exc:
        problems.append(_validation_problem(path, exc))
        drop.append(path)


def _without(doc: Any, drop: list[Path_]) -> Any:
    """A copy of ``doc`` without the parts at ``drop`` (only the dicts on the way copied)."""
    if not drop:
        return doc
    out = dict(doc)
    for path in drop:
        node: Any = out
        for seg in path[:-1]:
            nxt = node.get(seg) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                node = None
                break
            nxt = dict(nxt)
            node[seg] = nxt
            node = nxt
        if isinstance(node, dict) and path:
            node.pop(path[-1], None)
    return out


def _compile(policy: schema.Policy, source: str, digest: str,
             problems: list[_Problem]) -> Optional[CompiledPolicy]:
    """The compiled policy, or None with the reasons appended to ``problems``: every check
    runs, so one pass reports every error of the file."""
    def fail(where: Union[str, Path_], what: str) -> None:
        problems.append(_Problem(where if isinstance(where, tuple) else _path_of(where), what))

    if not policy.tiers:
        fail("$.tiers", "at least one tier is required")
    tier_by_model: dict[str, int] = {}
    names: set[str] = set()
    for i, tier in enumerate(policy.tiers):
        if not tier.name or not tier.model:
            fail(f"$.tiers[{i}]", "`name` and `model` must be non-empty")
        if tier.name in names:
            fail(f"$.tiers[{i}].name", f"duplicate tier name {tier.name!r}")
        names.add(tier.name)
        tier_by_model.setdefault(tier.model, i)
    for model, price in policy.pricing.items():
        for side in ("input", "output", "cached_input", "cache_write"):
            value = getattr(price, side)
            # written so that NaN fails too: every comparison with NaN is false
            if value is not None and not (0.0 <= value <= MAX_PRICE_USD_PER_1K):
                fail(f"$.pricing.{model}.{side}", f"must be a number in "
                           f"0..{MAX_PRICE_USD_PER_1K:g} (USD per 1K tokens), got {value}")
        for side in ("max_output_tokens", "max_input_tokens"):
            most = getattr(price, side)
            if most is not None and not (1 <= most <= MAX_ESTIMATE_TOKENS):
                fail(f"$.pricing.{model}.{side}", f"must be in 1..{MAX_ESTIMATE_TOKENS}, "
                     f"got {most}")
    est = policy.estimate
    if not (0.01 <= est.chars_per_token <= 1000.0):
        fail("$.estimate.chars_per_token", f"must be a number in 0.01..1000, got "
                   f"{est.chars_per_token}")
    for name in ("default_output_tokens", "default_request_tokens", "image_tokens"):
        if not (0 <= getattr(est, name) <= MAX_ESTIMATE_TOKENS):
            fail(f"$.estimate.{name}", f"must be in 0..{MAX_ESTIMATE_TOKENS}, got "
                       f"{getattr(est, name)}")
    if not est.header:
        fail("$.estimate.header", "must be a header name")
    if not policy.tenant.header:
        fail("$.tenant.header", "must be a header name")
    att = policy.attribution
    for name in ("user_header", "tags_header"):
        if not _HEADER_NAME.fullmatch(getattr(att, name)):
            fail(f"$.attribution.{name}", "must be a lower-case header name")
    if att.user_header == att.tags_header:
        fail("$.attribution.tags_header", "must differ from user_header")
    # kt envoy-config removes the attribution headers at the edge unless trusted, and a
    # trusted one is kept in the books: naming another header here would strip the tenant,
    # the estimate or a client's credentials, or keep a credential as an end user's id
    taken = {policy.tenant.header.lower(): "tenant.header",
             est.header.lower(): "estimate.header",
             **{h: "a header of the sidecar's own" for h in contract.UPSTREAM_HEADERS},
             **{h: "a header Envoy or the provider needs" for h in _NOT_ATTRIBUTION}}
    for name in ("user_header", "tags_header"):
        clash = taken.get(getattr(att, name))
        if clash is not None:
            fail(f"$.attribution.{name}", f"{getattr(att, name)!r} is {clash}: name a "
                 "header of its own")
    for model in [*policy.pricing, *(t.model for t in policy.tiers)]:
        if model.startswith(attribution_.SPEND_PREFIX):
            # the durable spend keeps users' and tags' cells beside the models' under it
            fail("$.pricing" if model in policy.pricing else "$.tiers",
                 f"a model name may not start with {attribution_.SPEND_PREFIX!r}: {model!r}")
    tenant_metadata: Optional[tuple[str, tuple[str, ...]]] = None
    if policy.tenant.metadata is not None:
        ns, sep, path = policy.tenant.metadata.partition(":")
        if not sep or not ns or not path or "" in path.split("."):
            fail("$.tenant.metadata", "expected \"namespace:path.to.field\", e.g. "
                 "\"envoy.filters.http.jwt_authn:jwt_payload.tenant\"")
        tenant_metadata = (ns, tuple(path.split(".")))
    backend = policy.backend
    if isinstance(backend, schema.RedisBackend) and not (0 < backend.timeout_ms <= 10_000):
        fail("$.backend.timeout_ms", "must be between 1 and 10000")
    if isinstance(backend, schema.RedisBackend):
        try:
            check_redis_url(backend.url)
        except ValueError as exc:
            fail("$.backend.url", str(exc))
    if isinstance(backend, schema.RedisBackend) and backend.tls is not None:
        tls = backend.tls
        tls_ok = True
        if not backend.url.startswith("rediss://"):
            fail("$.backend.tls", "TLS settings need a rediss:// url")
            tls_ok = False
        if (tls.cert_file is None) != (tls.key_file is None):
            fail("$.backend.tls", "cert_file and key_file go together (mutual TLS)")
            tls_ok = False
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, name)
            if path is not None and not os.path.isfile(path):
                fail(f"$.backend.tls.{name}", f"no such file: {path}")
                tls_ok = False
        if tls_ok:
            try:
                tls_context(backend)
            except (OSError, ssl.SSLError) as exc:
                fail("$.backend.tls", f"cannot use these files: {exc}")
    if isinstance(backend, schema.MemoryBackend) and not (1_000 <= backend.max_tenants <= 50_000_000):
        fail("$.backend.max_tenants", f"must be an integer in 1000..50000000, got "
             f"{backend.max_tenants}")
    if isinstance(backend, schema.MemoryBackend) and not (0.0 < backend.flush_interval_s <= 3600.0):
        fail("$.backend.flush_interval_s", f"must be a number of seconds in (0, 3600], got "
             f"{backend.flush_interval_s}")
    ledger_error = ledger_config.check(policy.ledger)
    if ledger_error is not None:
        fail(*ledger_error)

    # --- limits: each value checked where it is written (a tenant's own fields, the
    # defaults' once), then compiled; identical limits share one _core.Limits
    def limits_ok(where: Path_, lim: Optional[schema.Limits]) -> bool:
        if lim is None:
            return True
        ok = True
        for key in ("rpm", "tpm"):
            value = getattr(lim, key)
            if value is not None and not (1 <= value <= _core.MAX_RATE):
                fail(where + ("limits", key), f"must be in 1..{_core.MAX_RATE}, got {value} "
                     "(omit it for no limit: 0 would read as \"nothing\")")
                ok = False
        # written so that NaN fails too: every comparison with NaN is false
        if lim.burst is not None and not (1.0 <= lim.burst <= _core.MAX_BURST):
            fail(where + ("limits", "burst"), f"must be a number in 1..{_core.MAX_BURST:g}, "
                 f"got {lim.burst}")
            ok = False
        return ok

    unpriced = [t for t in policy.tiers if t.model not in policy.pricing]

    def budget_ok(where: Path_, budget: Optional[schema.Budget]) -> bool:
        if budget is None:
            return True
        n = len(problems)
        bwhere = where + ("budget",)
        if (budget.tokens is None) == (budget.usd is None):
            fail(bwhere, "set exactly one of `tokens` or `usd`")
        if not (0.0 <= budget.low_water < 1.0):
            fail(bwhere + ("low_water",), f"must be in [0, 1), got {budget.low_water}")
        calendar = calendar_problem(budget) if is_calendar(budget) else None
        if calendar is not None:
            fail(bwhere + (calendar[0],), calendar[1])
        elif where == ("defaults",) and is_calendar(budget):
            fail(bwhere, "a time zone or start day for the defaults' budget is not supported "
                 "yet: set it on the tenants (docs/budgets.md)")
        if budget.tokens is not None and not (0 <= budget.tokens <= _core.MAX_BUDGET):
            fail(bwhere + ("tokens",), f"must be in 0..{_core.MAX_BUDGET}, got {budget.tokens}")
        if budget.usd is not None:
            if not (0.0 <= budget.usd <= MAX_BUDGET_USD):
                fail(bwhere + ("usd",), f"must be a number in 0..{MAX_BUDGET_USD}, got "
                     f"{budget.usd}")
            if unpriced:
                # an unpriced model would be counted as free against a USD budget
                fail(bwhere, f"USD budget, but tier {unpriced[0].name!r} uses model "
                     f"{unpriced[0].model!r} which has no entry in `pricing`")
        return len(problems) == n

    def nano(usd_per_1k: float) -> int:  # a price already found bad compiles as 0: unused
        ok = 0.0 <= usd_per_1k <= MAX_PRICE_USD_PER_1K
        return round(usd_per_1k * NANO_PER_USD_PER_1K) if ok else 0

    nano_prices = tuple(
        (nano(policy.pricing[t.model].input), nano(policy.pricing[t.model].output))
        if t.model in policy.pricing else (0, 0) for t in policy.tiers)
    token_prices = tuple((0, 0) for _ in policy.tiers) or ((0, 0),)
    interned: dict[tuple, _core.Limits] = {}

    def compiled_limits(where: Path_, lim: schema.Limits,
                        budget: Optional[schema.Budget]) -> Optional[tuple[_core.Limits, str]]:
        unit, amount, period, low_water = "", -1, _core.P_DAY, 0.0
        calendar: Optional[tuple] = None
        if budget is not None:
            if budget.tokens is not None:
                unit, amount = "tokens", budget.tokens
            else:
                assert budget.usd is not None
                unit, amount = "usd", min(round(budget.usd * NANO_PER_USD), _core.MAX_BUDGET)
            period, low_water = PERIODS[budget.period], budget.low_water
            if is_calendar(budget):  # its window comes from a Calendar (holders.py)
                period = _core.P_WINDOW
                calendar = (budget.period, budget.timezone, budget.start_day,
                            budget.start_weekday)
        key = (lim.rpm or 0, lim.tpm or 0, lim.burst if lim.burst is not None else 1.0,
               amount, unit, period, low_water, calendar)
        limits = interned.get(key)
        if limits is None:
            try:
                limits = interned[key] = _core.Limits(
                    rpm=key[0], tpm=key[1], burst=key[2], budget=amount,
                    budget_in_usd=(unit == "usd"), period=period, low_water=low_water,
                    prices=nano_prices if unit == "usd" else token_prices)
            except (ValueError, OverflowError) as exc:
                # the core's own bounds (docs/contract.md, "Bounds"); the checks above
                # hold the same ones, so this is a last line
                fail(where, str(exc))
                return None
        return limits, unit

    d = policy.defaults
    defaults_ok = limits_ok(("defaults",), d.limits) and budget_ok(("defaults",), d.budget)
    defaults: Optional[TenantRule] = None
    if defaults_ok and policy.tiers:
        built = compiled_limits(("defaults",), d.limits, d.budget)
        if built is not None:
            defaults = TenantRule(name="", priority=d.priority, limits=built[0],
                                  shadow=policy.shadow_mode, budget_unit=built[1],
                                  priority_rank=PRIORITY_RANK[d.priority],
                                  spill_to_next_tier=d.spill_to_next_tier)
    # budget holders: parents, several windows, per-model cells (holders.py); the tenants
    # they handle (their own fields checked there) get their rule from their path below
    def own_limits(name: str) -> schema.Limits:
        t = policy.tenants[name]
        if t.limits is None:
            return d.limits
        return schema.Limits(
            rpm=t.limits.rpm if t.limits.rpm is not None else d.limits.rpm,
            tpm=t.limits.tpm if t.limits.tpm is not None else d.limits.tpm,
            burst=t.limits.burst if t.limits.burst is not None else d.limits.burst)

    def own_budget(name: str) -> Optional[schema.Budget]:
        t = policy.tenants[name]
        return t.budget if t.budget is not None else d.budget

    def build(where: Path_, lim: schema.Limits,
              budget: Optional[schema.Budget]) -> Optional[tuple[_core.Limits, str]]:
        if not (limits_ok(where, lim) and budget_ok(where, budget)):
            return None
        return compiled_limits(where, lim, budget)

    paths: dict = {}
    handled: set[str] = set()
    if defaults_ok and policy.tiers:
        paths, handled = compile_paths(policy.tenants, own_limits, own_budget, build, fail,
                                       bool(policy.providers))
    tenants: dict[str, TenantRule] = {}
    for name, t in policy.tenants.items():
        where: Path_ = ("tenants", name)
        if not name or len(name) > 128:
            fail(("tenants",), f"tenant name {name!r} must be 1..128 characters")
            continue
        got = paths.get(name) if name in handled else None
        if name in handled and got is None:
            continue  # its errors were reported with its path's
        if got is not None and (got[0] is not None or got[1]):  # a holder with a path
            if True:
                path, model_paths = got
                first = (path if path is not None else next(iter(model_paths.values()))
                         ).cells[0]
                tenants[name] = TenantRule(
                    name=name, priority=t.priority or d.priority, limits=first.limits,
                    shadow=t.shadow_mode if t.shadow_mode is not None else policy.shadow_mode,
                    budget_unit=first.unit, priority_rank=PRIORITY_RANK[t.priority or d.priority],
                    spill_to_next_tier=(t.spill_to_next_tier if t.spill_to_next_tier is not None
                                        else d.spill_to_next_tier),
                    path=path, model_paths=model_paths)
            continue
        own_ok = limits_ok(where, t.limits) and budget_ok(where, t.budget)
        if not own_ok or not defaults_ok or not policy.tiers:
            continue  # its errors (or the defaults' it inherits) are reported once
        # a tenant's limits override the defaults field by field; its budget replaces them whole
        lim = d.limits
        if t.limits is not None:
            lim = schema.Limits(
                rpm=t.limits.rpm if t.limits.rpm is not None else d.limits.rpm,
                tpm=t.limits.tpm if t.limits.tpm is not None else d.limits.tpm,
                burst=t.limits.burst if t.limits.burst is not None else d.limits.burst,
            )
        built = compiled_limits(where, lim, t.budget if t.budget is not None else d.budget)
        if built is None:
            continue
        tenants[name] = TenantRule(
            name=name, priority=t.priority or d.priority, limits=built[0],
            shadow=t.shadow_mode if t.shadow_mode is not None else policy.shadow_mode,
            budget_unit=built[1], priority_rank=PRIORITY_RANK[t.priority or d.priority],
            spill_to_next_tier=(t.spill_to_next_tier if t.spill_to_next_tier is not None
                                else d.spill_to_next_tier))
    providers = compile_providers(policy, fail)
    queue = compile_queue(policy.queue, fail)
    a = policy.anomaly
    if not (2 <= a.factor <= 1e6) or not (0 <= a.min_tokens_per_minute <= 1e12):
        fail("$.anomaly", "factor must be in 2..1000000 and min_tokens_per_minute >= 0")
    if not (1 <= a.baseline_minutes <= 525_600) or not (0 <= a.warmup_minutes <= 525_600):
        fail("$.anomaly", "baseline_minutes must be in 1..525600, warmup_minutes in 0..525600")
    if problems or defaults is None:
        return None
    return CompiledPolicy(
        source=source, digest=digest, tenant_header=policy.tenant.header.lower(),
        tenant_metadata=tenant_metadata,
        unknown_tenant=policy.tenant.unknown, missing_tenant=policy.tenant.missing,
        tiers=tuple(policy.tiers), tier_by_model=tier_by_model, tenants=tenants,
        defaults=defaults, estimate=est, backend=backend, pricing=dict(policy.pricing),
        unpriced_models=policy.unpriced_models, anomaly=policy.anomaly,
        ledger=policy.ledger, providers=providers, queue=queue,
        admin_token_file=policy.admin.token_file, attribution=policy.attribution,
    )
