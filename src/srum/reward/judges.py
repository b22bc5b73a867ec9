"""Reward judges behind one interface: who turns (images, prompts) into reward records during training.

- ``self``: the trained model's own understanding branch (SRUM);
- ``checker``: ShapeWorld's weight-free checker (the oracle arm: what a perfect judge would give);
- ``describe``: the trained model again, through its own description of each picture checked against the
  prompt's atomic questions (``srum.shapeworld.describe``; ShapeWorld prompts);
- ``vlm``: a local transformers vision-language model asked the same instructions (the external-reward setting
  of the peers), so self-reward and external reward are compared with one flag.

Every judge returns the same ``RewardRecord`` list, so maps are painted and objectives run the same way whoever
judged. (The CompBench evaluation judges of ``srum.eval.judges`` grade finished images on a rubric; these score
rollouts for training.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from torch import Tensor

from srum.reward.decompose import Decomposer, ModelDecomposer
from srum.reward.instructions import DEFAULT_INSTRUCTIONS, ScoringInstructions, read_instructions
from srum.reward.proposals import build_proposer
from srum.reward.records import RewardRecord, ScoreKind
from srum.reward.scorer import ScorerConfig, SelfScorer

JudgeName = Literal["self", "checker", "describe", "vlm"]
JUDGES = ("self", "checker", "describe", "vlm")


class Judge(Protocol):
    def score(self, images: list[Tensor], prompts: list[str], image_files: list[str],
              prompt_ids: list[str | None] | None = None) -> list[RewardRecord]:
        """One record per uint8 image (H, W, 3) drawn for its prompt."""
        ...


@dataclass(frozen=True)
class ScoringConfig:
    """How online candidates are judged."""

    judge: JudgeName = "self"
    """Who scores: ``self`` (SRUM), ``checker`` (ShapeWorld's oracle, ShapeWorld prompts only), ``describe`` (the
    model's own description read against the prompt's atomic questions, ShapeWorld prompts only) or ``vlm`` (the
    local transformers model in ``vlm_dir``)."""
    proposer: Literal["components", "grid", "whole", "sam"] = "components"
    """Region proposer (self and vlm judges)."""
    max_regions: int = 10
    """Regions kept per image, largest first."""
    sam_dir: str | None = None
    """Local transformers SAM folder (proposer sam)."""
    scorer: ScorerConfig = field(default_factory=lambda: ScorerConfig(method="expected"))
    """Scorer settings (expected scores need no decoding: the fast default online)."""
    score_kind: ScoreKind = "expected"
    """Which score kind becomes the reward: expected (probability-weighted) or text (parsed answers)."""
    instructions: str = "default"
    """Scoring instructions: ``default`` (srum's wording), ``shapeworld`` (the short ShapeWorld set the base model
    is pretrained on) or a YAML file replacing templates."""
    vlm_dir: str | None = None
    """Local transformers vision-language model folder (judge vlm)."""
    vlm_class: str = "AutoModelForImageTextToText"
    """Its transformers model class (judge vlm)."""
    questions: Literal["model", "shapeworld"] = "model"
    """Who splits prompts into atomic questions when ``scorer.readout`` is ``questions``: the reader itself, in
    text (any prompt), or ShapeWorld's prompt parser (ShapeWorld prompts, the wording its base is pretrained on)."""

    def __post_init__(self) -> None:
        if self.judge not in JUDGES:
            raise ValueError(f"scoring.judge: expected one of {', '.join(JUDGES)}, got {self.judge!r}")
        if self.questions not in ("model", "shapeworld"):
            raise ValueError(f"scoring.questions: expected model or shapeworld, got {self.questions!r}")
        if self.judge == "vlm" and not self.vlm_dir:
            raise ValueError("scoring.vlm_dir: expected a local transformers model folder for judge vlm, got none")


def scoring_instructions(name: str) -> ScoringInstructions:
    if name == "default":
        return DEFAULT_INSTRUCTIONS
    if name == "shapeworld":
        from srum.shapeworld.tasks import SHAPEWORLD_INSTRUCTIONS

        return SHAPEWORLD_INSTRUCTIONS
    return read_instructions(name)


def build_judge(config: ScoringConfig, pipeline: Any, device: Any = None) -> Judge:
    """The configured judge; ``pipeline`` is the trained model's (the self judge reads with it)."""
    if config.judge == "checker":
        from srum.shapeworld.oracle import CheckerScorer

        return CheckerScorer()
    if config.judge == "describe":
        from srum.shapeworld.describe import DescriptionJudge

        return DescriptionJudge(pipeline, config.scorer.aggregate)
    options: dict[str, Any] = {"max_regions": config.max_regions}
    if config.proposer == "sam":
        options.update(model_dir=config.sam_dir, device=device)
    proposer = build_proposer(config.proposer, **options)
    reader = pipeline
    if config.judge == "vlm":
        from srum.reward.vlm_reader import VLMReader

        reader = VLMReader(config.vlm_dir, config.vlm_class, device=device or "cpu")
    instructions = scoring_instructions(config.instructions)
    return SelfScorer(reader, proposer, config.scorer, instructions, build_decomposer(config, reader, instructions))


def build_decomposer(config: ScoringConfig, reader: Any, instructions: ScoringInstructions) -> Decomposer | None:
    """The question source of decomposed scoring (None for the instruction readout)."""
    if config.scorer.readout != "questions":
        return None
    if config.questions == "shapeworld":
        from srum.shapeworld.questions import ShapeWorldDecomposer

        return ShapeWorldDecomposer()
    return ModelDecomposer(reader, instructions)
