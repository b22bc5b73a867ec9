"""Where a checkpoint folder is: a path, or ``srum:<name>`` for one shipped inside the package. Kept apart
from ``srum.model.checkpoint`` (which builds models) so light modules such as the tokenizer can resolve names."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


class CheckpointError(ValueError):
    """A folder or file that is not a valid checkpoint; the message names the file and what was expected."""


SHIPPED_PREFIX = "srum:"
SHIPPED = {"shapeworld-base": ("srum.shapeworld", "base")}
"""Checkpoints inside the package, by name: (package, folder)."""


def checkpoint_folder(folder: str | Path) -> Path:
    """A checkpoint folder path, or ``srum:<name>`` for one shipped in the package (``srum:shapeworld-base``)."""
    text = str(folder)
    if not text.startswith(SHIPPED_PREFIX):
        return Path(folder)
    name = text[len(SHIPPED_PREFIX):]
    if name not in SHIPPED:
        raise CheckpointError(f"{text}: no such shipped checkpoint; expected one of "
                              f"{', '.join(SHIPPED_PREFIX + n for n in SHIPPED)}")
    package, path = SHIPPED[name]
    return Path(str(files(package) / path))


def checkpoint_identity(folder: str | Path) -> str:
    """What records and reports name a checkpoint by: its resolved folder (shipped ones included)."""
    return str(checkpoint_folder(folder).resolve())
