"""The shipped alert rules name only metrics (and labels) the sidecar exports."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from sidecar.metrics import Metrics

RULES = Path(__file__).parent.parent / "docs" / "prometheus" / "alerts.yaml"


def exported_series() -> dict[str, set[str]]:
    """sample name -> label names, for every metric the sidecar defines."""
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if hasattr(metric, "_labelnames") and hasattr(metric, "_name"):
            for suffix in ("", "_total", "_bucket", "_count", "_sum"):
                extra = {"le"} if suffix == "_bucket" else set()
                out[metric._name + suffix] = set(metric._labelnames) | extra
    return out


def test_alert_rules_reference_exported_metrics_and_labels():
    doc = yaml.safe_load(RULES.read_text())
    series = exported_series()
    seen = 0
    for rule in doc["groups"][0]["rules"]:
        for name, selector in re.findall(r"\b(kt_[a-z_]+)(\{[^}]*\})?", rule["expr"]):
            assert name in series, f"{rule['alert']}: {name} is not exported"
            for label in re.findall(r"(\w+)\s*=", selector or ""):
                assert label in series[name], f"{rule['alert']}: {name} has no label {label}"
            seen += 1
    assert seen >= 7


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        import pytest

        pytest.skip("waits for promtool: apt-get install prometheus (.ci/run installs it)")
    res = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
