"""One writer per resumable output: a second srum run on the same output would record every item twice."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an advisory lock on ``path`` for the block: an output folder, or an append-only output file (created
    empty if absent). Refuses at once if another process holds it. The lock lives on the output itself, so nothing
    is left beside it, and it goes with the process, so a killed run leaves nothing to clean up."""
    flags = os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT | os.O_APPEND
    descriptor = os.open(path, flags, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{path}: another srum run is writing it; wait for that run to end, or write "
                             f"elsewhere") from None
        yield
    finally:
        os.close(descriptor)
