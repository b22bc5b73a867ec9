"""Measuring a model in ShapeWorld: how often its images pass the checker (generation), and how well its own
judgement separates clean from one-thing-wrong renders and agrees with the checker on its own images
(understanding) - the gap SRUM feeds on."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import fmean as mean
from typing import Literal

import torch

from srum.generation.pipeline import Pipeline
from srum.generation.sampler import SamplerConfig
from srum.model.autoencoder import from_uint8_image
from srum.reward.proposals import WholeImageProposer
from srum.reward.scorer import ScorerConfig, SelfScorer
from srum.shapeworld.checker import Verdict, report, score
from srum.shapeworld.describe import DescriptionJudge
from srum.shapeworld.questions import ShapeWorldDecomposer
from srum.shapeworld.tasks import SHAPEWORLD_INSTRUCTIONS, perturb
from srum.shapeworld.world import SIZE, Prompt, render, scene_for
from srum.shapeworld.world import prompts as world_prompts

CLEAN = "clean"


@dataclass
class GenerationResult:
    report: dict
    verdicts: list[Verdict]
    images: list[torch.Tensor]


def evaluate_generation(pipeline: Pipeline, prompts: list[Prompt], sampler: SamplerConfig, seed: int = 0,
                        batch_size: int = 32) -> GenerationResult:
    """One image per prompt (seeded per prompt), checked against its prompt."""
    verdicts, images = [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        seeds = [seed * 1_000_003 + start + i for i in range(len(batch))]
        generated = pipeline.generate([p.text for p in batch], seeds, sampler, height=SIZE, width=SIZE)
        for prompt, image in zip(batch, generated.images, strict=True):
            verdicts.append(score(image, prompt.spec))
            images.append(image)
    return GenerationResult(report(verdicts), verdicts, images)


Readout = Literal["instruction", "questions", "description"]
READOUTS: tuple[Readout, ...] = ("instruction", "questions", "description")


def global_expected_scores(pipeline: Pipeline, images: list[torch.Tensor], prompts: list[str],
                           readout: Readout = "instruction") -> torch.Tensor:
    """The model's global score of each image against its prompt, (N,): probability-weighted from the global
    scoring instruction, the product of its P(yes) to the prompt's atomic questions, or those questions answered
    from its own description of the image."""
    if readout == "description":
        records = DescriptionJudge(pipeline).score(images, prompts, [""] * len(images))
        return torch.tensor([record.global_scores.expected for record in records])
    config = ScorerConfig(method="expected", readout=readout)
    decomposer = ShapeWorldDecomposer() if readout == "questions" else None
    scorer = SelfScorer(pipeline, WholeImageProposer(), config, SHAPEWORLD_INSTRUCTIONS, decomposer)
    pixels = [from_uint8_image(i) for i in images]
    if readout == "questions":
        return torch.tensor(scorer.decomposed(pixels, prompts)[0])
    return torch.tensor(scorer.expected(pixels, [SHAPEWORLD_INSTRUCTIONS.global_instruction(p) for p in prompts]))


def evaluate_judge(pipeline: Pipeline, count: int = 200, seed: int = 0, split: str = "test",
                   readout: Readout = "instruction") -> dict:
    """Balanced accuracy of the sign of the model's global score on clean vs one-thing-wrong renders, and the
    share of wrong renders rejected per kind of change (which mistakes the judge can see). The prompts are the
    split's benchmark prompts (seen and unseen pairs mixed as in generation)."""
    rng = random.Random(seed)
    images, prompts, kinds = [], [], []
    for prompt in world_prompts(split, count, seed):
        spec = prompt.spec
        scene = scene_for(spec, rng)
        clean = rng.random() < 0.5  # independent of the category, which cycles with the position
        shown, kind = (scene, CLEAN) if clean else perturb(scene, spec, rng)
        images.append(render(shown))
        prompts.append(spec.text())
        kinds.append(kind)
    said = (global_expected_scores(pipeline, images, prompts, readout) > 0).tolist()
    accepted = {kind: [yes for yes, k in zip(said, kinds, strict=True) if k == kind] for kind in dict.fromkeys(kinds)}
    accuracy_clean = _share(accepted.pop(CLEAN, []))
    accuracy_wrong = _share([not yes for answers in accepted.values() for yes in answers])
    return {"balanced_accuracy": (accuracy_clean + accuracy_wrong) / 2, "clean_accepted": accuracy_clean,
            "wrong_rejected": accuracy_wrong,
            "wrong_rejected_by_kind": {kind: 1 - _share(answers) for kind, answers in sorted(accepted.items())}}


def _share(flags: list[bool]) -> float:
    """The share of true flags (NaN for none: a report with it fails its finiteness check)."""
    return mean(flags) if flags else math.nan


def agreement_with_checker(pipeline: Pipeline, result: GenerationResult, prompts: list[Prompt],
                           readout: Readout = "instruction") -> float:
    """How often the sign of the model's own global score agrees with the checker's verdict on its images."""
    scores = global_expected_scores(pipeline, result.images, [p.text for p in prompts], readout)
    passed = torch.tensor([v.passed for v in result.verdicts])
    return float(((scores > 0) == passed).float().mean())
