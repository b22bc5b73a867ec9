"""Replacing a file whole, so that a reader or a crash sees the old file or the new one, never a part."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill ``.<name>.tmp`` beside ``path``, flush it to disk, then rename it over ``path``.

    The temporary name is fixed, so one left by a killed run is overwritten by the next write rather than left
    behind; it is flushed first so a record written after it never points to a file the disk has not got."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
