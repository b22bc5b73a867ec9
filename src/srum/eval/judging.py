"""Judging a folder of generated images into a judgement file, resumably: images already judged are skipped,
each judgement is appended with one synced write, and a file keeps the answers of one judge only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from srum.eval.judges import Judge
from srum.eval.rubric import JUDGE_INSTRUCTION, official_score, parse_verdict
from srum.generation.writer import pending_images, read_image_records
from srum.io.jsonl import append_jsonl, check_settings
from srum.reward.rollouts import read_image

log = logging.getLogger(__name__)


def judge_folder(judge: Judge, images: Path, out: Path, batch_size: int = 1) -> list[dict]:
    """Judge the images of a ``srum generate`` folder that ``out`` lacks; returns every judgement in ``out``.

    A judgement keeps the raw answer and both readings of it: ``score`` (srum's, None on failure, with its
    ``status``) and ``official_score`` (the official script's, -1 on failure)."""
    settings = json.loads(json.dumps(judge.settings))  # as a record stores them
    judgements = read_image_records(out)
    check_settings(out, judgements, settings, "judgements")
    todo = pending_images(images, {judgement["image_file"] for judgement in judgements})
    log.info("%d images to judge (%d already in %s)", len(todo), len(judgements), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        answers = judge.answer([read_image(images / record["image_file"]) for record in batch],
                               [JUDGE_INSTRUCTION.format(prompt=record["prompt"]) for record in batch])
        for record, raw in zip(batch, answers, strict=True):
            verdict = parse_verdict(raw)
            judgement = {"image_file": record["image_file"], "prompt_id": record.get("prompt_id"),
                         "category": record.get("category"), "prompt": record["prompt"], "score": verdict.score,
                         "status": verdict.status, "official_score": official_score(raw),
                         "explanation": verdict.explanation, "raw": raw, "settings": settings}
            append_jsonl(out, judgement)
            judgements.append(judgement)
        log.info("%d / %d", min(start + batch_size, len(todo)), len(todo))
    return judgements
