"""Training data: prompt files (online mode) and reward-record files with their images (offline mode).

Batches come from ``ScheduledBatches``: a seeded permutation per epoch, split over ranks, whose position is
saved in Lightning checkpoints, so a resumed run continues with exactly the batch the interrupted one would
have drawn next.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from srum.generation.prompts import read_prompts
from srum.reward.records import load_records


class ScheduledBatches:
    """Endless batches of ``items`` for one rank: epoch e is the permutation seeded by (seed, e), cut into
    global batches of ``batch_size * world_size`` items of which this rank takes its slice (a remainder that
    does not fill a global batch waits for the next epoch's permutation)."""

    def __init__(self, items: Sequence[Any], batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if len(items) < batch_size * world_size:
            raise ValueError(f"data: expected at least batch_size x world_size = {batch_size * world_size} items, "
                             f"got {len(items)}")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_epoch = len(items) // (batch_size * world_size)
        self.position = 0

    def batch(self, index: int) -> list[Any]:
        epoch, step = divmod(index, self.per_epoch)
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        start = (step * self.world_size + self.rank) * self.batch_size
        return [self.items[i] for i in order[start:start + self.batch_size].tolist()]

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self) -> Iterator[tuple[int, list[Any]]]:
        """Yields (batch index, items); the index seeds everything random about that batch's step."""
        while True:
            index = self.position
            self.position += 1
            yield index, self.batch(index)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class FixedBatches:
    """A fixed list of batches as one loader (Lightning would take a plain list for several loaders)."""

    def __init__(self, batches: list[list[Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)


class SRUMDataModule(L.LightningDataModule):
    """Prompts for online training, or reward records (plus the folder of their images) for offline training.

    Args:
        prompts: T2I-CompBench JSON or plain-text prompt file (online mode).
        records: reward-record JSONL, official or srum format (offline mode).
        image_dir: folder of the records' images (default: the records file's folder).
        val_prompts: prompts for validation (self-reward of fresh rollouts).
        batch_size: prompts (online) or records (offline) per rank and step.
        seed: seed of the batch order.
    """

    def __init__(self, prompts: Path | None = None, records: Path | None = None, image_dir: Path | None = None,
                 val_prompts: Path | None = None, batch_size: int = 2, seed: int = 42) -> None:
        super().__init__()
        if (prompts is None) == (records is None):
            raise ValueError("data: give exactly one of prompts (online mode) or records (offline mode)")
        self.prompts_path, self.records_path = prompts, records
        self.image_dir = image_dir if image_dir is not None else (Path(records).parent if records else None)
        self.val_prompts_path, self.batch_size, self.seed = val_prompts, batch_size, seed
        self.items: list[Any] = []
        self.val_items: list[Any] = []

    @property
    def mode(self) -> str:
        return "online" if self.prompts_path is not None else "offline"

    def setup(self, stage: str) -> None:
        if self.prompts_path is not None:
            self.items = read_prompts(self.prompts_path)
        else:
            self.items = load_records(self.records_path, image_dir=self.image_dir).records
        if self.val_prompts_path is not None:
            self.val_items = read_prompts(self.val_prompts_path)

    def train_dataloader(self) -> ScheduledBatches:
        return ScheduledBatches(self.items, self.batch_size, self.seed, self.trainer.global_rank,
                                self.trainer.world_size)

    def val_dataloader(self) -> FixedBatches:
        """Each rank validates its own share of the validation prompts (default: the first training batch)."""
        if self.mode != "online":
            return FixedBatches([])
        items = self.val_items or self.items[: self.batch_size]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        mine = items[rank::world]
        return FixedBatches([mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)])

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
