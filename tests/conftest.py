"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU (set before they are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

_REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared reference folder: ``$SRUM_SHARED``, else ``shared`` next to the repository root."""
    path = Path(os.environ.get("SRUM_SHARED", _REPO_ROOT.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared reference folder {path} not found (set SRUM_SHARED to its location)")
    return path


@pytest.fixture(autouse=True)
def _restore_dtype_and_seed():
    """Each test starts seeded and may change the default dtype without leaking it into the next one."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
