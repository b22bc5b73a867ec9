"""``srum plan --config FILE [--world_size N] [--gpu_memory 80GB]``: the configured run's memory per rank, a
fits / does-not-fit verdict and the most candidates per GPU that fit, with and without activation checkpointing
and with LoRA on one GPU. The run's YAML is read by the same LightningCLI parser ``srum fit`` uses (nothing is
loaded or started); the model is built on the meta device from the checkpoint's config."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from rich.console import Console
from rich.table import Table

from srum.generation.pipeline import vit_size, vit_transform
from srum.model.build import build_on_meta
from srum.model.checkpoint import read_config
from srum.model.config import PRESETS, BagelConfig
from srum.model.shipped import checkpoint_folder
from srum.model.tokenizer import load_tokenizer
from srum.plan.judging import judge_passes
from srum.plan.memory import HELD, MemoryPlan, Row, RunShape, peak_bytes, phase_totals
from srum.train.cli import quiet_lightning
from srum.train.data import SRUMDataModule
from srum.train.module import LoraConfig, SRUMModule, mark_trainable

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}
GiB = 2**30


def parse_bytes(text: str, option: str) -> int:
    """``80GB`` (10^9 bytes each), ``79.6GiB`` (2^30), ``512MiB``..."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"{option}: expected a size such as 80GB or 79.6GiB, got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


class _ReadOnlyCLI(LightningCLI):
    """The fit parser and the model and data settings, without a trainer: planning starts nothing."""

    def instantiate_trainer(self, **kwargs):
        return None


def _model_config(checkpoint: Path, preset: str | None) -> tuple[BagelConfig, str]:
    if preset is not None:
        return BagelConfig.from_name(preset), f"preset {preset}"
    folder = checkpoint_folder(checkpoint)
    if folder.is_dir():
        return read_config(folder), str(checkpoint)
    if folder.name.lower() in PRESETS:  # models/BAGEL-7B-MoT before it is downloaded
        return BagelConfig.from_name(folder.name.lower()), f"preset {folder.name.lower()} ({folder} not found)"
    raise ValueError(f"{folder}: model.checkpoint: no such checkpoint folder; expected one, or --preset with one "
                     f"of {', '.join(sorted(PRESETS))}")


def _token_counter(checkpoint: Path) -> tuple[Callable[[str], int], str]:
    """The checkpoint's tokenizer when it is on disk; otherwise about four characters per token."""
    folder = checkpoint_folder(checkpoint)
    if (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(folder).tokenizer
        return (lambda text: len(tokenizer.encode(text, add_special_tokens=False))), "its tokenizer"
    return (lambda text: len(text) // 4 + 1), "about 4 characters per token (no tokenizer on disk)"


def _dtypes(precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(weights, compute) of a Lightning precision setting."""
    if precision.startswith("bf16"):
        return (torch.bfloat16 if precision == "bf16-true" else torch.float32), torch.bfloat16
    if precision.startswith("16"):
        return (torch.float16 if precision == "16-true" else torch.float32), torch.float16
    return torch.float32, torch.float32


def _world(trainer, world_size: int | None) -> tuple[int, bool]:
    """(data-parallel ranks, sharded) of the trainer settings; ``world_size`` replaces the configured count."""
    devices = trainer.devices if isinstance(trainer.devices, int) else (
        len(trainer.devices) if isinstance(trainer.devices, list | tuple) else 1)
    world = world_size or devices * trainer.num_nodes
    strategy = trainer.strategy
    if not isinstance(strategy, ModelParallelStrategy):
        return world, False
    tensor_parallel = strategy._tensor_parallel_size if isinstance(strategy._tensor_parallel_size, int) else 1
    configured = strategy._data_parallel_size
    ranks = world // tensor_parallel if world_size or not isinstance(configured, int) else configured
    return ranks, True


def read_run(args: list[str], world_size: int | None, preset: str | None, prompt_tokens: int,
             reserve: int) -> tuple[SRUMModule, RunShape, int, str]:
    """The run's module settings, its memory shape, its candidates per rank and where the model config came
    from."""
    quiet_lightning()
    cli = _ReadOnlyCLI(SRUMModule, SRUMDataModule, run=False, args=args, parser_kwargs={"prog": "srum plan"})
    module, trainer, data = cli.model, cli.config_init.trainer, cli.datamodule
    config, source = _model_config(module.checkpoint, preset)
    ranks, sharded = _world(trainer, world_size)
    weight_dtype, compute_dtype = _dtypes(str(trainer.precision))
    sampler, rollout = module.rollout.sampler, module.rollout
    count, counted_by = _token_counter(module.checkpoint)
    patch = config.vit.patch_size
    frame = vit_size(rollout.height, rollout.width, *vit_transform(config.vit))
    vit_tokens = (frame[0] // patch) * (frame[1] // patch)
    passes = judge_passes(module.scoring, vit_tokens, frame, prompt_tokens, count) if module.mode == "online" else []
    run = RunShape(config=config, ranks=ranks, sharded=sharded, weight_dtype=weight_dtype,
                   compute_dtype=compute_dtype, activation_checkpointing=module.activation_checkpointing,
                   ema=module.ema_decay is not None, reference=module.needs_reference,
                   images_per_prompt=module.rollout.images_per_prompt, height=module.rollout.height,
                   width=module.rollout.width, prompt_tokens=prompt_tokens,
                   guidance_contexts=1 + (sampler.cfg_text_scale > 1) + (sampler.cfg_img_scale > 1),
                   timesteps=sampler.num_timesteps, trajectory=module.objective.noise_level is not None,
                   judge=tuple(passes), reserve_bytes=reserve)
    return module, run, data.batch_size * module.rollout.images_per_prompt, f"{source}; judge tokens: {counted_by}"


def memory_plan(run: RunShape, trainable: str, lora: LoraConfig | None) -> MemoryPlan:
    model = build_on_meta(run.config)
    mark_trainable(model, trainable, lora)
    return MemoryPlan(model, run)


def _gib(value: int) -> str:
    return f"{value / GiB:.2f}" if value >= GiB // 100 or value == 0 else f"{value / GiB:.2e}"


def _table(rows: list[Row], images: int, budget: int, reserve: int) -> Table:
    table = Table(title=f"Memory per rank, {images} candidates per rank (GiB)")
    for name, justify in (("part", "left"), ("phase", "left"), ("GiB", "right"), ("basis", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(row.part, row.phase, _gib(row.bytes), row.basis)
    held = sum(r.bytes for r in rows if r.phase == HELD)
    for phase, total in phase_totals(rows).items():
        table.add_row(f"[bold]held + {phase}", "", _gib(held + total), "")
    if reserve:
        table.add_row("reserve (CUDA context, fragmentation)", "", _gib(reserve), "assumed")
    peak = peak_bytes(rows) + reserve
    table.add_row("[bold]peak", "", f"[bold]{_gib(peak)}", f"of {_gib(budget)}")
    return table


def plan(args: list[str]) -> None:
    """Print the configured run's memory plan (``srum plan --help``)."""
    parser = argparse.ArgumentParser(prog="srum plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world_size", type=int, default=None, help="GPUs in all (default: the trainer's)")
    parser.add_argument("--gpu_memory", default="80GB", help="memory of one GPU (80GB, 141GB, 79.6GiB)")
    parser.add_argument("--preset", default=None, help="model preset instead of the checkpoint's config")
    parser.add_argument("--prompt_tokens", type=int, default=64, help="assumed prompt length in tokens")
    parser.add_argument("--reserve", default="2GiB", help="kept free for the CUDA context and fragmentation")
    parser.add_argument("--measure_steps", type=int, default=0,
                        help="also run this many steps on the CPU and compare their measured peak with the plan's")
    own, rest = parser.parse_known_args(args)
    if own.world_size is not None and own.world_size < 1:
        raise ValueError(f"--world_size: expected at least 1, got {own.world_size}")
    budget, reserve = parse_bytes(own.gpu_memory, "--gpu_memory"), parse_bytes(own.reserve, "--reserve")
    module, run, images, source = read_run(rest, own.world_size, own.preset, own.prompt_tokens, reserve)
    configured = memory_plan(run, module.trainable, module.lora)
    console = Console()
    console.print(f"model: {source}; {run.ranks} rank(s), {'FSDP2-sharded' if run.sharded else 'unsharded'}; "
                  f"weights {run.weight_dtype}, compute {run.compute_dtype}; {run.height}x{run.width} images "
                  f"({run.image_tokens} latent tokens, prompts assumed {run.prompt_tokens} tokens)")
    rows = configured.rows(images)
    console.print(_table(rows, images, budget, reserve))
    peak = peak_bytes(rows) + reserve
    verdict = "fits" if peak <= budget else "does NOT fit"
    console.print(f"[bold]{verdict}[/bold]: peak {_gib(peak)} GiB of {_gib(budget)} GiB per GPU with "
                  f"{images} candidates per rank ({images // run.images_per_prompt} prompts x "
                  f"{run.images_per_prompt} candidates)")
    flipped = dataclasses.replace(run, activation_checkpointing=not run.activation_checkpointing)
    one_gpu = dataclasses.replace(run, ranks=1)
    variants = [(f"as configured ({'with' if run.activation_checkpointing else 'without'} activation "
                 f"checkpointing)", configured),
                (f"{'without' if run.activation_checkpointing else 'with'} activation checkpointing",
                 memory_plan(flipped, module.trainable, module.lora)),
                (f"LoRA rank {(module.lora or LoraConfig()).rank} on one GPU",
                 memory_plan(one_gpu, module.trainable, module.lora or LoraConfig()))]
    table = Table(title=f"Most {run.height}x{run.width} candidates per GPU that fit in {_gib(budget)} GiB")
    table.add_column("run")
    table.add_column("candidates", justify="right")
    table.add_column("peak at that count (GiB)", justify="right")
    for name, variant in variants:
        most = variant.largest_images(budget)
        table.add_row(name, str(most), _gib(variant.peak(most)) if most else f"1 needs {_gib(variant.peak(1))}")
    console.print(table)
    if own.measure_steps > 0:
        from srum.plan.measure import measured_peak

        measured = measured_peak(rest, own.measure_steps)
        console.print(f"measured on the CPU over {own.measure_steps} step(s): peak {_gib(measured)} GiB; planned "
                      f"{_gib(peak - reserve)} GiB without the reserve ({(peak - reserve) / measured - 1:+.1%})")
    console.print("exact: tensor sizes from shapes and the sharding rule; counted: autograd's saved tensors of srum's "
                  "decoder layer run on the meta device; estimate: working memory from a formula, a bound to leave "
                  "headroom for, not a measurement")
