"""`kt status`: the document the admin port serves, and the terminal screen."""
from __future__ import annotations

from sidecar.ledger.spend import SpendCell
from sidecar.metrics import Metrics, RecentCount
from sidecar.status import document, render


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_count_forgets_what_is_older_than_its_window():
    clock = Clock()
    recent = RecentCount(60, clock)
    recent.add(5)
    clock.now += 30
    recent.add(2)
    assert recent.total() == 7
    clock.now += 31  # the first five are 61 s old
    assert recent.total() == 2
    clock.now += 3600  # a slot reused an hour later starts again from zero
    recent.add()
    assert recent.total() == 1


def test_the_document_ranks_today_s_spenders_with_their_budgets():
    m = Metrics()
    m.budget_remaining.labels("acme", "usd").set(12.5)
    m.budget_limit.labels("acme", "usd").set(50)
    m.provider_utilisation.labels("openai", "requests_per_minute").set(0.42)
    m.queue_depth.set(3)
    today = 20_000
    cells = [SpendCell("acme", today, "gpt-4o", (4, 100, 50, 0, 0, 2_500_000_000)),
             SpendCell("acme", today, "gpt-4o-mini", (1, 10, 5, 0, 0, 500_000_000)),
             SpendCell("beta", today, "gpt-4o", (9, 10, 5, 0, 0, 1_000_000_000)),
             SpendCell("gamma", today - 1, "gpt-4o", (1, 10, 5, 0, 0, 9_000_000_000))]
    doc = document(ready=True, detail="redis ok", ledger="ledger: file sink ok",
                   backend="redis", policy_source="policy.yaml", policy_digest="abc",
                   registry=m.registry, today=today, cells=cells, failure_mode_last_minute=4)
    assert [t["tenant"] for t in doc["top_tenants_today"]] == ["acme", "beta"]  # not yesterday's
    acme = doc["top_tenants_today"][0]
    assert acme["usd"] == 3.0 and acme["requests"] == 5
    assert acme["budget"] == {"unit": "usd", "remaining": 12.5, "limit": 50.0}
    assert doc["providers"] == {"openai": {"requests_per_minute": 0.42}}
    assert doc["queue_depth"] == 3 and doc["failure_mode_decisions_last_minute"] == 4
    screen = render(doc)
    assert screen.startswith("READY")
    assert "openai" in screen and "42%" in screen
    assert "budget left $12.50 of $50.00" in screen
    assert max(len(line) for line in screen.splitlines()) <= 100
