"""The judge's passes over the candidates, as the plan sizes them: which contexts it builds per candidate, how
long they are, and how many rows each is forked into. Token counts come from the checkpoint's tokenizer when it
is on disk (else about four characters per token) and from the instructions the run configures."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from srum.reward.instructions import SCORE_PREFIX, score_candidates
from srum.reward.judges import ScoringConfig, scoring_instructions
from srum.reward.scorer import YES_NO

CONTEXT_MARKERS = 4
"""Tokens around a context's parts: the vision start and end markers, and the text's start and end."""


@dataclass(frozen=True)
class JudgePass:
    """One no-grad pass: ``contexts_per_image`` contexts per candidate, each ``context_tokens`` long (ViT
    patches, markers, instruction), then either ``options`` teacher-forced runs of up to ``new_tokens`` each,
    scored together against the shared context, or (``options`` 0) ``new_tokens`` answer tokens decoded."""

    name: str
    contexts_per_image: int
    context_tokens: int
    options: int
    new_tokens: int
    max_contexts: int | None = None
    """Contexts read in one pass at most (``scoring.scorer.max_contexts``); None: all at once."""


def judge_passes(scoring: ScoringConfig, vit_tokens: int, frame: tuple[int, int], prompt_tokens: int,
                 count: Callable[[str], int], questions_per_image: int = 8) -> list[JudgePass]:
    """The passes of the configured judge, one after another; none for the checker, and none for an external
    VLM (its memory is its own model's)."""
    if scoring.judge in ("checker", "vlm"):
        return []
    if scoring.judge == "describe":
        from srum.shapeworld.describe import DESCRIPTION_TOKENS
        from srum.shapeworld.tasks import CAPTION_QUESTION

        return [JudgePass("description", 1, vit_tokens + count(CAPTION_QUESTION) + CONTEXT_MARKERS, 0,
                          DESCRIPTION_TOKENS)]
    scorer, instructions = scoring.scorer, scoring_instructions(scoring.instructions)
    height, width = frame
    box = [0, 0, width, height]
    regions = 1 if scoring.proposer == "whole" else scoring.max_regions  # the others find up to max_regions

    def context(instruction: str) -> int:
        return vit_tokens + count(instruction) + prompt_tokens + CONTEXT_MARKERS

    if scorer.readout == "questions":
        return [JudgePass("atomic questions", questions_per_image, context("Is there a red square?"), len(YES_NO),
                          1 + max(count(answer) for answer in YES_NO), scorer.max_contexts)]
    passes = []
    if scorer.method in ("text", "both"):
        passes += [JudgePass("global answer", 1, context(instructions.global_instruction("")), 0,
                             scorer.max_new_tokens_global),
                   JudgePass("region answer", 1, context(instructions.region_instruction("", [box] * regions, width,
                                                                                         height)),
                             0, scorer.max_new_tokens_regions)]
    if scorer.method in ("expected", "both"):
        options = [SCORE_PREFIX + value for value in score_candidates(scorer.score_step)]
        longest = 1 + max(count(option) for option in options)
        passes += [JudgePass("global score", 1, context(instructions.global_instruction("")), len(options), longest),
                   JudgePass("region scores", regions, context(instructions.single_region_instruction("", box, width,
                                                                                                      height)),
                             len(options), longest)]
    return [dataclasses.replace(judge_pass, max_contexts=scorer.max_contexts) for judge_pass in passes]
