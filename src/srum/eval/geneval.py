"""GenEval's files: the prompt metadata (``evaluation_metadata.jsonl``: one object a line with ``prompt``, ``tag``,
``include`` and an optional ``exclude``) and the folder layout its evaluator reads (``<index>/metadata.jsonl``
and ``<index>/samples/<n>.png``, index zero-padded to 5 digits, n to 5). Errors name the file, the line and the
field."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from srum.generation.prompts import Prompt
from srum.generation.writer import RECORDS, read_image_records
from srum.io.jsonl import read_jsonl_lines, rewrite_jsonl


@dataclass(frozen=True)
class GenEvalPrompt:
    prompt_id: str
    """The line's index (from 0), zero-padded to 5 digits: GenEval's folder name for the prompt."""
    text: str
    tag: str
    """The task: single_object, two_object, counting, colors, position or color_attr."""
    include: tuple[dict, ...]
    """What the image must show: ``{class, count}`` plus an optional ``color`` and ``position``."""
    metadata: dict
    """The whole line as read, which the evaluator reads back from the layout."""

    def as_prompt(self) -> Prompt:
        return Prompt(self.prompt_id, self.text, self.tag)


def _check_clauses(where: str, field: str, value: object, required: bool) -> tuple[dict, ...]:
    if not isinstance(value, list) or (required and not value):
        raise ValueError(f"{where}: {field}: expected a {'non-empty ' if required else ''}list of "
                         f"{{class, count}} objects, got {value!r}")
    for index, clause in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
            raise ValueError(f"{where}: {name}.class: expected a string, got {clause!r}")
        count = clause.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: {name}.count: expected a positive integer, got {count!r}")
    return tuple(value)


def read_geneval(path: Path) -> list[GenEvalPrompt]:
    """The prompts of a GenEval metadata file, in file order."""
    try:
        lines = read_jsonl_lines(Path(path))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the GenEval metadata ({error})") from None
    prompts = []
    for index, (number, line) in enumerate(lines):
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with prompt, tag and include, got {entry!r}")
        for field in ("prompt", "tag"):
            if not isinstance(entry.get(field), str) or not entry[field].strip():
                raise ValueError(f"{where}: {field}: expected a non-empty string, got {entry.get(field)!r}")
        include = _check_clauses(where, "include", entry.get("include"), required=True)
        if "exclude" in entry:
            _check_clauses(where, "exclude", entry["exclude"], required=False)
        prompts.append(GenEvalPrompt(f"{index:05d}", entry["prompt"], entry["tag"], include, entry))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _link(source: Path, target: Path) -> None:
    """A hard link (no second copy of the image), or a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_layout(images: Path, prompts: list[GenEvalPrompt], out: Path) -> int:
    """Lay the images of a ``srum generate`` folder out as GenEval's evaluator reads them; returns the number of
    images added (the ones already there are kept)."""
    by_id = {prompt.prompt_id: prompt for prompt in prompts}
    added = 0
    for record in read_image_records(images / RECORDS):
        prompt = by_id.get(record.get("prompt_id"))
        if prompt is None:
            raise ValueError(f"{images / RECORDS}: image {record['image_file']} has prompt id "
                             f"{record.get('prompt_id')!r}, which is not in the GenEval metadata")
        folder = out / prompt.prompt_id
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        if not (folder / "metadata.jsonl").exists():
            rewrite_jsonl(folder / "metadata.jsonl", [prompt.metadata])
        target = folder / "samples" / f"{record['image_index']:05d}.png"
        if not target.exists():
            _link(images / record["image_file"], target)
            added += 1
    return added
