"""The Lightning half of the ``srum`` program: ``fit``, ``validate``, ``test`` and ``predict`` through
LightningCLI, configured by YAML files in ``configs/``."""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

from srum.train.data import SRUMDataModule
from srum.train.module import SRUMModule

LIGHTNING_COMMANDS = {
    "fit": "Train: online (rollouts, self-scoring and the constrained loss in each step) or offline (records).",
    "validate": "Self-reward of fresh rollouts on the validation prompts.",
    "test": "Self-reward of fresh rollouts on the test prompts.",
    "predict": "Judged candidates (reward records) for prompts.",
}


class SRUMCLI(LightningCLI):
    """LightningCLI with a rich progress bar unless the configuration turns progress bars off."""

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        if trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in (callbacks if isinstance(callbacks, list) else [callbacks])):
            kwargs["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), RichProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI loads --ckpt_path here, while parsing, before any hook: check it first
        if self.config.get("subcommand"):
            check_resume_path(self.config[self.config.subcommand].get("ckpt_path"))
        super()._parse_ckpt_path()


def check_resume_path(path: str | None) -> None:
    """Refuse a ``--ckpt_path`` Lightning could not load, in one line and before anything starts: a missing path,
    a file that is not a whole ``torch.save`` archive (truncated or foreign), a sharded folder without its
    metadata. Special names (``last``, ``best``, ``hpc``) are Lightning's to resolve."""
    if path is None or path in ("last", "best", "hpc", "registry"):
        return
    checkpoint = Path(path)
    if checkpoint.is_dir():
        if not (checkpoint / ".metadata").is_file():
            raise ValueError(f"{checkpoint}: ckpt_path: expected a sharded checkpoint folder with its .metadata, "
                             f"got a folder without it (a save cut short?)")
    elif not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: ckpt_path: no such checkpoint file or folder")
    elif not zipfile.is_zipfile(checkpoint):
        raise ValueError(f"{checkpoint}: ckpt_path: expected a checkpoint written by torch.save (a Lightning "
                         f".ckpt), got a truncated or foreign file")


EXPECTED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen reference and autoencoder are in eval mode on purpose
    r"You have overridden `transfer_batch_to_device`",  # batches are prompts or records, no tensors to move
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # the CSV logger is the default on purpose
    r"Using ModelCheckpoint with manual optimization",  # the step's state is saved whole; resume is exact (tested)
    r"LightningCLI's args parameter",  # srum hands LightningCLI the arguments it built (plan, measurements)
)
"""Lightning warnings about what srum does deliberately: silenced so that what is left is worth reading."""


NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "`Trainer.fit` stopped:", "Seed set to")
"""Starts of Lightning's info lines that advertise services or restate the configuration: dropped, so a run
prints its progress, its metrics and its report."""
NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed")


def _not_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(NOISE)


def quiet_lightning() -> None:
    for message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _not_noise not in logger.filters:
            logger.addFilter(_not_noise)


def run_lightning(args: list[str] | None) -> LightningCLI:
    """LightningCLI over ``args`` (None: the command line)."""
    quiet_lightning()
    return SRUMCLI(SRUMModule, SRUMDataModule, args=args, save_config_kwargs={"overwrite": True},
                   parser_kwargs={"prog": "srum"})


def run_pretrain(args: list[str]) -> LightningCLI:
    """``srum shapeworld pretrain [options]``: LightningCLI's fit over the ShapeWorld pretraining module."""
    from srum.shapeworld.pretrain import PretrainModule

    quiet_lightning()

    return SRUMCLI(PretrainModule, args=["fit", *args], save_config_kwargs={"overwrite": True},
                   parser_kwargs={"prog": "srum"})
