"""Atomic file replacement: a failed write leaves the old file whole and no temporary behind."""

from __future__ import annotations

import pytest

from srum.io.atomic import atomic_write


def test_a_failed_write_keeps_the_old_file_and_a_leftover_temporary_is_reused(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def torn(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, torn)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]

    (tmp_path / ".report.json.tmp").write_text("left by a killed run")
    atomic_write(path, lambda temporary: temporary.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
