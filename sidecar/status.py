"""`kt status`: one screen of what a sidecar is doing, served by the admin port
(`GET /v1/status`) and rendered for a terminal by the CLI.

The document is built from what the sidecar already keeps: the backend's and the
ledger's readiness, the policy being served, its own metrics registry (provider quota in
use, queue depth, each named tenant's budget as of its last decision) and the backend's
durable spend for today (the same cells as `/v1/spend`, so every replica's requests).
Failure-mode decisions are counted over the last minute by ``metrics.RecentCount``, which
the decision's failure answers feed; nothing here runs per request."""
from __future__ import annotations

from typing import Optional

from sidecar.ledger.spend import KINDS, SpendCell, attributed, date_of

TOP_TENANTS = 10
_COST = KINDS.index("c")
_REQUESTS = KINDS.index("n")


_READ = ("kt_provider_utilisation", "kt_request_queue_depth", "kt_budget_remaining",
         "kt_budget_limit")


def _samples(registry) -> dict[str, list[tuple[dict, float]]]:
    """The samples of the few series the status reads, from one pass over the registry
    (a collect renders every collector, the backend's and the SLIs' included)."""
    out: dict[str, list[tuple[dict, float]]] = {name: [] for name in _READ}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in out:
                out[sample.name].append((sample.labels, sample.value))
    return out


def document(*, ready: bool, detail: str, ledger: str, backend: str, policy_source: str,
             policy_digest: str, registry, today: int, cells: Optional[list[SpendCell]],
             failure_mode_last_minute: int, spend_error: str = "") -> dict:
    """The status as JSON-ready data (docs/ledger.md, "kt status")."""
    samples = _samples(registry)
    providers: dict[str, dict[str, float]] = {}
    for labels, value in samples["kt_provider_utilisation"]:
        providers.setdefault(labels["provider"], {})[labels["limit"]] = round(value, 4)
    queue = sum(v for _, v in samples["kt_request_queue_depth"])
    budgets: dict[str, dict] = {}
    for labels, value in samples["kt_budget_remaining"]:
        budgets.setdefault(labels["tenant"], {"unit": labels["unit"]})["remaining"] = value
    for labels, value in samples["kt_budget_limit"]:
        budgets.setdefault(labels["tenant"], {"unit": labels["unit"]})["limit"] = value
    spend: dict[str, list[int]] = {}
    for cell in cells or ():
        if cell.day == today and not attributed(cell):  # a user's: the request again
            t = spend.setdefault(cell.tenant, [0, 0])
            t[0] += cell.counts[_COST]
            t[1] += cell.counts[_REQUESTS]
    top = sorted(spend.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_TENANTS]
    return {
        "ready": ready, "detail": detail, "ledger": ledger, "backend": backend,
        "policy": {"source": policy_source, "digest": policy_digest},
        "providers": {p: providers[p] for p in sorted(providers)},
        "queue_depth": int(queue),
        "failure_mode_decisions_last_minute": failure_mode_last_minute,
        "day": date_of(today).isoformat(),
        "top_tenants_today": [
            {"tenant": t, "usd": cost / 1e9, "requests": n, "budget": budgets.get(t)}
            for t, (cost, n) in top],
        **({"spend_error": spend_error} if spend_error else {}),
    }


def render(doc: dict) -> str:
    """The document for a terminal (80 columns)."""
    lines = [f"{'READY' if doc['ready'] else 'NOT READY'}  backend {doc['backend']}: "
             f"{doc['detail']}",
             f"ledger: {doc['ledger']}",
             f"policy: {doc['policy']['source']} ({doc['policy']['digest']})",
             f"failure-mode decisions, last minute: {doc['failure_mode_decisions_last_minute']}"
             f"    queue depth: {doc['queue_depth']}"]
    if doc["providers"]:
        lines.append("provider quota in use:")
        for p, limits in doc["providers"].items():
            used = "  ".join(f"{k} {v:.0%}" for k, v in sorted(limits.items()))
            lines.append(f"  {p:<24} {used}")
    lines.append(f"top tenants by spend on {doc['day']} (UTC):")
    if doc.get("spend_error"):
        lines.append(f"  spend not readable: {doc['spend_error']}")
    elif not doc["top_tenants_today"]:
        lines.append("  none yet")
    for t in doc["top_tenants_today"]:
        b = t["budget"]
        left = ""
        if b and "remaining" in b:
            unit = "$" if b["unit"] == "usd" else ""
            of = f" of {unit}{b['limit']:,.2f}" if "limit" in b else ""
            left = f"  budget left {unit}{b['remaining']:,.2f}{of}" + (
                " tokens" if b["unit"] == "tokens" else "")
        lines.append(f"  {t['tenant'][:32]:<32} ${t['usd']:>12,.4f}  {t['requests']:>8} req{left}")
    return "\n".join(lines) + "\n"
