"""Self-scoring: the model's understanding branch judges its own images, globally and per proposed region.

Two ways to read a judgement, both recorded:

- ``text``: the model answers the instruction in free text (greedy), a tolerant parser reads the score; a
  failed parse is recorded as missing, never as 0.
- ``expected``: the expected score under the model's own distribution over the candidate score strings
  (``Score: -1.0`` ... ``Score: 1.0``), from one teacher-forced pass. It always yields a number and needs no
  retries; multi-token numbers are scored whole (summed token log-probabilities).

The expected score has two readouts: ``instruction`` asks the scoring instruction once per image (official);
``questions`` splits the prompt into atomic yes/no questions (``srum.reward.decompose``), reads P(yes) of each
from one teacher-forced pass, and aggregates them (product or mean) into the global score 2 P - 1; a region's
score is 2 P - 1 of its best-answered question about the object it holds.

Boxes are given to the model in the frame it sees the image at (the understanding transform's size), and that
size is stated in the instruction; records store them normalised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from srum.generation.pipeline import Pipeline
from srum.generation.text import DecodingConfig
from srum.model.autoencoder import from_uint8_image
from srum.reward.decompose import Decomposer
from srum.reward.instructions import DEFAULT_INSTRUCTIONS, SCORE_PREFIX, ScoringInstructions, score_candidates
from srum.reward.parsing import parse_number, parse_region_answer, parse_score_answer
from srum.reward.proposals import Region, RegionProposer
from srum.reward.records import RegionEntry, RewardRecord, Scores

Method = Literal["text", "expected", "both"]
YES_NO = ("yes", "no")


@dataclass(frozen=True)
class ScorerConfig:
    method: Method = "both"
    """Which score kinds to compute: ``text``, ``expected`` or ``both``."""
    global_kind: Literal["layout", "sample"] = "layout"
    """The global instruction: the layout judgement (official) or the whole-image impression."""
    think: bool = False
    """Let the free-text answers reason inside think tags first (official: on)."""
    max_new_tokens_global: int = 1024
    """Decoding budget of the global free-text answer."""
    max_new_tokens_regions: int = 4096
    """Decoding budget of the region free-text answer."""
    score_step: float = 0.1
    """Spacing of the candidate score strings of the expected score."""
    readout: Literal["instruction", "questions"] = "instruction"
    """How the expected score is read: the scoring instruction once (official) or the prompt's atomic yes/no
    questions (decomposed scoring; needs ``method: expected``)."""
    aggregate: Literal["product", "mean"] = "product"
    """How the questions' P(yes) become one (readout questions): their product (every question must hold, the
    checker's strict verdict) or their mean (partial credit)."""
    max_contexts: int | None = None
    """Image-and-question contexts read in one pass at most (None: all of a step's at once). Bounds the judge's
    memory, which grows with candidates x regions (``srum plan`` shows it); the scores do not change."""

    def __post_init__(self) -> None:
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ValueError(f"max_contexts: expected at least 1 (or none), got {self.max_contexts}")
        if self.method not in ("text", "expected", "both"):
            raise ValueError(f"method: expected text, expected or both, got {self.method!r}")
        if self.global_kind not in ("layout", "sample"):
            raise ValueError(f"global_kind: expected layout or sample, got {self.global_kind!r}")
        if self.readout not in ("instruction", "questions"):
            raise ValueError(f"readout: expected instruction or questions, got {self.readout!r}")
        if self.aggregate not in ("product", "mean"):
            raise ValueError(f"aggregate: expected product or mean, got {self.aggregate!r}")
        if self.readout == "questions" and self.method != "expected":
            raise ValueError(f"method: readout questions reads probabilities only; expected method expected, "
                             f"got {self.method!r}")


def expected_scores(logprobs: Tensor, values: Tensor) -> Tensor:
    """Expected score per row: candidates' log-probabilities (R, K) renormalised over the K candidates."""
    return (torch.softmax(logprobs.float(), dim=-1) * values).sum(-1)


def aggregate_yes(probabilities: Tensor, how: str) -> float:
    """One score in [-1, 1] from the P(yes) of a picture's questions: 2 * (product or mean) - 1."""
    joint = probabilities.double().prod() if how == "product" else probabilities.double().mean()
    return float(2 * joint - 1)


def _scale_box(region: Region, image_size: tuple[int, int], frame: tuple[int, int]) -> list[int]:
    """A box of an image (height, width) in another frame (height, width): the smallest integer box that covers
    it, inside the frame."""
    (height, width), (frame_height, frame_width) = image_size, frame
    x1, y1, x2, y2 = region.box
    sx, sy = frame_width / width, frame_height / height
    left, top = min(math.floor(x1 * sx), frame_width - 1), min(math.floor(y1 * sy), frame_height - 1)
    return [left, top, min(max(math.ceil(x2 * sx), left + 1), frame_width),
            min(max(math.ceil(y2 * sy), top + 1), frame_height)]


class SelfScorer:
    """Scores images with the same model that drew them."""

    def __init__(self, pipeline: Pipeline, proposer: RegionProposer, config: ScorerConfig | None = None,
                 instructions: ScoringInstructions = DEFAULT_INSTRUCTIONS, decomposer: Decomposer | None = None,
                 ) -> None:
        self.pipeline, self.proposer = pipeline, proposer
        self.config = config or ScorerConfig()
        if self.config.readout == "questions" and decomposer is None:
            raise ValueError("readout questions: expected a decomposer that splits prompts into questions, got none")
        self.decomposer = decomposer
        self.instructions = instructions
        self.candidates = score_candidates(self.config.score_step)
        self.candidate_values = torch.tensor([parse_number(c) for c in self.candidates])

    @property
    def settings(self) -> dict:
        """What decides a score besides the weights: recorded with every record (with the frame the image was
        seen at), so scores made another way are never mixed into one file."""
        return {**asdict(self.config), "instructions": self.instructions.version,
                "proposer": type(self.proposer).__name__, "max_regions": self.proposer.max_regions}

    def _global_instruction(self, prompt: str) -> str:
        if self.config.global_kind == "sample":
            return self.instructions.sample_instruction(prompt)
        return self.instructions.global_instruction(prompt)

    def expected(self, images: list[Tensor], questions: list[str]) -> list[float]:
        """Probability-weighted score of each image ((3, H, W) in [-1, 1]) under its instruction."""
        if not images:
            return []
        logprobs = self._option_logprobs(images, questions, [SCORE_PREFIX + c for c in self.candidates])  # (R, K)
        return expected_scores(logprobs, self.candidate_values.to(logprobs.device)).tolist()

    def _parts(self, count: int) -> list[slice]:
        """Consecutive slices of at most ``max_contexts`` contexts: one pass each."""
        size = self.config.max_contexts or max(count, 1)
        return [slice(start, start + size) for start in range(0, count, size)]

    def _option_logprobs(self, images: list[Tensor], questions: list[str], options: list[str]) -> Tensor:
        """(R, K) log-probabilities of the same K options after each image's question."""
        return torch.cat([torch.stack(self.pipeline.score(images[part], questions[part],
                                                           [options] * len(images[part])))
                          for part in self._parts(len(images))])

    def yes_probabilities(self, images: list[Tensor], questions: list[str]) -> Tensor:
        """P(yes) of each image's question, renormalised over yes and no, (N,)."""
        if not images:
            return torch.zeros(0)
        logprobs = self._option_logprobs(images, questions, list(YES_NO))
        return torch.softmax(logprobs.float(), dim=-1)[:, 0].cpu()

    def decomposed(self, images: list[Tensor], prompts: list[str]) -> tuple[list[float], list[str]]:
        """Each image's aggregated score over its prompt's atomic questions, and the questions with their P(yes)
        as text (recorded with the scores)."""
        asked = [(i, q) for i, questions in enumerate(self.decomposer.questions(prompts)) for q in questions]
        yes = self.yes_probabilities([images[i] for i, _ in asked], [q for _, q in asked])
        owner = torch.tensor([i for i, _ in asked])
        scores = [aggregate_yes(yes[owner == i], self.config.aggregate) for i in range(len(images))]
        texts = ["\n".join(f"{q} P(yes)={p:.3f}" for (j, q), p in zip(asked, yes.tolist(), strict=True) if j == i)
                 for i in range(len(images))]
        return scores, texts

    def region_decomposed(self, images: list[Tensor], prompts: list[str], boxes: list[list[int]],
                          frames: list[tuple[int, int]]) -> list[float]:
        """Each (image, box)'s score: 2 P - 1 of the best-answered question about the object in the box."""
        asked = [(r, q) for r, (prompt, box, frame) in enumerate(zip(prompts, boxes, frames, strict=True))
                 for q in self.decomposer.region_questions(prompt, box, frame[1], frame[0])]
        yes = self.yes_probabilities([images[r] for r, _ in asked], [q for _, q in asked])
        owner = torch.tensor([r for r, _ in asked])
        return [float(2 * yes[owner == r].max() - 1) for r in range(len(boxes))]

    def _answers(self, images: list[Tensor], questions: list[str], budget: int) -> list[str]:
        if not images:
            return []
        decoding = DecodingConfig(max_new_tokens=budget)
        return [answer for part in self._parts(len(images))
                for answer in self.pipeline.answer(images[part], questions[part], decoding, think=self.config.think)]

    @torch.no_grad()
    def score(self, images: list[Tensor], prompts: list[str], image_files: list[str],
              prompt_ids: list[str | None] | None = None) -> list[RewardRecord]:
        """Records for uint8 images (H, W, 3) drawn for ``prompts``."""
        config, prompt_ids = self.config, prompt_ids or [None] * len(images)
        pixels = [from_uint8_image(image) for image in images]
        proposals = self.proposer.propose_batch(images)
        frames = [self.pipeline.vit_frame(*image.shape[:2]) for image in images]
        seen_boxes = [[_scale_box(region, tuple(image.shape[:2]), frame) for region in regions]
                      for image, frame, regions in zip(images, frames, proposals, strict=True)]
        global_questions = [self._global_instruction(prompt) for prompt in prompts]

        text_global: list[float | None] = [None] * len(images)
        text_regions: list[dict[int, tuple[str, float]]] = [{} for _ in images]
        answers: list[dict[str, str]] = [{} for _ in images]
        clamped = [0] * len(images)  # written numbers outside [-1, 1], clamped by the parser
        if config.method in ("text", "both"):
            for index, raw in enumerate(self._answers(pixels, global_questions, config.max_new_tokens_global)):
                parsed_global = parse_score_answer(raw)
                text_global[index], clamped[index] = parsed_global.score, int(parsed_global.status == "clamped")
                answers[index]["global"] = raw
            with_regions = [i for i, boxes in enumerate(seen_boxes) if boxes]
            region_questions = [self.instructions.region_instruction(prompts[i], seen_boxes[i], frames[i][1],
                                                                     frames[i][0]) for i in with_regions]
            raws = self._answers([pixels[i] for i in with_regions], region_questions, config.max_new_tokens_regions)
            for index, raw in zip(with_regions, raws, strict=True):
                parsed = parse_region_answer(raw, range(1, len(seen_boxes[index]) + 1))
                text_regions[index] = {r.region_id: (r.object, r.score) for r in parsed.regions}
                clamped[index] += sum(r.clamped for r in parsed.regions)
                answers[index]["regions"] = raw

        expected_global: list[float | None] = [None] * len(images)
        expected_regions: list[list[float | None]] = [[None] * len(boxes) for boxes in seen_boxes]
        pairs = [(i, k) for i, boxes in enumerate(seen_boxes) for k in range(len(boxes))]
        if config.readout == "questions":
            expected_global, texts = self.decomposed(pixels, prompts)
            for index, text in enumerate(texts):
                answers[index]["questions"] = text
            values = self.region_decomposed([pixels[i] for i, _ in pairs], [prompts[i] for i, _ in pairs],
                                            [seen_boxes[i][k] for i, k in pairs], [frames[i] for i, _ in pairs])
            for (i, k), value in zip(pairs, values, strict=True):
                expected_regions[i][k] = value
        elif config.method in ("expected", "both"):
            expected_global = self.expected(pixels, global_questions)
            questions = [self.instructions.single_region_instruction(prompts[i], seen_boxes[i][k], frames[i][1],
                                                                     frames[i][0]) for i, k in pairs]
            for (i, k), value in zip(pairs, self.expected([pixels[i] for i, _ in pairs], questions), strict=True):
                expected_regions[i][k] = value

        records = []
        for index, (image, regions) in enumerate(zip(images, proposals, strict=True)):
            height, width = image.shape[:2]
            entries = []
            for k, region in enumerate(regions):
                label, text_score = text_regions[index].get(k + 1, ("", None))
                x1, y1, x2, y2 = region.box
                entries.append(RegionEntry((x1 / width, y1 / height, x2 / width, y2 / height), label,
                                           Scores(text=text_score, expected=expected_regions[index][k])))
            records.append(RewardRecord(
                image_file=image_files[index], good_image_file=image_files[index], prompt=prompts[index],
                width=width, height=height, global_scores=Scores(text_global[index], expected_global[index]),
                regions=tuple(entries), prompt_id=prompt_ids[index],
                scorer={**self.settings, "seen_frame": list(frames[index])},
                answers=answers[index], clamped=clamped[index]))
        return records
