"""Benchmark images through ``srum generate``'s writer: fixed per-image seeds, batched, resumable, and one folder
per think mode, so think and no-think images never mix (srum-method.md §11, item 16)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from srum.generation.pipeline import Pipeline
from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig
from srum.generation.writer import generate_to_folder, image_file
from srum.model.shipped import checkpoint_identity


@dataclass(frozen=True)
class GenerationSettings:
    """How benchmark images are made."""

    sampler: SamplerConfig = SamplerConfig()
    """Sampler and guidance settings."""
    images_per_prompt: int = 1
    """Images per prompt, each with its own seed."""
    seed: int = 42
    """Run seed; each image's seed derives from it, its prompt id and its index."""
    batch_size: int = 4
    """Images generated together (the images do not depend on it)."""
    height: int = 1024
    """Image height in pixels."""
    width: int = 1024
    """Image width in pixels."""
    think: bool = False
    """Plan in text before drawing."""
    max_think_tokens: int = 1000
    """With think, tokens of each plan at most."""

    def __post_init__(self) -> None:
        for name in ("images_per_prompt", "batch_size", "height", "width", "max_think_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"generation.{name}: expected a positive integer, got {getattr(self, name)}")

    @property
    def mode(self) -> str:
        return "think" if self.think else "no_think"

    def as_record(self) -> dict:
        """The settings as a JSON report stores them."""
        return json.loads(json.dumps(asdict(self)))


COMPBENCH_GENERATION = GenerationSettings()
"""The official SRUM CompBench evaluation (srum-method.md §9.1): one 1024 px image per prompt, BAGEL's sampler;
the published table has runs with and without think."""
GENEVAL_GENERATION = GenerationSettings(images_per_prompt=4, sampler=SamplerConfig(cfg_interval=(0.0, 1.0)))
"""BAGEL's GenEval harness: four images per prompt, guidance over the whole schedule."""


def wanted_images(prompts: list[Prompt], generation: GenerationSettings) -> set[str]:
    """The image files these prompts and settings ask for (a folder may hold more from earlier runs)."""
    return {image_file(p.prompt_id, index) for p in prompts for index in range(generation.images_per_prompt)}


def generate_images(pipeline: Pipeline, checkpoint: str | Path, prompts: list[Prompt], folder: Path,
                    generation: GenerationSettings) -> int:
    """Make what ``folder`` lacks; the checkpoint is locked with the settings, so a folder never holds the images
    of two models. Returns the number of images made by this call."""
    return generate_to_folder(pipeline, prompts, folder, generation.sampler, generation.images_per_prompt,
                              generation.seed, generation.batch_size, generation.height, generation.width,
                              generation.think, generation.max_think_tokens,
                              extra_settings={"checkpoint": checkpoint_identity(checkpoint)})
