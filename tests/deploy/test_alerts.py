"""The shipped alert rules name only metrics (and labels) the sidecar exports."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from sidecar.backends.memory import MemoryBackend
from sidecar.backends.redis import RedisBackend
from sidecar.ledger.recorder import Ledger
from sidecar.metrics import Metrics
from sidecar.policy import schema
from tests.support.paths import ROOT

RULES = ROOT / "docs" / "prometheus" / "alerts.yaml"
# the unit tests of the rules: evaluated every minute, and those over a day or more of
# series every 5 minutes (promtool's evaluation interval is one per file)
RULE_TEST_FILES = [ROOT / "docs" / "prometheus" / name
                   for name in ("alerts_test.yaml", "alerts_test_long.yaml")]
RULE_TESTS = RULE_TEST_FILES[0]


def rule_test_cases() -> list[dict]:
    return [case for path in RULE_TEST_FILES for case in yaml.safe_load(path.read_text())["tests"]]
DASHBOARD = ROOT / "docs" / "grafana" / "kt-sidecar.json"


def exported_series() -> dict[str, set[str]]:
    """sample name -> label names, for every metric the sidecar defines, and those each
    backend exports at scrape time (Metrics.watch_backend)."""
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if hasattr(metric, "_labelnames") and hasattr(metric, "_name"):
            for suffix in ("", "_total", "_bucket", "_count", "_sum"):
                extra = {"le"} if suffix == "_bucket" else set()
                # one name may carry several label sets (kt_tokens_remaining: tenant, provider)
                out.setdefault(metric._name + suffix, set()).update(
                    set(metric._labelnames) | extra)
    for backend in (MemoryBackend(state_file="unused.json"),
                    RedisBackend(schema.RedisBackend(url="redis://127.0.0.1:1/0"))):
        m = Metrics()
        m.watch_backend(backend)
        m.watch_ledger(Ledger(None))  # the ledger's families (writer, thresholds)
        for family in m.registry.collect():
            # a family declares its labels even before it has a sample (no threshold
            # crossed yet, no writer without a ledger sink)
            declared = set(getattr(family, "_labelnames", ()))
            names = [family.name + "_total"] if family.type == "counter" else [family.name]
            if family.type == "histogram":  # scrape-time histograms (kt_upstream_*)
                names = [family.name + s for s in ("_bucket", "_count", "_sum")]
            for name in names:
                out.setdefault(name, set()).update(
                    declared | ({"le"} if name.endswith("_bucket") else set()))
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    return out


def check_exprs(exprs: dict[str, str]) -> int:
    series = exported_series()
    seen = 0
    for where, expr in exprs.items():
        for name, selector in re.findall(r"\b(kt_[a-z_]+)(\{[^}]*\})?", expr):
            assert name in series, f"{where}: {name} is not exported"
            for label in re.findall(r"(\w+)\s*=", selector or ""):
                assert label in series[name], f"{where}: {name} has no label {label}"
            seen += 1
    return seen


def test_alert_rules_reference_exported_metrics_and_labels():
    doc = yaml.safe_load(RULES.read_text())
    rules = {r["alert"]: r["expr"] for r in doc["groups"][0]["rules"]}
    assert check_exprs(rules) >= 7
    # the backends' own failures each have an alert
    for name in ("kt_backend_store_resets_total", "kt_backend_connection_attempts_total",
                 "kt_state_write_failures_total"):
        assert any(name in expr for expr in rules.values()), name


def test_dashboard_references_exported_metrics():
    import json

    doc = json.loads(DASHBOARD.read_text())
    exprs = {f"{p['title']}/{t['refId']}": t["expr"] for p in doc["panels"] for t in p["targets"]}
    assert check_exprs(exprs) >= 10


@pytest.mark.subprocess
def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        import pytest

        pytest.skip("waits for promtool: apt-get install prometheus (.ci/run installs it)")
    res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.subprocess
def test_promtool_rule_unit_tests_pass():
    """docs/prometheus/alerts_test.yaml: the provider alerts (HighQueueDepth,
    ProviderRateLimited, TokenBudgetExhausted) fire on the series that should fire them, and
    stay quiet on the ones that should not."""
    promtool = shutil.which("promtool")
    if promtool is None:
        import pytest

        pytest.skip("waits for promtool: apt-get install prometheus (.ci/run installs it)")
    res = subprocess.run([promtool, "test", "rules", *map(str, RULE_TEST_FILES)],
                         capture_output=True, text=True, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (res.stdout + res.stderr).count("SUCCESS") == len(RULE_TEST_FILES)
    tested = {t["alertname"] for case in rule_test_cases() for t in case["alert_rule_test"]}
    assert {"HighQueueDepth", "ProviderRateLimited", "TokenBudgetExhausted"} <= tested


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_keeps_it_quiet():
    """`promtool test rules` only checks what the tests name: an alert with no test, or
    tested only where it stays quiet, could never fire and nothing would say so."""
    rules = {r["alert"] for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]}
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in rule_test_cases():
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert rules - fired == set(), "alerts no unit test fires"
    assert rules - quiet == set(), "alerts no unit test keeps quiet"
    assert len(rules) >= 27
