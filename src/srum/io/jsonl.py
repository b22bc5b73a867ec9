"""JSONL files that survive being killed: one record per line, each append a single flushed and synced write,
a torn last line cut off on the next read, rewrites through a temporary file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every complete line; a torn last line (a killed write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with path.open("r+b") as file:
            file.truncate(len(data))
    return [(number, line) for number, line in enumerate(data.decode("utf-8").split("\n")[:-1], start=1)
            if line.strip()]


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


def rewrite_jsonl(path: Path, records: list[Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        file.write("".join(json.dumps(record) + "\n" for record in records))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
