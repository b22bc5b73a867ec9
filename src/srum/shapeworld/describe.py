"""Self-judging through the model's own description: the model describes each picture object by object (the
caption task it is pretrained on: ``top left red square, bottom centre blue circle``), the description is read
back into a scene, and the prompt's atomic questions (``srum.shapeworld.questions``) are answered from that
scene. Reading a picture into words is what a small model learns first and best; matching a question's words
against image tokens (answering "Is there a red square?" from the pixels) it may not have learned yet. The
comparison with the prompt is exact, so the judge is as good as the model's perception.
"""

from __future__ import annotations

from statistics import fmean as mean

from torch import Tensor

from srum.generation.text import DecodingConfig
from srum.model.autoencoder import from_uint8_image
from srum.reward.records import RegionEntry, RewardRecord, Scores
from srum.shapeworld.questions import atomic_truths
from srum.shapeworld.tasks import CAPTION_QUESTION, COLUMN_WORDS, ROW_WORDS, wanted
from srum.shapeworld.world import COLOURS, GRID, SHAPES, Obj, Scene, parse_spec


def read_description(text: str) -> tuple[Scene, int]:
    """The scene a description states, and how many of its parts did not read as ``<row> <column> <colour>
    <shape>`` (those are left out; ``nothing`` is the empty scene). A cell named twice keeps its first object."""
    if text.strip() == "nothing":
        return Scene(), 0
    objects: dict[tuple[int, int], Obj] = {}
    unread = 0
    for part in text.split(","):
        words = part.split()
        if (len(words) != 4 or words[0] not in ROW_WORDS or words[1] not in COLUMN_WORDS or words[2] not in COLOURS
                or words[3] not in SHAPES):
            unread += 1
            continue
        cell = (ROW_WORDS.index(words[0]), COLUMN_WORDS.index(words[1]))
        objects.setdefault(cell, Obj(words[2], words[3], cell))
    return Scene(tuple(objects.values())), unread


DESCRIPTION_TOKENS = 48
"""Longest description decoded, in tokens."""


class DescriptionJudge:
    """Scores like ``SelfScorer.score``, from the model's greedy description of each picture.

    The global score is 2 x (product, or mean with ``aggregate="mean"``) of the atomic questions' answers - 1;
    every described object is a region (its grid cell), scored 1 if the prompt asks for its colour and shape and
    -1 otherwise. Both score kinds hold the same value; the description is kept in ``answers``."""

    def __init__(self, pipeline, aggregate: str = "product", max_new_tokens: int = DESCRIPTION_TOKENS) -> None:
        if aggregate not in ("product", "mean"):
            raise ValueError(f"aggregate: expected product or mean, got {aggregate!r}")
        self.pipeline, self.aggregate = pipeline, aggregate
        self.decoding = DecodingConfig(max_new_tokens=max_new_tokens)

    def score(self, images: list[Tensor], prompts: list[str], image_files: list[str],
              prompt_ids: list[str | None] | None = None) -> list[RewardRecord]:
        prompt_ids = prompt_ids or [None] * len(images)
        pixels = [from_uint8_image(image) for image in images]
        descriptions = self.pipeline.answer(pixels, [CAPTION_QUESTION] * len(images), self.decoding)
        records = []
        for image, prompt, name, prompt_id, description in zip(images, prompts, image_files, prompt_ids,
                                                                descriptions, strict=True):
            spec = parse_spec(prompt)
            scene, unread = read_description(description)
            truths = atomic_truths(spec, scene)
            joint = float(all(truths)) if self.aggregate == "product" else mean(truths)
            regions = tuple(
                RegionEntry((o.cell[1] / GRID, o.cell[0] / GRID, (o.cell[1] + 1) / GRID, (o.cell[0] + 1) / GRID),
                            f"{o.colour} {o.shape}", Scores(*(2 * [1.0 if wanted(o.colour, o.shape, spec) else -1.0])))
                for o in scene.objects)
            value = 2 * joint - 1
            height, width = image.shape[:2]
            records.append(RewardRecord(
                image_file=name, good_image_file=name, prompt=prompt, width=width, height=height,
                global_scores=Scores(value, value), regions=regions, prompt_id=prompt_id,
                scorer={"judge": "describe", "aggregate": self.aggregate, "unread_parts": unread},
                answers={"description": description}))
        return records
