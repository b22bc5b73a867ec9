"""JSONL files that survive being killed: one record per line, each append a single flushed and synced write,
a torn last line cut off before a resumed run appends again, rewrites (and whole JSON files) through a temporary
file. Reading never changes a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from srum.io.atomic import atomic_write


def read_jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line, a last line without a final newline included: the file may be
    a user's, so it is read as it is and never changed (see ``repair_torn_tail``)."""
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8").split("\n")
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def repair_torn_tail(path: Path) -> None:
    """Cut a torn last line (a write killed mid-record) off srum's own resumable output before resuming appends to
    it: the next record would be glued onto it. Never for a user's file, whose last line may just lack a newline."""
    if not path.exists():
        return
    with path.open("r+b") as file:
        data = file.read()
        if data and not data.endswith(b"\n"):
            file.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: Path) -> list[Any]:
    """Every record; a line that is not JSON raises a ValueError naming the file and the line."""
    records = []
    for number, line in read_jsonl_lines(path):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from None
    return records


def append_jsonl(path: Path, record: Any) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def replace_text(path: Path, text: str) -> None:
    """Replace a text file whole (see ``atomic_write``)."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def rewrite_jsonl(path: Path, records: list[Any]) -> None:
    replace_text(path, "".join(json.dumps(record) + "\n" for record in records))


def write_json(path: Path, data: Any) -> None:
    """One JSON document, indented, written whole or not at all."""
    replace_text(path, json.dumps(data, indent=2) + "\n")


def check_settings(path: Path, records: list[dict], settings: dict, what: str,
                   remedy: str = "use another --out") -> None:
    """A resumable record file holds the results of one set of settings: refuse to add results made otherwise.

    ``settings`` must be as a record stores them (through JSON: tuples become lists); ``remedy`` tells the user
    what to do instead."""
    for record in records:
        if record.get("settings") != settings:
            changed = sorted(k for k in settings.keys() | record.get("settings", {}).keys()
                             if settings.get(k) != record.get("settings", {}).get(k))
            raise ValueError(f"{path}: holds {what} made with other settings ({', '.join(changed)}); {remedy}")
