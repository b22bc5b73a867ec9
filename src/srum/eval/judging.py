"""Judging a folder of generated images into a judgement file, resumably: images already judged are skipped,
each judgement is appended with one synced write, and a file keeps the answers of one judge only.

A judgement whose answer cannot be read is re-asked (srum-method.md §11 item 26): the official scripts retry with
the same greedy decoding, which reproduces the failure, so srum samples instead, at ``retry_temperature`` with a
seed drawn from the image and the attempt. The new judgement is appended and supersedes the old one, so nothing
written is ever rewritten and an interrupted re-ask resumes too.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

from srum.eval.judges import Judge
from srum.eval.rubric import JUDGE_INSTRUCTION, official_score, parse_verdict
from srum.generation.writer import pending_images, read_image_records
from srum.io.jsonl import append_jsonl, check_settings, repair_torn_tail
from srum.io.lock import exclusive
from srum.reward.rollouts import read_image

log = logging.getLogger(__name__)


def retry_seed(image_file: str, attempt: int) -> int:
    """The sampling seed of an image's ``attempt``-th re-ask (stable across runs and machines)."""
    return zlib.crc32(f"{image_file}/{attempt}".encode())


def check_retries(retries: int, temperature: float) -> None:
    """Refuse a re-ask policy that cannot run, before any image is made or judged."""
    if retries < 0:
        raise ValueError(f"judge_retries: expected a whole number >= 0, got {retries}")
    if temperature <= 0:
        raise ValueError(f"retry_temperature: expected a positive number, got {temperature}")


def latest_judgements(judgements: list[dict]) -> list[dict]:
    """One judgement per image, the last one written (a re-ask supersedes), in first-judged order."""
    return list({judgement["image_file"]: judgement for judgement in judgements}.values())


def judge_folder(judge: Judge, images: Path, out: Path, batch_size: int = 1, retries: int = 0,
                 retry_temperature: float = 0.7) -> list[dict]:
    """Judge the images of a ``srum generate`` folder that ``out`` lacks, then re-ask each failed judgement up to
    ``retries`` times; returns the current judgement of every image in ``out``.

    A judgement keeps the answer read (``raw``), srum's reading of it (``score``, None on failure, with its
    ``status``), the earlier answers that failed (``failed_answers``), and the official script's reading of the
    first, greedy answer (``official_score``, -1 on failure), which is what the official protocol reports."""
    check_retries(retries, retry_temperature)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _judge_missing(judge, images, out, batch_size, retries, retry_temperature)


def _judge_missing(judge: Judge, images: Path, out: Path, batch_size: int, retries: int,
                   retry_temperature: float) -> list[dict]:
    settings = json.loads(json.dumps(judge.settings))  # as a record stores them
    repair_torn_tail(out)
    judgements = read_image_records(out)
    check_settings(out, judgements, settings, "judgements",  # the images stay valid: only the judging restarts
                   f"move {out.name} away to judge the images again")
    todo = pending_images(images, {judgement["image_file"] for judgement in judgements})
    log.info("%d images to judge (%d already in %s)", len(todo), len(latest_judgements(judgements)), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for start, batch in enumerate(_batches(todo, batch_size)):
        for record, raw in zip(batch, _ask(judge, images, batch), strict=True):
            judgements.append(_write(out, _judgement(record, raw, official_score(raw), [], settings)))
        log.info("%d / %d", min((start + 1) * batch_size, len(todo)), len(todo))
    for attempt in range(1, retries + 1):
        failed = [j for j in latest_judgements(judgements)
                  if j["score"] is None and len(j.get("failed_answers", [])) < attempt]
        for old in failed:  # one image per call: each re-ask has its own seed
            [raw] = _ask(judge, images, [old], retry_temperature, retry_seed(old["image_file"], attempt))
            earlier = [*old.get("failed_answers", []), old["raw"]]
            judgements.append(_write(out, _judgement(old, raw, old["official_score"], earlier, settings)))
        if failed:
            log.info("re-ask %d: %d failed judgements asked again", attempt, len(failed))
    return latest_judgements(judgements)


def _batches(records: list[dict], size: int) -> list[list[dict]]:
    return [records[start:start + size] for start in range(0, len(records), size)]


def _ask(judge: Judge, images: Path, batch: list[dict], temperature: float = 0.0, seed: int = 0) -> list[str]:
    return judge.answer([read_image(images / record["image_file"]) for record in batch],
                        [JUDGE_INSTRUCTION.format(prompt=record["prompt"]) for record in batch], temperature, seed)


def _judgement(record: dict, raw: str, official: int, failed_answers: list[str], settings: dict) -> dict:
    verdict = parse_verdict(raw)
    return {"image_file": record["image_file"], "prompt_id": record.get("prompt_id"),
            "category": record.get("category"), "prompt": record["prompt"], "score": verdict.score,
            "status": verdict.status, "official_score": official, "explanation": verdict.explanation, "raw": raw,
            "failed_answers": failed_answers, "settings": settings}


def _write(out: Path, judgement: dict) -> dict:
    append_jsonl(out, judgement)
    return judgement
