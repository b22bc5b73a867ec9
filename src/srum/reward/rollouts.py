"""``srum score``: self-score every image a ``srum generate`` run wrote, into a reward-record file.

Resumable: images already in the output are skipped; each record is appended with one synced write.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from srum.generation.writer import pending_images
from srum.io.jsonl import repair_torn_tail
from srum.reward.records import append_record, load_records
from srum.reward.scorer import SelfScorer

log = logging.getLogger(__name__)


def read_image(path: Path) -> torch.Tensor:
    """An image file as uint8 (H, W, 3)."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())


def score_rollouts(scorer: SelfScorer, rollouts: Path, out: Path, batch_size: int = 4) -> int:
    """Score what is missing in ``out``; returns the number of records written by this call."""
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
