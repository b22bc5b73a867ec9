"""The FSDP2 strategy of srum's configs: Lightning's ``ModelParallelStrategy`` with sharded checkpoints that take
their final name only once every rank has written its shards. A save cut short by a rank's death stays under
``<name>.partial``, so "resume from the latest checkpoint" never picks a torn one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

PARTIAL_SUFFIX = ".partial"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class ShardedCheckpointStrategy(ModelParallelStrategy):
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        final = Path(self.broadcast(filepath))
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.global_rank == 0:
            _remove(partial)  # left by a run that died while saving
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every rank's shards are on disk
        if self.global_rank == 0:
            _remove(final)
            partial.rename(final)
        self.barrier()
