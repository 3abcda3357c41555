"""Where the repository is, for tests that read its files (README, docs, bench, the
Dockerfile): one constant, so a test file can move between folders of tests/."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
