"""``srum generate``: images for a prompt file into a folder, one PNG and one JSONL record per image.

Safe to kill and re-run: every PNG is written to a temporary name and renamed, every record is one line written
after its PNG, a torn last line is dropped on restart, images that already have a record are skipped and a record
whose image was deleted is dropped (the image is made again). A folder keeps one set of settings: re-running into
it with other settings is refused. Each image's noise comes from its own seed (derived from the run seed, the
prompt id and the image index), so an image does not depend on the batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from srum.generation.pipeline import Pipeline
from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig
from srum.generation.text import DecodingConfig
from srum.io.atomic import atomic_write
from srum.io.jsonl import append_jsonl, check_settings, read_jsonl, repair_torn_tail, rewrite_jsonl
from srum.io.lock import exclusive

log = logging.getLogger(__name__)
RECORDS = "records.jsonl"


@dataclass(frozen=True)
class ImageJob:
    prompt: Prompt
    index: int
    seed: int

    @property
    def image_file(self) -> str:
        return image_file(self.prompt.prompt_id, self.index)


def image_file(prompt_id: str, index: int) -> str:
    """The file name of a prompt's ``index``-th image."""
    return f"{prompt_id}_{index}.png"


def image_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """A per-image seed that depends only on the run seed, the prompt id and the image index."""
    digest = hashlib.sha256(f"{run_seed}/{prompt_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _save_png(pixels, path: Path) -> None:
    atomic_write(path, lambda temporary: Image.fromarray(pixels.numpy()).save(temporary, format="PNG"))


def read_image_records(path: Path) -> list[dict]:
    """The records of a file with one record per image (images made, judgements); a record without an
    ``image_file`` raises a ValueError naming the file and the line."""
    records = read_jsonl(path)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("image_file"), str):
            raise ValueError(f"{path}:{number}: expected a record with an image_file")
    return records


def generate_to_folder(pipeline: Pipeline, prompts: list[Prompt], out: Path, sampler: SamplerConfig,
                       images_per_prompt: int = 1, seed: int = 42, batch_size: int = 4, height: int = 1024,
                       width: int = 1024, think: bool = False, max_think_tokens: int = 1000,
                       extra_settings: dict | None = None) -> int:
    """Generate what is missing in ``out``; returns the number of images written by this call.

    ``extra_settings`` (such as the checkpoint) are recorded and locked with the sampler settings."""
    for name, value in (("batch_size", batch_size), ("images_per_prompt", images_per_prompt), ("height", height),
                        ("width", width)):
        if value < 1:
            raise ValueError(f"--{name}: expected a positive number, got {value}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: --out: expected an output folder, got an existing file")
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        return _generate_missing(pipeline, prompts, out, sampler, images_per_prompt, seed, batch_size, height, width,
                                 think, max_think_tokens, extra_settings)


def _generate_missing(pipeline: Pipeline, prompts: list[Prompt], out: Path, sampler: SamplerConfig,
                      images_per_prompt: int, seed: int, batch_size: int, height: int, width: int, think: bool,
                      max_think_tokens: int, extra_settings: dict | None) -> int:
    records_path = out / RECORDS
    repair_torn_tail(records_path)
    records = read_image_records(records_path)
    kept = [record for record in records if (out / record["image_file"]).exists()]
    if len(kept) < len(records):  # images deleted since: drop their records too, or the re-made ones would repeat
        rewrite_jsonl(records_path, kept)
    done = {record["image_file"]: record["prompt"] for record in kept}
    jobs = [ImageJob(prompt, index, image_seed(seed, prompt.prompt_id, index))
            for prompt in prompts for index in range(images_per_prompt)]
    for job in jobs:  # a prompt id reused for other text would otherwise keep the old text's image
        if done.get(job.image_file, job.prompt.text) != job.prompt.text:
            raise ValueError(f"{records_path}: prompt_id {job.prompt.prompt_id}: expected the text "
                             f"{done[job.image_file]!r} its images were made for, got {job.prompt.text!r}; "
                             f"use another --out")
    todo = [job for job in jobs if job.image_file not in done]
    log.info("%d images to generate (%d already in %s)", len(todo), len(jobs) - len(todo), out)
    settings = {**asdict(sampler), "height": height, "width": width, "think": think, "run_seed": seed,
                **(extra_settings or {})}
    decoding = None
    if think:
        decoding = DecodingConfig(max_new_tokens=max_think_tokens)
        settings["max_think_tokens"] = max_think_tokens
    settings = json.loads(json.dumps(settings))  # as a record stores them (tuples become lists)
    check_settings(records_path, kept, settings, "images")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        result = pipeline.generate([job.prompt.text for job in batch], [job.seed for job in batch], sampler,
                                   height=height, width=width, think=think, decoding=decoding)
        for position, job in enumerate(batch):
            _save_png(result.images[position], out / job.image_file)
            record = {"prompt_id": job.prompt.prompt_id, "category": job.prompt.category, "prompt": job.prompt.text,
                      "image_index": job.index, "seed": job.seed, "image_file": job.image_file,
                      "settings": settings}
            if think:
                record["plan"] = result.plans[position]
            append_jsonl(records_path, record)
        log.info("%d / %d", min(start + batch_size, len(todo)), len(todo))
    return len(todo)


def generated_records(folder: Path) -> Path:
    """The records file of a folder that ``srum generate`` wrote (a later stage reads it, never writes it)."""
    path = folder / RECORDS
    if not path.is_file():
        raise ValueError(f"{folder}: expected a folder written by srum generate (with {RECORDS}), found none")
    return path


def pending_images(folder: Path, done: set[str]) -> list[dict]:
    """The records of ``folder``'s images whose file name is not in ``done``, in order, for a later stage (scoring,
    judging) to resume; an image deleted since it was made is skipped with a warning."""
    records_path = generated_records(folder)
    todo = []
    for number, record in enumerate(read_image_records(records_path), start=1):
        if record["image_file"] in done:
            continue
        if not (folder / record["image_file"]).is_file():
            log.warning("%s:%d: image %s is missing; skipped", records_path, number, record["image_file"])
            continue
        todo.append(record)
    return todo
