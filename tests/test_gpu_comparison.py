"""The parts of ``benchmarks_perf/gpu_comparison.py`` that run without a GPU: its providers agree with the
float64 reference before anything is timed, and a wrong one is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks_perf"))
import gpu_comparison  # noqa: E402


def test_cpu_providers_agree_with_the_float64_reference():
    inputs = gpu_comparison.make_inputs(3, "cpu", map_side=96, grid=8)
    functions = gpu_comparison.providers("cpu", inputs[3], inputs[2])
    assert set(functions) == {"official-eager", "vectorised"}
    errors = gpu_comparison.check_against_reference(inputs, functions)
    assert all(error < 1e-5 for error in errors.values())


def test_a_provider_that_disagrees_is_not_timed():
    inputs = gpu_comparison.make_inputs(2, "cpu", map_side=16, grid=4)
    wrong = {"off-by-a-percent": lambda v, t, m, g: 1.01 * gpu_comparison.official_loop(v, t, m, g)}
    with pytest.raises(SystemExit, match="off-by-a-percent differs from the float64 reference"):
        gpu_comparison.check_against_reference(inputs, wrong)

