"""``benchmarks_perf/gpu_check.sh --cpu``: the parts of the GPU check that run without a GPU, as CI runs them, and
its loss section's guard (a provider that disagrees with the float64 reference is never timed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks_perf"
sys.path.insert(0, str(BENCHMARKS))
import gpu_check  # noqa: E402
import gpu_loss  # noqa: E402


def test_cpu_providers_agree_with_the_float64_reference():
    inputs = gpu_loss.make_inputs(3, "cpu", map_side=96, grid=8)
    functions = gpu_loss.providers("cpu", inputs[3], inputs[2])
    assert {"official-eager", "vectorised", "triton"} <= set(functions)  # triton: the interpreter (conftest)
    errors = gpu_loss.check_against_reference(inputs, functions)
    assert all(error < 1e-5 for error in errors.values())


def test_a_provider_that_disagrees_is_not_timed():
    inputs = gpu_loss.make_inputs(2, "cpu", map_side=16, grid=4)
    wrong = {"off-by-a-percent": lambda v, t, m, g: 1.01 * gpu_loss.official_loop(v, t, m, g)}
    with pytest.raises(SystemExit, match="off-by-a-percent differs from the float64 reference"):
        gpu_loss.check_against_reference(inputs, wrong)


def test_the_cpu_parts_of_the_gpu_check_pass_and_write_one_results_file(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--cpu", "--out", str(out)])
    assert out.read_text() in capsys.readouterr().out  # the results file, printed at the end
    sections = results["sections"]
    for name in ("loss", "attention", "online_step"):
        assert sections[name]["status"] == "passed", sections[name]
    assert abs(sections["online_step"]["plan_vs_measured"]) <= gpu_check.PLAN_TOLERANCE
    fixture = sections["bf16_fixture"]
    assert fixture["status"] == "passed" or "official fixture is not here" in fixture["reason"], fixture
    qwen = sections["qwen_judge"]
    if importlib.util.find_spec("torchvision") is None:
        assert qwen["status"] == "skipped" and "needs torchvision" in qwen["reason"]
    else:
        assert qwen["status"] == "passed", qwen


def test_a_failing_section_is_recorded_and_the_others_still_run(monkeypatch):
    def broken(device: str) -> dict:
        raise RuntimeError("out of order")

    monkeypatch.setitem(gpu_check.SECTIONS, "loss", broken)
    results = gpu_check.run_sections("cpu", ["loss", "attention"])
    assert results["sections"]["loss"]["status"] == "failed"
    assert "RuntimeError: out of order" in results["sections"]["loss"]["error"]
    assert results["sections"]["attention"]["status"] == "passed"


def test_without_a_gpu_the_full_check_says_so():
    with pytest.raises(SystemExit, match="no CUDA GPU here; run with --cpu"):
        gpu_check.main([])
