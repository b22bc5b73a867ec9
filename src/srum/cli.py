"""The ``srum`` program: one map of subcommands, each a function whose signature is its command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from srum.model.attention import Backend
from srum.model.autoencoder import build_autoencoder
from srum.model.build import build_on_meta, build_random, count_parameters
from srum.model.checkpoint import read_config, save_checkpoint
from srum.model.config import BagelConfig
from srum.model.overfit import overfit
from srum.model.packing import pack
from srum.model.synthetic import SampleFactory, special_tokens_for
from srum.model.tokenizer import build_small_tokenizer

log = logging.getLogger("srum")
MAX_INIT_PARAMETERS = 2_000_000_000  # `model init` is for tiny presets: random 7B weights help no one


def _config(preset: str | None, checkpoint: Path | None) -> BagelConfig:
    if (preset is None) == (checkpoint is None):
        raise ValueError("give exactly one of --preset or --checkpoint")
    return BagelConfig.from_name(preset) if preset else read_config(checkpoint)


def _shape(shape: torch.Size) -> str:
    return "x".join(str(size) for size in shape)


def model_params(preset: str | None = None, checkpoint: Path | None = None,
                 part: Literal["bagel", "ae"] = "bagel") -> None:
    """Print ``name<TAB>shape`` for every tensor of the model's state dict (built on the meta device).

    Args:
        preset: a preset name (``bagel-7b-mot``, ``tiny``).
        checkpoint: a checkpoint folder; its config decides the model.
        part: ``bagel`` for the unified model (``ema.safetensors``), ``ae`` for the autoencoder (``ae.safetensors``).
    """
    config = _config(preset, checkpoint)
    if part == "bagel":
        module = build_on_meta(config)
    else:
        with torch.device("meta"):
            module = build_autoencoder(config.ae)
    lines = [f"{name}\t{_shape(tensor.shape)}\n" for name, tensor in module.state_dict().items()]
    sys.stdout.writelines(lines)


def model_init(preset: str, out: Path, seed: int = 0) -> None:
    """Write a randomly initialised checkpoint folder (official layout plus a small tokenizer).

    Args:
        preset: a preset name; only small presets (tests, quick experiments).
        out: the folder to write; existing files of the same names are replaced atomically.
        seed: seed of the random weights.
    """
    config = BagelConfig.from_name(preset)
    size = count_parameters(build_on_meta(config))
    if size > MAX_INIT_PARAMETERS:
        raise ValueError(f"preset {preset!r}: {size:,} parameters; model init is for small presets only")
    model = build_random(config, seed)
    autoencoder = build_autoencoder(config.ae)
    save_checkpoint(out, model, autoencoder)
    build_small_tokenizer(out, vocab_size=config.llm.vocab_size)
    log.info("wrote %s (%s, %s parameters, seed %d)", out, preset, f"{size:,}", seed)


def model_overfit(preset: str = "tiny", samples: int = 6, steps: int = 40, lr: float = 3e-3, seed: int = 0,
                  backend: Backend = "sdpa") -> None:
    """Train a random model on one packed batch of mixed samples and show the losses fall.

    Args:
        preset: a small preset name.
        samples: samples in the batch (text-to-image, understanding and editing in turn).
        steps: optimizer steps.
        lr: AdamW learning rate.
        seed: seed of the weights and the samples.
        backend: attention backend.
    """
    config = BagelConfig.from_name(preset)
    model = build_random(config, seed)
    batch = pack(SampleFactory(config, seed).mixed(samples), config, special_tokens_for(config))
    table = Table(title=f"overfit {preset}: {samples} samples, {batch.sequence_length} packed tokens")
    for column in ("step", "cross-entropy", "flow mse"):
        table.add_column(column, justify="right")
    every = max(steps // 10, 1)

    def show(step: int, ce: float, mse: float) -> None:
        if step % every == 0 or step == steps - 1:
            table.add_row(str(step), f"{ce:.4f}", f"{mse:.4f}")

    losses = overfit(model, batch, steps, lr, seed, backend, on_step=show)
    Console().print(table)
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


COMMANDS = {
    "model": {
        "params": model_params,
        "init": model_init,
        "overfit": model_overfit,
    },
}


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        CLI(COMMANDS, args=args, as_positional=False)
    except ValueError as error:
        raise SystemExit(f"srum: error: {error}") from None

