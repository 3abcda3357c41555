"""The pod's one /metrics under `kt serve --workers`: the workers' expositions summed
(counters, histograms, most gauges) or combined by GAUGE_MERGE, and what workers that
exited had counted kept in the sum, so a pod's counter never goes backwards."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# gauges whose pod-wide value is not the sum of the workers' values
GAUGE_MERGE: dict[str, Callable[[Iterable[float]], float]] = {
    "kt_backend_ready": min,  # ready only if every worker reaches the backend
    "kt_policy_info": max,  # 1 per policy served
    # the remaining tokens or budget after the latest decision: every worker reads the
    # same Redis state, the lowest value is the most recent (it only falls between refills)
    "kt_tokens_remaining": min,
    "kt_budget_remaining": min,
    # providers (docs/providers.md): the same shared buckets, and one configured limit
    "kt_provider_requests_remaining": min,
    "kt_provider_utilisation": max,
    "kt_provider_limit": max,
}

# the families whose samples only grow: what a worker that exited had counted stays in
# the pod's sum (RetiredCounts)
_MONOTONIC = ("counter", "histogram", "summary")


class RetiredCounts:
    """The counters and histograms of workers that exited, as last scraped: added to the
    live workers' sum, so a worker's death never makes a pod's counter go backwards (what
    prometheus-client's multiprocess mode does for the counters of dead processes).
    What a worker counted after the last scrape before it died is not known: a kill
    loses at most one scrape interval of its counts, never what was already reported."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.values: dict[tuple, float] = {}

    def add(self, text: str) -> None:
        for fam in text_string_to_metric_families(text):
            if fam.type not in _MONOTONIC:
                continue
            if fam.name not in self.families:
                self.families[fam.name] = Metric(fam.name, fam.documentation, fam.type,
                                                 fam.unit)
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                self.values[key] = self.values.get(key, 0.0) + s.value


def merge_metrics(texts: list[str], retired: Optional[RetiredCounts] = None) -> list[Metric]:
    """The workers' expositions as one: samples with the same name and labels combined
    (summed, or by GAUGE_MERGE), in the order the first worker lists them; plus what
    workers that exited had counted (``retired``)."""
    families: dict[str, Metric] = {}
    values: dict[tuple, list[float]] = {}
    for exposition in texts:
        for fam in text_string_to_metric_families(exposition):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                key = (fam.name, s.name, tuple(sorted(s.labels.items())))
                values.setdefault(key, []).append(s.value)
    if retired is not None:
        for name, fam in retired.families.items():
            families.setdefault(name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
        for key, value in retired.values.items():
            values.setdefault(key, []).append(value)
    for (fam_name, sample_name, labels), vals in values.items():
        fam = families[fam_name]
        if sample_name.endswith("_created"):
            value = min(vals)  # the earliest start, not a sum of timestamps
        elif fam.type == "gauge" and fam_name in GAUGE_MERGE:
            value = GAUGE_MERGE[fam_name](vals)
        else:
            value = sum(vals)
        fam.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class Merged:
    """A collector that yields the merged families of one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)
