"""``srum generate``: images for a prompt file into a folder, one PNG and one JSONL record per image.

Safe to kill and re-run: every PNG is written to a temporary name and renamed, every record is one line written
after its PNG, a torn last line is dropped on restart, and images that already have a record are skipped. Each
image's noise comes from its own seed (derived from the run seed, the prompt id and the image index), so an
image does not depend on the batch size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from srum.generation.pipeline import Pipeline
from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig

log = logging.getLogger(__name__)
RECORDS = "records.jsonl"


@dataclass(frozen=True)
class ImageJob:
    prompt: Prompt
    index: int
    seed: int

    @property
    def image_file(self) -> str:
        return f"{self.prompt.prompt_id}_{self.index}.png"


def image_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """A per-image seed that depends only on the run seed, the prompt id and the image index."""
    digest = hashlib.sha256(f"{run_seed}/{prompt_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def read_records(path: Path) -> list[dict]:
    """Records of a previous run; a torn last line (a killed write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as file:
            file.truncate(len(data))
    records = []
    for number, line in enumerate(data.decode().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from None
    return records


def _save_png(pixels, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    Image.fromarray(pixels.numpy()).save(temporary, format="PNG")
    os.replace(temporary, path)


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def generate_to_folder(pipeline: Pipeline, prompts: list[Prompt], out: Path, sampler: SamplerConfig,
                       images_per_prompt: int = 1, seed: int = 42, batch_size: int = 4, height: int = 1024,
                       width: int = 1024, think: bool = False) -> int:
    """Generate what is missing in ``out``; returns the number of images written by this call."""
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / RECORDS
    done = {record["image_file"] for record in read_records(records_path) if (out / record["image_file"]).exists()}
    jobs = [ImageJob(prompt, index, image_seed(seed, prompt.prompt_id, index))
            for prompt in prompts for index in range(images_per_prompt)]
    todo = [job for job in jobs if job.image_file not in done]
    log.info("%d images to generate (%d already in %s)", len(todo), len(jobs) - len(todo), out)
    settings = {**asdict(sampler), "height": height, "width": width, "think": think}
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        result = pipeline.generate([job.prompt.text for job in batch], [job.seed for job in batch], sampler,
                                   height=height, width=width, think=think)
        for position, job in enumerate(batch):
            _save_png(result.images[position], out / job.image_file)
            record = {"prompt_id": job.prompt.prompt_id, "category": job.prompt.category, "prompt": job.prompt.text,
                      "image_index": job.index, "seed": job.seed, "image_file": job.image_file,
                      "settings": settings}
            if think:
                record["plan"] = result.plans[position]
            _append(records_path, record)
        log.info("%d / %d", min(start + batch_size, len(todo)), len(todo))
    return len(todo)
