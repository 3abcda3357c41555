"""The ledger's event for each reservation closed (sidecar/ledger/): settled with its
usage, or closed with its estimate still charged; and for each token-rate flag started or
cleared."""
from __future__ import annotations

import time
from typing import Optional

from sidecar.anomaly import Anomaly
from sidecar.attribution import Attribution
from sidecar.ledger.recorder import Ledger
from sidecar.model import OTHER_TENANTS
from sidecar.policy.load import CompiledPolicy, TenantRule
from sidecar.settlement.book import Reservation


def decided_us(res: Optional[Reservation], settled_us: int = 0) -> int:
    """When the reservation was made, on the clock of ``settled_us`` (the backend's, when
    known; else this host's wall clock): the event's two instants on one clock."""
    if res is None:
        return 0
    now = settled_us or time.time_ns() // 1000
    return now - int((time.monotonic() - res.created_s) * 1e6)


def _tier_name(policy: CompiledPolicy, res: Optional[Reservation]) -> str:
    if res is None or res.tier >= len(policy.tiers):
        return ""
    return policy.tiers[res.tier].name


def settled(ledger: Ledger, policy: CompiledPolicy, request_id: str, tenant: str,
            rule: TenantRule, res: Optional[Reservation], model: str, outcome: str,
            settled_by: str, input_tokens: int, output_tokens: int, cached_tokens: int,
            cache_write_tokens: int, nano: int, cost: int, unpriced: bool,
            budget_spent: int, settled_us: int = 0,
            att: Attribution = Attribution()) -> None:
    """``settled_us``: the backend's clock when it applied the settlement (0: not known),
    which dated the durable spend: the event takes it, so the PostgreSQL roll-up and
    `kt spend` put the request on the same UTC day. ``att``: whom below the tenant."""
    has_budget = rule.limits.budget >= 0
    ledger.closed(
        request_id=request_id, tenant=tenant, outcome=outcome,
        settled_by=settled_by, decided_us=decided_us(res, settled_us),
        settled_us=settled_us,
        model_asked=res.model_asked if res is not None else "",
        model_served=model, tier=_tier_name(policy, res),
        provider=res.provider if res is not None else "",
        decision=res.decision if res is not None else "",
        estimate_tokens=res.charged_tokens if res is not None else 0,
        input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens,
        cache_write_tokens=cache_write_tokens, cost_nano_usd=nano,
        budget_unit=rule.budget_unit if has_budget else "",
        budget_charge=cost if has_budget else 0, unpriced=unpriced, user=att.user,
        tags=att.tags,
        budget_left=(max(0, rule.limits.budget - budget_spent)
                     if has_budget and budget_spent >= 0 else None))
    if has_budget and budget_spent >= 0 and res is not None:
        ledger.budget_seen(tenant, tenant if rule.name else OTHER_TENANTS,
                           rule.budget_unit, rule.limits.budget, budget_spent,
                           res.period_start_us)


def kept(ledger: Ledger, policy: CompiledPolicy, request_id: str, res: Reservation,
         outcome: str, why: str, input_tokens: int, output_tokens: int, nano: int,
         unpriced: bool, att: Attribution = Attribution()) -> None:
    """A reservation whose estimate stays charged: recorded with its tokens and price."""
    rule = policy.rule_for(res.tenant)
    unit = rule.budget_unit if rule is not None and rule.limits.budget >= 0 else ""
    ledger.closed(
        request_id=request_id, tenant=res.tenant, outcome=outcome, settled_by=why,
        decided_us=decided_us(res), model_asked=res.model_asked,
        model_served=res.model, tier=_tier_name(policy, res), provider=res.provider,
        decision=res.decision, estimate_tokens=res.charged_tokens, input_tokens=input_tokens,
        output_tokens=output_tokens, cost_nano_usd=nano, budget_unit=unit,
        budget_charge=res.charged_cost if unit else 0, unpriced=unpriced, user=att.user,
        tags=att.tags)


def token_rate(ledger: Ledger, policy: CompiledPolicy, change: Anomaly) -> None:
    """A tenant's token-rate flag started or cleared, with what the policy did about it."""
    ledger.token_rate(tenant=change.tenant, flagged=change.flagged,
                      tokens_per_minute=change.tokens_per_minute,
                      baseline_per_minute=change.baseline_per_minute,
                      factor=policy.anomaly.factor, action=policy.anomaly.action)
