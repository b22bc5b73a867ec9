"""The checker as a judge: reward records for ShapeWorld images scored by the weight-free checker instead of the
model. Training on them is the oracle arm - the ceiling of what a perfect judge would give SRUM."""

from __future__ import annotations

from torch import Tensor

from srum.reward.records import RegionEntry, RewardRecord, Scores
from srum.shapeworld.checker import score
from srum.shapeworld.tasks import wanted
from srum.shapeworld.world import parse_spec


class CheckerScorer:
    """Scores like ``SelfScorer.score``. The global score is the checker's verdict, 1 if the image passes and -1
    if anything is wrong: the answer the model's own judge was pretrained to give (clean vs one-thing-wrong).
    Every detected object is a region scored 1 if the prompt asks for its colour and shape, else -1. Both score
    kinds (text, expected) hold the same value."""

    def score(self, images: list[Tensor], prompts: list[str], image_files: list[str],
              prompt_ids: list[str | None] | None = None) -> list[RewardRecord]:
        prompt_ids = prompt_ids or [None] * len(images)
        records = []
        for image, prompt, name, prompt_id in zip(images, prompts, image_files, prompt_ids, strict=True):
            spec = parse_spec(prompt)
            verdict = score(image, spec)
            height, width = image.shape[:2]
            regions = []
            for found in verdict.detections:
                x1, y1, x2, y2 = found.box
                value = 1.0 if wanted(found.colour, found.shape, spec) else -1.0
                regions.append(RegionEntry((x1 / width, y1 / height, x2 / width, y2 / height),
                                           f"{found.colour} {found.shape}", Scores(value, value)))
            value = 1.0 if verdict.passed else -1.0
            records.append(RewardRecord(
                image_file=name, good_image_file=name, prompt=prompt, width=width, height=height,
                global_scores=Scores(value, value), regions=tuple(regions), prompt_id=prompt_id,
                scorer={"judge": "checker"}, answers={"reasons": list(verdict.reasons)}))
        return records
