"""Prompt files: T2I-CompBench JSON (a list of ``{Question, Category, Question_id}``) and plain text (one prompt
a line). Errors name the file and the line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    category: str | None = None


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _json_entries(path: Path, text: str) -> list[tuple[int, object]]:
    """The elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    index = len(text) - len(text.lstrip())
    if not text[index:index + 1] == "[":
        raise ValueError(f"{path}:{_line(text, index)}: expected a JSON list of prompt objects")
    index += 1
    entries = []
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise ValueError(f"{path}:{_line(text, index)}: the JSON list is not closed")
        if text[index] == "]":
            return entries
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        entries.append((_line(text, index), value))
        index = end


def _compbench(path: Path, text: str) -> list[Prompt]:
    prompts = []
    first_line: dict[str, int] = {}
    for line, entry in _json_entries(path, text):
        if not isinstance(entry, dict) or not isinstance(entry.get("Question"), str) or "Question_id" not in entry:
            raise ValueError(f"{path}:{line}: expected an object with a string Question and a Question_id")
        prompt_id = str(entry["Question_id"])
        question_id = entry["Question_id"]
        if isinstance(question_id, bool) or not isinstance(question_id, (int, str)) or not SAFE_ID.fullmatch(prompt_id):
            raise ValueError(f"{path}:{line}: Question_id: expected an integer or a name of letters, digits, "
                             f"'_', '.', '-' (it names the image files), got {entry['Question_id']!r}")
        if prompt_id in first_line:
            raise ValueError(f"{path}:{line}: Question_id {prompt_id} appears more than once (first on line "
                             f"{first_line[prompt_id]})")
        first_line[prompt_id] = line
        category = None if entry.get("Category") is None else str(entry["Category"])
        prompts.append(Prompt(prompt_id, entry["Question"], category))
    return prompts


def _plain(path: Path, text: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.rstrip("\n").split("\n"), start=1):
        if not line.strip():
            raise ValueError(f"{path}:{number}: empty line (expected one prompt a line)")
        prompts.append(Prompt(str(number), line.strip()))
    return prompts


SHAPEWORLD_SOURCE = "shapeworld:"


def _shapeworld(source: str) -> list[Prompt]:
    """``shapeworld:<split>:<count>[:<seed>]``: prompts drawn by ShapeWorld instead of read from a file."""
    from srum.shapeworld.world import prompts

    fields = source[len(SHAPEWORLD_SOURCE):].split(":")
    if len(fields) not in (2, 3) or fields[0] not in ("train", "val", "test") or not all(
            f.isdigit() for f in fields[1:]) or int(fields[1]) < 1:
        raise ValueError(f"prompts {source!r}: expected shapeworld:<train|val|test>:<count>[:<seed>]")
    drawn = prompts(fields[0], int(fields[1]), int(fields[2]) if len(fields) == 3 else 0)
    return [Prompt(p.prompt_id, p.text, p.category) for p in drawn]


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a ``.json`` (T2I-CompBench) or any other (plain text) file, ids unique; or ShapeWorld's
    (``shapeworld:<split>:<count>[:<seed>]``)."""
    if str(path).startswith(SHAPEWORLD_SOURCE):
        return _shapeworld(str(path))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the prompt file ({error})") from None
    prompts = _compbench(path, text) if path.suffix.lower() == ".json" else _plain(path, text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
