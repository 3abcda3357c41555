"""Whose request it is: the tenant named by the request (a header, the authenticated
metadata Envoy passes, or an RLS descriptor), checked, and the policy's rule for it."""
from __future__ import annotations

from typing import Union

from sidecar.backends.base import Backend
from sidecar.burstlog import BurstLog
from sidecar.metrics import Metrics
from sidecar.model import MAX_TENANT_LEN, Decision, Kind, Request, valid_tenant
from sidecar.policy.load import CompiledPolicy, TenantRule


def resolve(policy: CompiledPolicy, req: Request, backend: Backend, metrics: Metrics,
            rejected_log: BurstLog) -> Union[Decision, tuple[str, TenantRule]]:
    """(tenant, its rule), or the refusal when the request names none, a malformed one, or
    one the policy does not admit."""
    tenant = req.tenant if req.tenant is not None else req.headers.get(policy.tenant_header)
    if tenant is not None:
        tenant = tenant.strip()
    if not tenant:
        if policy.missing_tenant == "deny":
            if policy.tenant_metadata is not None:
                ns, path = policy.tenant_metadata
                return Decision(Kind.MISSING_TENANT, message=(
                    f"No tenant: the request has no {ns}:{'.'.join(path)} metadata "
                    "(was it authenticated?)."))
            return Decision(Kind.MISSING_TENANT, message=(
                f"No tenant: the request carries no {policy.tenant_header!r} header."))
        tenant = "anonymous"
    if not valid_tenant(tenant):
        return Decision(Kind.BAD_REQUEST, message=(
            f"Malformed tenant in {policy.tenant_header!r}: 1..{MAX_TENANT_LEN} printable "
            "characters without braces expected."))
    rule = policy.rule_for(tenant)
    if rule is None:
        return Decision(Kind.UNKNOWN_TENANT, tenant=tenant,
                        message=f"Unknown tenant {tenant!r}.")
    if not rule.name and not backend.has_room_for(tenant):
        # `unknown: defaults` lets clients invent tenant names; the embedded backend
        # holds a bounded number: past it, a new one is refused, never a new state
        metrics.tenant_capacity_refusals.inc()
        rejected_log.warning("refused tenant %s: the backend holds its maximum of "
                             "tenants", tenant)
        return Decision(Kind.UNKNOWN_TENANT, tenant=tenant, message=(
            "Tenant capacity reached: this gateway holds its maximum number of tenants "
            "that its policy does not name. Try again later, or ask its operator."))
    return tenant, rule


