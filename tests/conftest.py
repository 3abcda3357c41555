"""Shared pytest setup. Fixtures that start real servers live in tests/support/."""
from __future__ import annotations

import os

from hypothesis import settings

# CI runs on 2 cores: bounded, deterministic-enough property runs with no per-example deadline.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
