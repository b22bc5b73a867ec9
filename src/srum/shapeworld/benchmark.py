"""ShapeWorld's benchmark of one model: generation on the test split checked by the checker, and the model's own
judgement (balanced accuracy on clean vs one-thing-wrong renders, agreement with the checker on its own images).
Seeds depend only on the prompt's position, so two models are compared on paired images."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from srum.generation.pipeline import Pipeline
from srum.generation.sampler import SamplerConfig
from srum.shapeworld.evaluate import (
    READOUTS,
    Readout,
    agreement_with_checker,
    evaluate_generation,
    evaluate_judge,
)
from srum.shapeworld.world import prompts as world_prompts


def shapeworld_sampler() -> SamplerConfig:
    """The sampling ShapeWorld models are measured with: unguided (the 10,000-step base model passed 20% of
    seen-pair prompts unguided, 16.5% at CFG 2 and 16% at CFG 3), 16 grid points, no time shift at 36 px."""
    return SamplerConfig(num_timesteps=16, timestep_shift=1.0, cfg_text_scale=1.0, cfg_interval=(0.0, 1.0))


@dataclass(frozen=True)
class BenchmarkConfig:
    """What a ShapeWorld evaluation draws."""

    prompts: int = 1000
    """Test prompts, one image each (at a 30% pass rate, 1,000 images give about +-1.4 points of error)."""
    judge_renders: int = 400
    """Clean and one-thing-wrong renders the model judges."""
    split: str = "test"
    """Prompt split: test (held-out colour-shape pairs included) or val."""
    seed: int = 0
    """Seed of the prompt list, the renders and every image's noise."""
    sampler: SamplerConfig = field(default_factory=shapeworld_sampler)
    """Sampling of the generated images."""
    batch_size: int = 100
    """Images generated at once."""
    judge_readouts: tuple[Readout, ...] = ("description", "questions", "instruction")
    """How the model's judgement is read (``srum.shapeworld.evaluate.READOUTS``), each measured; the first is
    the summary's ``judge`` and ``agreement_with_checker``, all are under ``readouts``."""

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.judge_renders < 2:
            raise ValueError(f"prompts and judge_renders: expected >= 1 and >= 2, got {self.prompts}, "
                             f"{self.judge_renders}")
        if not self.judge_readouts or not set(self.judge_readouts) <= set(READOUTS):
            raise ValueError(f"judge_readouts: expected some of {', '.join(READOUTS)}, got {self.judge_readouts!r}")
        if self.split not in ("val", "test"):
            raise ValueError(f"split: expected val or test, got {self.split!r}")


@dataclass
class Evaluation:
    """One model's numbers (``summary``, JSON-ready) and its images, in prompt order, for grids."""

    summary: dict
    images: list[torch.Tensor]
    prompts: list[str]


SUMMARY_VERSION = 4
"""What a summary holds (2: the judge's rejections per kind of mistake; 3: judge renders drawn from the
benchmark's prompts, seen and unseen pairs mixed; 4: the judge under each readout); cached measurements of
another version are not reused."""


def settings_of(config: BenchmarkConfig) -> dict:
    """The settings a summary records (two summaries are comparable when these are equal)."""
    return asdict(config)


@torch.no_grad()
def first_images(pipeline: Pipeline, config: BenchmarkConfig, count: int) -> tuple[list[torch.Tensor], list[str]]:
    """The benchmark's first ``count`` images and prompts, exactly as ``run_benchmark`` draws them (seeds depend
    only on the position), without measuring anything."""
    prompt_list = world_prompts(config.split, config.prompts, config.seed)[:count]
    generation = evaluate_generation(pipeline, prompt_list, config.sampler, seed=config.seed,
                                     batch_size=config.batch_size)
    return generation.images, [p.text for p in prompt_list]


@torch.no_grad()
def run_benchmark(pipeline: Pipeline, config: BenchmarkConfig) -> Evaluation:
    prompt_list = world_prompts(config.split, config.prompts, config.seed)
    generation = evaluate_generation(pipeline, prompt_list, config.sampler, seed=config.seed,
                                     batch_size=config.batch_size)
    readouts = {readout: {"judge": evaluate_judge(pipeline, config.judge_renders, config.seed, config.split, readout),
                          "agreement_with_checker": agreement_with_checker(pipeline, generation, prompt_list, readout)}
                for readout in config.judge_readouts}
    primary = readouts[config.judge_readouts[0]]
    passed = sum(v.passed for v in generation.verdicts)
    by_kind = {kind: [v.passed for v, p in zip(generation.verdicts, prompt_list, strict=True) if p.unseen == unseen]
               for kind, unseen in (("seen", False), ("unseen", True))}
    summary = {
        "benchmark": "shapeworld",
        "overall": generation.report["overall"],
        "pass_rate": passed / len(prompt_list),
        "pass_rate_stderr": math.sqrt(passed * (len(prompt_list) - passed)) / len(prompt_list) ** 1.5,
        "pass_rate_by_combination": {kind: sum(v) / len(v) if v else 0.0 for kind, v in by_kind.items()},
        "categories": generation.report["categories"],
        "judge": primary["judge"],
        "agreement_with_checker": primary["agreement_with_checker"],
        "readouts": readouts,
        "settings": settings_of(config),
    }
    return Evaluation(summary, generation.images, [p.text for p in prompt_list])
