"""One online SRUM step of the tiny preset on the CPU, split into rollout, scoring and update; and the peak
memory of a short ``srum fit`` (a child process, measured with getrusage)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest

from srum.cli import main
from srum.generation.prompts import read_prompts
from srum.generation.sampler import SamplerConfig
from srum.reward.judges import ScoringConfig
from srum.train.data import SRUMDataModule
from srum.train.module import OptimConfig, RolloutConfig, SRUMModule

REPO = Path(__file__).resolve().parents[1]
PROMPTS = "a red cube left of a blue ball\ntwo green circles\na yellow square\nthree blue triangles\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("step")
    main(["model", "init", "--preset", "tiny", "--out", str(folder / "ckpt"), "--seed", "0"])
    (folder / "prompts.txt").write_text(PROMPTS)
    return folder


@pytest.mark.benchmark(group="tiny-online-step")
def test_online_step_breakdown(benchmark, setup):
    """2 prompts x 2 candidates of 32 x 32 px, 10 sampler steps with text CFG, expected-score scoring of a
    2 x 2 grid of regions plus the whole image, one update."""
    module = SRUMModule(setup / "ckpt", rollout=RolloutConfig(images_per_prompt=2, height=32, width=32,
                                                              sampler=SamplerConfig(num_timesteps=10)),
                        scoring=ScoringConfig(proposer="grid"), optim=OptimConfig(warmup_steps=1))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=setup)
    trainer.fit(module, SRUMDataModule(prompts=setup / "prompts.txt", batch_size=2))  # builds and warms up
    prompts = read_prompts(setup / "prompts.txt")[:2]
    shares: dict[str, float] = {}

    def step() -> None:
        samples, timing = module.rollout_and_score(prompts, 7)
        start = time.perf_counter()
        module.objective.step(module.policy(7), samples, 0, lambda loss: loss.backward())
        timing["update"] = time.perf_counter() - start
        shares.update(timing)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    total = sum(shares.values())
    benchmark.extra_info.update({f"{name}_share": round(value / total, 3) for name, value in shares.items()})
    benchmark.extra_info.update({f"{name}_s": round(value, 4) for name, value in shares.items()})


@pytest.mark.benchmark(group="tiny-fit-memory")
def test_short_fit_peak_memory(benchmark, setup):
    """Peak resident memory of a 3-step ``srum fit`` of the tiny preset (the whole process)."""
    args = [sys.executable, "-m", "srum", "fit", "--config", str(REPO / "configs" / "compbench.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true", "--trainer.max_steps", "3", "--trainer.default_root_dir",
            str(setup / "fit"), "--model.checkpoint", str(setup / "ckpt"), "--data.prompts",
            str(setup / "prompts.txt"), "--model.rollout.height", "32", "--model.rollout.width", "32",
            "--model.rollout.sampler.num_timesteps", "10", "--model.activation_checkpointing", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def fit() -> None:
        subprocess.run(args, env=env, check=True, capture_output=True, timeout=600)

    benchmark.pedantic(fit, rounds=1, warmup_rounds=0)
    benchmark.extra_info["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
