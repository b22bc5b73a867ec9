"""``srum score``: self-score every image a ``srum generate`` run wrote, into a reward-record file.

Resumable: images already in the output are skipped; each record is appended with one synced write.
"""

from __future__ import annotations

import logging
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
    """An image file as uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())


def score_rollouts(scorer: SelfScorer, rollouts: Path, out: Path, batch_size: int = 4) -> int:
    """Score what is missing in ``out``; returns the number of records written by this call."""
    generated_records(rollouts)  # refused before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _score_missing(scorer, rollouts, out, batch_size)


def _score_missing(scorer: SelfScorer, rollouts: Path, out: Path, batch_size: int) -> int:
    repair_torn_tail(out)
    done = {r.image_file for r in load_records(out, strict=False).records} if out.exists() else set()
    todo = pending_images(rollouts, done)
    log.info("%d images to score (%d already in %s)", len(todo), len(done), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        images = [read_image(rollouts / record["image_file"]) for record in batch]
        records = scorer.score(images, [r["prompt"] for r in batch], [r["image_file"] for r in batch],
                               [r.get("prompt_id") for r in batch])
        for record in records:
            append_record(out, record)
        log.info("%d / %d", min(start + batch_size, len(todo)), len(todo))
    return len(todo)


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
