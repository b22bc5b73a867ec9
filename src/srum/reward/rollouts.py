"""``srum score``: self-score every image a ``srum generate`` run wrote, into a reward-record file.

Resumable: images already in the output are skipped; each record is appended with one synced write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srum.generation.writer import generated_records, pending_images
from srum.io.jsonl import repair_torn_tail
from srum.io.lock import exclusive
from srum.reward.records import RewardRecord, append_record, load_records
from srum.reward.scorer import SelfScorer

log = logging.getLogger(__name__)


def read_image(path: Path) -> torch.Tensor:
    """An image file as uint8 (H, W, 3); a file that is not a whole image is a one-line error naming it."""
    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these for truncated or foreign files
        raise ValueError(f"{path}: expected a readable image file, got one that cannot be decoded ({error})") from None


@dataclass
class ScoreSummary:
    """What one ``srum score`` call wrote, and what in it is not a plain score."""

    written: int = 0
    missing: int = 0
    """Scores of the computed kinds that the scorer could not read (unparsed answers, regions left out)."""
    clamped: int = 0
    """Written scores outside [-1, 1], clamped."""

    def add(self, record: RewardRecord, kinds: tuple[str, ...]) -> None:
        scores = [record.global_scores, *(region.scores for region in record.regions)]
        self.written += 1
        self.missing += sum(s.get(kind) is None for s in scores for kind in kinds)
        self.clamped += record.clamped

    def __str__(self) -> str:
        return (f"{self.written} reward records ({self.missing} scores unparsed or missing, {self.clamped} "
                f"clamped to [-1, 1])")


def score_rollouts(scorer: SelfScorer, rollouts: Path, out: Path, batch_size: int = 4,
                   made_by: dict | None = None) -> ScoreSummary:
    """Score what is missing in ``out``; returns what this call wrote. ``made_by`` (such as the checkpoint) is
    recorded in each record's ``scorer`` with the scorer's settings; records already in ``out`` must carry the
    same, or nothing is written."""
    if batch_size < 1:
        raise ValueError(f"--batch_size: expected a positive number, got {batch_size}")
    if out.is_dir():
        raise ValueError(f"{out}: --out: expected a reward-record file, got a folder")
    generated_records(rollouts)  # refused before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _score_missing(scorer, rollouts, out, batch_size, {**scorer.settings, **(made_by or {})})


def _check_settings(out: Path, records: list[RewardRecord], settings: dict) -> None:
    for number, record in enumerate(records, 1):
        recorded = {key: value for key, value in record.scorer.items() if key != "seen_frame"}
        if recorded != settings:
            changed = sorted(key for key in recorded.keys() | settings.keys()
                             if recorded.get(key) != settings.get(key))
            raise ValueError(f"{out}: record {number} ({record.image_file}): scorer: expected the settings of this "
                             f"run, got other {', '.join(changed)}; use another --out")


def _score_missing(scorer: SelfScorer, rollouts: Path, out: Path, batch_size: int, settings: dict) -> ScoreSummary:
    repair_torn_tail(out)
    existing = load_records(out).records if out.exists() else []  # an unreadable line is an error, not skipped
    _check_settings(out, existing, settings)
    done = {r.image_file for r in existing}
    todo = pending_images(rollouts, done)
    log.info("%d images to score (%d already in %s)", len(todo), len(done), out)
    summary = ScoreSummary()
    method = scorer.config.method
    kinds = ("text", "expected") if method == "both" else (method,)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = [read_image(rollouts / record["image_file"]) for record in batch]
        records = scorer.score(images, [r["prompt"] for r in batch], [r["image_file"] for r in batch],
                               [r.get("prompt_id") for r in batch])
        for record in records:
            append_record(out, replace(record, scorer={**record.scorer, **settings}))
            summary.add(record, kinds)
        log.info("%d / %d", min(start + batch_size, len(todo)), len(todo))
    return summary


def read_record_image(folder: Path, record: RewardRecord) -> torch.Tensor:
    """A record's image, refused unless it lies inside ``folder`` and has the size the record's map was made for
    (a map painted for another size would be trained against the wrong pixels)."""
    path = (folder / record.image_file).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{record.image_file}: image_file: expected a path inside {folder}, got one outside it")
    image = read_image(path)
    if tuple(image.shape[:2]) != (record.height, record.width):
        raise ValueError(f"{path}: expected {record.width}x{record.height} pixels as its record says, got "
                         f"{image.shape[1]}x{image.shape[0]}")
    return image
