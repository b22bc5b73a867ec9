"""Shared setup for the pytest-benchmark suite (``pytest benchmarks_perf``; never collected by ``pytest tests``)."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark registers `benchmark` itself (its keyword arguments, e.g. `group=`, set per-test options);
    # registering it here too keeps `--strict-markers` runs working whatever plugins are loaded.
    config.addinivalue_line("markers", "benchmark: a pytest-benchmark timing (lives in benchmarks_perf/)")


@pytest.fixture(autouse=True)
def _restore_dtype_and_seed():
    """Each benchmark starts seeded and may change the default dtype without leaking it into the next one."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
