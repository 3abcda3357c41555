"""Static checks: mypy on the package (the seams — Backend protocol, core stub — stay
honest) and ruff's error rules (unused names, bugbear) on everything."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # mypy and ruff run as processes

ROOT = Path(__file__).parent.parent


def test_mypy_passes_on_the_package():
    res = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "sidecar"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_finds_no_errors():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "sidecar", "tests", "bench"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
