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
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from srum.generation.pipeline import Pipeline
from srum.generation.prompts import Prompt
from srum.generation.sampler import SamplerConfig
from srum.generation.text import DecodingConfig

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
    with temporary.open("wb") as file:
        Image.fromarray(pixels.numpy()).save(file, format="PNG")
        file.flush()
        os.fsync(file.fileno())  # on disk before the record that points to it
    os.replace(temporary, path)


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def _rewrite(path: Path, records: list[dict]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    os.replace(temporary, path)


def generate_to_folder(pipeline: Pipeline, prompts: list[Prompt], out: Path, sampler: SamplerConfig,
                       images_per_prompt: int = 1, seed: int = 42, batch_size: int = 4, height: int = 1024,
                       width: int = 1024, think: bool = False, max_think_tokens: int = 1000) -> int:
    """Generate what is missing in ``out``; returns the number of images written by this call."""
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / RECORDS
    records = read_records(records_path)
    missing = [f"line {n}" for n, r in enumerate(records, 1) if not isinstance(r, dict) or "image_file" not in r]
    if missing:
        raise ValueError(f"{records_path}: {missing[0]}: expected a record with an image_file")
    kept = [record for record in records if (out / record["image_file"]).exists()]
    if len(kept) < len(records):  # images deleted since: drop their records too, or the re-made ones would repeat
        _rewrite(records_path, kept)
    done = {record["image_file"] for record in kept}
    jobs = [ImageJob(prompt, index, image_seed(seed, prompt.prompt_id, index))
            for prompt in prompts for index in range(images_per_prompt)]
    todo = [job for job in jobs if job.image_file not in done]
    log.info("%d images to generate (%d already in %s)", len(todo), len(jobs) - len(todo), out)
    settings = {**asdict(sampler), "height": height, "width": width, "think": think, "run_seed": seed}
    decoding = None
    if think:
        decoding = DecodingConfig(max_new_tokens=max_think_tokens)
        settings["max_think_tokens"] = max_think_tokens
    settings = json.loads(json.dumps(settings))  # as a record stores them (tuples become lists)
    for record in kept:
        if record.get("settings") != settings:
            changed = sorted(k for k in settings.keys() | record.get("settings", {}).keys()
                             if settings.get(k) != record.get("settings", {}).get(k))
            raise ValueError(f"{records_path}: holds images made with other settings ({', '.join(changed)}); "
                             "use another --out")
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
            _append(records_path, record)
        log.info("%d / %d", min(start + batch_size, len(todo)), len(todo))
    return len(todo)
