"""Shared setup for the pytest-benchmark suite (timed with ``pytest benchmarks_perf --benchmark-enable``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks import their shared providers as plain modules


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark registers `benchmark` itself (its keyword arguments, e.g. `group=`, set per-test options);
    # registering it here too keeps `--strict-markers` runs working whatever plugins are loaded.
    config.addinivalue_line("markers", "benchmark: a pytest-benchmark timing (lives in benchmarks_perf/)")

