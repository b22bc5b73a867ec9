"""Pretraining ShapeWorld's base model with unified training (next-token CE + flow-matching MSE), as BAGEL is
pretrained: ``srum shapeworld pretrain --config configs/shapeworld_pretrain.yaml``. At the end the model, its
tokenizer and configs are written to ``out`` in the official checkpoint layout."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from srum.model.autoencoder import build_autoencoder
from srum.model.bagel import is_generation_parameter
from srum.model.build import build_random
from srum.model.checkpoint import save_checkpoint
from srum.model.config import BagelConfig
from srum.model.packing import pack
from srum.model.tokenizer import build_small_tokenizer, load_tokenizer
from srum.shapeworld.tasks import ShapeWorldTasks, TaskMix, corpus


def lr_factor(step: int, warmup_steps: int, decay_steps: int, total_steps: int) -> float:
    """Linear warm-up, constant, then (with ``decay_steps``) linear decay to zero at ``total_steps``."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_steps:
        factor = min(factor, max(0.0, (total_steps - step) / decay_steps))
    return factor


class StepIndices:
    """Endless batch indices, saved in checkpoints so a resumed run draws the batches it would have drawn."""

    def __init__(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return 1 << 30

    def __iter__(self) -> Iterator[int]:
        while True:
            self.position += 1
            yield self.position - 1

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


class PretrainModule(L.LightningModule):
    """Args:
        out: folder the pretrained checkpoint (with tokenizer) is written to at the end.
        preset: model preset.
        seed: seed of the weights, the tokenizer corpus and every batch.
        batch_size: samples per step (packed into one sequence).
        lr: peak AdamW learning rate.
        warmup_steps: linear warm-up, then constant.
        decay_steps: linear decay to zero over the run's last ``decay_steps`` steps (0: none). Annealing lets
            the weights settle out of the constant-rate noise; both branches gain from it.
        mix: frequencies of the sample kinds.
        text_dropout: probability of a text-to-image sample without its prompt (for CFG).
        generation_steps: the step at which generation stops (None: never). From it on the mix has no
            text-to-image samples and the generation weights (the MoT generation expert, latent projections,
            timestep embedding) keep their values, while understanding goes on training and annealing: a base
            that judges well and still has room to draw better, on purpose.
        understanding_mix: the mix from ``generation_steps`` on (default: ``mix`` without text-to-image).
        all_pairs_from: the step from which understanding samples (captions, questions, scoring) show every
            colour-shape pair, the four held out of text-to-image included (None: never). A judge that has never
            seen a red triangle cannot confirm one; the pairs are held out of drawing, not of seeing.
    """

    def __init__(self, out: Path, preset: str = "shapeworld", seed: int = 0, batch_size: int = 32, lr: float = 1e-3,
                 warmup_steps: int = 100, decay_steps: int = 0, mix: TaskMix = TaskMix(),
                 text_dropout: float = 0.1, generation_steps: int | None = None,
                 understanding_mix: TaskMix | None = None, all_pairs_from: int | None = None,
                 save_dtype: Literal["float32", "float16", "bfloat16"] = "float32") -> None:
        super().__init__()
        self.out, self.config, self.seed = Path(out), BagelConfig.from_name(preset), seed
        self.batch_size, self.lr, self.warmup_steps, self.decay_steps = batch_size, lr, warmup_steps, decay_steps
        self.mix, self.text_dropout, self.generation_steps = mix, text_dropout, generation_steps
        if generation_steps is not None and generation_steps < 0:
            raise ValueError(f"model.generation_steps: expected a step >= 0 or null, got {generation_steps}")
        self.understanding_mix = replace(understanding_mix or mix, text_to_image=0.0)
        self.all_pairs_from = all_pairs_from
        self.save_dtype = getattr(torch, save_dtype)
        self.model = build_random(self.config, seed)
        self.autoencoder = build_autoencoder(self.config.ae)
        self.out.mkdir(parents=True, exist_ok=True)
        build_small_tokenizer(self.out, self.config.llm.vocab_size, corpus(seed=seed))
        self.tokenizer, self.special = load_tokenizer(self.out)
        self.tasks = ShapeWorldTasks(lambda text: self.tokenizer.encode(text, add_special_tokens=False),
                                     self.autoencoder, mix, text_dropout)

    def train_dataloader(self) -> StepIndices:
        return StepIndices()

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch

    def training_step(self, index: int, batch_idx: int) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}/{index}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        mix = self.mix if self.generating(index) else self.understanding_mix
        seen = "any" if self.all_pairs_from is not None and index >= self.all_pairs_from else None
        samples = [self.tasks.sample(rng, mix=mix, understanding_split=seen) for _ in range(self.batch_size)]
        batch = pack(samples, self.config, self.special).to(self.device)
        out = self.model(batch, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
        ce = out.ce().mean() if out.labels.numel() else out.velocity.new_zeros(())
        mse = out.mse().mean() if out.velocity.numel() else out.velocity.new_zeros(())
        self.log_dict({"pretrain/ce": ce, "pretrain/mse": mse}, prog_bar=True, batch_size=self.batch_size)
        return ce + mse

    def generating(self, step: int) -> bool:
        return self.generation_steps is None or step < self.generation_steps

    def configure_optimizers(self):
        named = list(self.model.named_parameters())
        understanding = [p for name, p in named if not is_generation_parameter(name)]
        generation = [p for name, p in named if is_generation_parameter(name)]
        # two groups always, so checkpoints of runs with and without generation_steps load into each other
        optimizer = torch.optim.AdamW([{"params": understanding}, {"params": generation}], lr=self.lr,
                                      betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
        if self.decay_steps and self.trainer.max_steps <= 0:
            raise ValueError(f"model.decay_steps: the decay ends at trainer.max_steps; expected a positive "
                             f"max_steps, got {self.trainer.max_steps}")
        schedule = partial(lr_factor, warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
                           total_steps=self.trainer.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [schedule, lambda step: schedule(step) if self.generating(step) else 0.0])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            save_checkpoint(self.out, self.model.float(), self.autoencoder, dtype=self.save_dtype)
