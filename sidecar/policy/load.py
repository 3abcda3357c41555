"""Policy file → CompiledPolicy: decode (msgspec), check meaning, compile limits.

Every error names the file, the field path and what was expected, e.g.
``policy.yaml: $.tenants.acme.budget: set exactly one of `tokens` or `usd```.
A policy that fails to load never replaces one that is serving (see server.py).
"""
from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, get_args

import msgspec
import yaml

from sidecar import _core
from sidecar.backends.tls import tls_context
from sidecar.ledger import config as ledger_config
from sidecar.policy import schema

PERIODS = {"minute": _core.P_MINUTE, "hour": _core.P_HOUR, "day": _core.P_DAY,
           "month": _core.P_MONTH, "total": _core.P_TOTAL}
# USD per 1K tokens -> nano-USD per token
NANO_PER_USD_PER_1K = 1_000_000
NANO_PER_USD = 1_000_000_000
# bounds of the core (docs/contract.md, "Bounds") in the policy's units
MAX_PRICE_USD_PER_1K = _core.MAX_PRICE / NANO_PER_USD_PER_1K  # 100 USD per 1K tokens
MAX_BUDGET_USD = _core.MAX_BUDGET // NANO_PER_USD  # 9,007,199 USD
MAX_ESTIMATE_TOKENS = 1_000_000_000  # sidecar.estimate.MAX_TOKENS: a default is an estimate


class PolicyError(ValueError):
    """A policy file that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class TenantRule:
    """Everything the service needs to decide for one tenant (or the defaults)."""

    name: str
    priority: str
    limits: _core.Limits
    shadow: bool
    budget_unit: str  # "tokens", "usd" or "" (no budget)


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


def load_policy(path: str | Path) -> CompiledPolicy:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_policy(raw, str(path))


def parse_policy(raw: bytes, source: str) -> CompiledPolicy:
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"{source}: not valid YAML{where}: {problem}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{source}: $: expected a mapping at the top level, got {type(doc).__name__}")
    try:
        policy = msgspec.convert(doc, schema.Policy, strict=True)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"{source}: {_explain(str(exc), doc)}") from None
    return compile_policy(policy, source, hashlib.sha256(raw).hexdigest()[:12])


# what a field of a closed set accepts, for error messages
_ALLOWED: dict[str, tuple[str, ...]] = {
    "period": get_args(schema.Period), "priority": get_args(schema.Priority),
    "unknown": ("defaults", "deny"), "missing": ("deny", "anonymous"),
    "rate_limits": get_args(schema.FailureMode), "budgets": get_args(schema.FailureMode),
    "failure_mode": get_args(schema.FailureMode), "kind": ("memory", "redis"),
}
# maps whose keys are names; msgspec reports them as `[...]`
_NAMED_MAPS = {"tenants": schema.TenantPolicy, "pricing": schema.Price}


def _explain(message: str, doc: dict) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.tenants[...].limits.rpm`";
    make it "$.tenants.acme.limits.rpm: Expected `int`, got `str`", with the
    accepted values of a closed set, so every error reads "file: path: what"."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return f"$: {message}"
    where = where.rstrip("`")
    for field_name, struct in _NAMED_MAPS.items():
        prefix = f"$.{field_name}[...]"
        if where.startswith(prefix) and isinstance(doc.get(field_name), dict):
            for key, value in doc[field_name].items():
                try:
                    msgspec.convert(value, struct, strict=True)
                except msgspec.ValidationError:
                    where = f"$.{field_name}.{key}" + where[len(prefix):]
                    break
    if text.startswith("Invalid enum value") or text.startswith("Invalid value"):
        allowed = _ALLOWED.get(where.rsplit(".", 1)[-1])
        if allowed is not None:
            text += f"; expected one of: {', '.join(allowed)}"
    return f"{where}: {text}"


def compile_policy(policy: schema.Policy, source: str, digest: str = "") -> CompiledPolicy:
    def fail(where: str, what: str) -> PolicyError:
        return PolicyError(f"{source}: {where}: {what}")

    if not policy.tiers:
        raise fail("$.tiers", "at least one tier is required")
    tier_by_model: dict[str, int] = {}
    names: set[str] = set()
    for i, tier in enumerate(policy.tiers):
        if not tier.name or not tier.model:
            raise fail(f"$.tiers[{i}]", "`name` and `model` must be non-empty")
        if tier.name in names:
            raise fail(f"$.tiers[{i}].name", f"duplicate tier name {tier.name!r}")
        names.add(tier.name)
        tier_by_model.setdefault(tier.model, i)
    for model, price in policy.pricing.items():
        for side in ("input", "output", "cached_input", "cache_write"):
            value = getattr(price, side)
            # written so that NaN fails too: every comparison with NaN is false
            if value is not None and not (0.0 <= value <= MAX_PRICE_USD_PER_1K):
                raise fail(f"$.pricing.{model}.{side}", f"must be a number in "
                           f"0..{MAX_PRICE_USD_PER_1K:g} (USD per 1K tokens), got {value}")
    est = policy.estimate
    if not (0.01 <= est.chars_per_token <= 1000.0):
        raise fail("$.estimate.chars_per_token", f"must be a number in 0.01..1000, got "
                   f"{est.chars_per_token}")
    for name in ("default_output_tokens", "default_request_tokens"):
        if not (0 <= getattr(est, name) <= MAX_ESTIMATE_TOKENS):
            raise fail(f"$.estimate.{name}", f"must be in 0..{MAX_ESTIMATE_TOKENS}, got "
                       f"{getattr(est, name)}")
    if not est.header:
        raise fail("$.estimate.header", "must be a header name")
    if not policy.tenant.header:
        raise fail("$.tenant.header", "must be a header name")
    tenant_metadata: Optional[tuple[str, tuple[str, ...]]] = None
    if policy.tenant.metadata is not None:
        ns, sep, path = policy.tenant.metadata.partition(":")
        if not sep or not ns or not path or "" in path.split("."):
            raise fail("$.tenant.metadata", "expected \"namespace:path.to.field\", e.g. "
                       "\"envoy.filters.http.jwt_authn:jwt_payload.tenant\"")
        tenant_metadata = (ns, tuple(path.split(".")))
    backend = policy.backend
    if isinstance(backend, schema.RedisBackend) and not (0 < backend.timeout_ms <= 10_000):
        raise fail("$.backend.timeout_ms", "must be between 1 and 10000")
    if isinstance(backend, schema.RedisBackend) and backend.tls is not None:
        tls = backend.tls
        if not backend.url.startswith("rediss://"):
            raise fail("$.backend.tls", "TLS settings need a rediss:// url")
        if (tls.cert_file is None) != (tls.key_file is None):
            raise fail("$.backend.tls", "cert_file and key_file go together (mutual TLS)")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(tls, name)
            if path is not None and not os.path.isfile(path):
                raise fail(f"$.backend.tls.{name}", f"no such file: {path}")
        try:
            tls_context(backend)
        except (OSError, ssl.SSLError) as exc:
            raise fail("$.backend.tls", f"cannot use these files: {exc}") from None
    if isinstance(backend, schema.MemoryBackend) and not (0.0 < backend.flush_interval_s <= 3600.0):
        raise fail("$.backend.flush_interval_s", f"must be a number of seconds in (0, 3600], got "
                   f"{backend.flush_interval_s}")
    ledger_error = ledger_config.check(policy.ledger)
    if ledger_error is not None:
        raise fail(*ledger_error)

    def prices_for(where: str, unit: str) -> tuple[tuple[int, int], ...]:
        out = []
        for tier in policy.tiers:
            price = policy.pricing.get(tier.model)
            if price is None:
                if unit == "usd":
                    # an unpriced model would be counted as free against a USD budget
                    raise fail(where, f"USD budget, but tier {tier.name!r} uses model "
                                      f"{tier.model!r} which has no entry in `pricing`")
                out.append((0, 0))
            else:
                out.append((round(price.input * NANO_PER_USD_PER_1K),
                            round(price.output * NANO_PER_USD_PER_1K)))
        return tuple(out)

    def build(where: str, name: str, priority: str, lim: schema.Limits,
              budget: Optional[schema.Budget], shadow: bool) -> TenantRule:
        for key in ("rpm", "tpm"):
            value = getattr(lim, key)
            if value is not None and not (1 <= value <= _core.MAX_RATE):
                raise fail(f"{where}.limits.{key}", f"must be in 1..{_core.MAX_RATE}, got {value} "
                           "(omit it for no limit: 0 would read as \"nothing\")")
        rpm = lim.rpm or 0
        tpm = lim.tpm or 0
        burst = lim.burst if lim.burst is not None else 1.0
        if not (1.0 <= burst <= _core.MAX_BURST):
            raise fail(f"{where}.limits.burst", f"must be a number in 1..{_core.MAX_BURST:g}, got {burst}")
        unit, amount, period, low_water = "", -1, _core.P_DAY, 0.0
        if budget is not None:
            bwhere = f"{where}.budget"
            if (budget.tokens is None) == (budget.usd is None):
                raise fail(bwhere, "set exactly one of `tokens` or `usd`")
            if not (0.0 <= budget.low_water < 1.0):
                raise fail(f"{bwhere}.low_water", f"must be in [0, 1), got {budget.low_water}")
            if budget.tokens is not None:
                if not (0 <= budget.tokens <= _core.MAX_BUDGET):
                    raise fail(f"{bwhere}.tokens", f"must be in 0..{_core.MAX_BUDGET}, got "
                               f"{budget.tokens}")
                unit, amount = "tokens", budget.tokens
            else:
                assert budget.usd is not None
                if not (0.0 <= budget.usd <= MAX_BUDGET_USD):
                    raise fail(f"{bwhere}.usd", f"must be a number in 0..{MAX_BUDGET_USD}, got "
                               f"{budget.usd}")
                unit, amount = "usd", min(round(budget.usd * NANO_PER_USD), _core.MAX_BUDGET)
            period = PERIODS[budget.period]
            low_water = budget.low_water
        prices = prices_for(f"{where}.budget", unit)
        try:
            limits = _core.Limits(
                rpm=rpm, tpm=tpm, burst=burst, budget=amount, budget_in_usd=(unit == "usd"),
                period=period, low_water=low_water, prices=prices,
            )
        except (ValueError, OverflowError) as exc:
            # the core's own bounds (docs/contract.md, "Bounds")
            raise fail(where, str(exc)) from None
        return TenantRule(name=name, priority=priority, limits=limits, shadow=shadow,
                          budget_unit=unit)

    d = policy.defaults
    defaults = build("$.defaults", "", d.priority, d.limits, d.budget, policy.shadow_mode)
    tenants: dict[str, TenantRule] = {}
    for name, t in policy.tenants.items():
        where = f"$.tenants.{name}"
        if not name or len(name) > 128:
            raise fail("$.tenants", f"tenant name {name!r} must be 1..128 characters")
        # a tenant's limits override the defaults field by field; its budget replaces them whole
        lim = d.limits
        if t.limits is not None:
            lim = schema.Limits(
                rpm=t.limits.rpm if t.limits.rpm is not None else d.limits.rpm,
                tpm=t.limits.tpm if t.limits.tpm is not None else d.limits.tpm,
                burst=t.limits.burst if t.limits.burst is not None else d.limits.burst,
            )
        tenants[name] = build(where, name, t.priority or d.priority, lim,
                              t.budget if t.budget is not None else d.budget,
                              t.shadow_mode if t.shadow_mode is not None else policy.shadow_mode)
    return CompiledPolicy(
        source=source, digest=digest, tenant_header=policy.tenant.header.lower(),
        tenant_metadata=tenant_metadata,
        unknown_tenant=policy.tenant.unknown, missing_tenant=policy.tenant.missing,
        tiers=tuple(policy.tiers), tier_by_model=tier_by_model, tenants=tenants,
        defaults=defaults, estimate=est, backend=backend, pricing=dict(policy.pricing),
        ledger=policy.ledger,
    )

