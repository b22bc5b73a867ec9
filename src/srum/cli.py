"""The ``srum`` program: one map of subcommands, each a function whose signature is its command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from rich.console import Console
from rich.table import Table

from srum.generation.device import device_and_dtype
from srum.generation.pipeline import Pipeline
from srum.generation.prompts import read_prompts
from srum.generation.sampler import RenormType, SamplerConfig
from srum.generation.writer import generate_to_folder
from srum.io.jsonl import rewrite_jsonl
from srum.model.attention import Backend
from srum.model.autoencoder import build_autoencoder
from srum.model.build import build_on_meta, build_random, count_parameters
from srum.model.checkpoint import read_config, write_random_checkpoint
from srum.model.config import BagelConfig
from srum.model.overfit import overfit
from srum.model.packing import pack
from srum.model.shipped import checkpoint_identity
from srum.model.synthetic import SampleFactory, special_tokens_for
from srum.reward.instructions import DEFAULT_INSTRUCTIONS, read_instructions
from srum.reward.proposals import build_proposer
from srum.reward.records import ScoreKind, load_records
from srum.reward.rollouts import score_rollouts
from srum.reward.scorer import Method, ScorerConfig, SelfScorer
from srum.train.export import export_checkpoint

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
    write_random_checkpoint(out, config, seed, tokenizer_vocab=config.llm.vocab_size)
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


def generate(checkpoint: Path, prompts: Path, out: Path, steps: int = 50, cfg_text_scale: float = 4.0,
             cfg_img_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.4, 1.0), timestep_shift: float = 3.0,
             cfg_renorm_type: RenormType = "global", cfg_renorm_min: float = 0.0, images_per_prompt: int = 1,
             seed: int = 42, batch_size: int = 4, height: int | None = None, width: int | None = None,
             think: bool = False,
             max_think_tokens: int = 1000, device: str | None = None,
             dtype: Literal["auto", "float32", "bfloat16"] = "auto") -> None:
    """Generate images for a prompt file (one PNG and one JSONL record per image).

    Re-running into the same OUT skips what is done.

    Args:
        checkpoint: checkpoint folder (official layout).
        prompts: T2I-CompBench JSON (Question, Category, Question_id) or plain text, one prompt a line.
        out: output folder (PNGs and records.jsonl).
        steps: timestep grid points T (T - 1 model evaluations).
        cfg_text_scale: text guidance scale (1 disables guidance).
        cfg_img_scale: image guidance scale (1 disables it).
        cfg_interval: guidance only where interval[0] < t <= interval[1].
        timestep_shift: shift of the timestep grid.
        cfg_renorm_type: global, channel or text_channel.
        cfg_renorm_min: lower bound of the renorm scale (1 disables renorm).
        images_per_prompt: images per prompt, each with its own seed.
        seed: run seed; each image's seed derives from it, its prompt id and its index.
        batch_size: images generated together.
        height: image height in pixels (default: the largest the checkpoint draws, 1024 for BAGEL-7B).
        width: image width in pixels (default: the largest the checkpoint draws).
        think: plan in text before drawing.
        max_think_tokens: with think, tokens of each plan at most.
        device: cuda or cpu (default: cuda when available).
        dtype: weights dtype (auto: bfloat16 on GPU, float32 on CPU).
    """
    device, torch_dtype = device_and_dtype(device, dtype)
    sampler = SamplerConfig(num_timesteps=steps, timestep_shift=timestep_shift, cfg_text_scale=cfg_text_scale,
                            cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval, cfg_renorm_type=cfg_renorm_type,
                            cfg_renorm_min=cfg_renorm_min)
    prompt_list = read_prompts(prompts)
    pipeline = Pipeline.from_checkpoint(checkpoint, dtype=torch_dtype, device=device)
    largest = pipeline.model.config.max_latent_size * pipeline.model.config.latent_downsample
    written = generate_to_folder(pipeline, prompt_list, out, sampler, images_per_prompt, seed, batch_size,
                                 largest if height is None else height, largest if width is None else width, think,
                                 max_think_tokens, extra_settings={"checkpoint": checkpoint_identity(checkpoint)})
    log.info("wrote %d images to %s", written, out)


def score(checkpoint: Path, rollouts: Path, out: Path, proposer: Literal["components", "grid", "whole", "sam"]
          = "components", max_regions: int = 10, sam_dir: Path | None = None, method: Method = "both",
          global_kind: Literal["layout", "sample"] = "layout", think: bool = False,
          max_new_tokens_global: int = 1024, max_new_tokens_regions: int = 4096, instructions: Path | None = None,
          batch_size: int = 4, device: str | None = None, dtype: Literal["auto", "float32", "bfloat16"] = "auto",
          official_out: Path | None = None, official_kind: ScoreKind = "expected") -> None:
    """Self-score every image of a ``srum generate`` folder into reward records.

    Proposes regions, scores them and the whole image with the same model and appends one record per image to
    OUT; re-running skips what is done.

    Args:
        checkpoint: checkpoint folder (official layout).
        rollouts: a folder written by ``srum generate`` (PNGs and records.jsonl).
        out: reward-record JSONL file to append to.
        proposer: region proposer: connected components, grid, whole image, or SAM from ``sam_dir``.
        max_regions: regions kept per image, largest first.
        sam_dir: local folder of a transformers SAM model (for ``--proposer sam``).
        method: score kinds: text (parsed answers), expected (probability-weighted) or both.
        global_kind: global instruction: layout (official) or sample (overall impression).
        think: let free-text answers reason in think tags first.
        max_new_tokens_global: decoding budget of the global answer.
        max_new_tokens_regions: decoding budget of the region answer.
        instructions: YAML or JSON file replacing scoring templates (global_template, region_template,
            single_region_template, sample_template, version); the rest keep srum's wording.
        batch_size: images scored together.
        device: cuda or cpu (default: cuda when available).
        dtype: weights dtype (auto: bfloat16 on GPU, float32 on CPU).
        official_out: also write every record of OUT in the official SRUM training format to this file (rewritten
            whole after each run, so it always matches OUT).
        official_kind: the score kind the official file carries: expected or text.
    """
    if official_out is not None and Path(official_out).resolve() == Path(out).resolve():
        raise ValueError(f"{official_out}: --official_out: expected a file other than --out")
    device, torch_dtype = device_and_dtype(device, dtype)
    options = {"max_regions": max_regions}
    if proposer == "sam":
        if sam_dir is None:
            raise ValueError("--proposer sam needs --sam_dir (a local transformers SAM folder)")
        options.update(model_dir=sam_dir, device=device)
    region_proposer = build_proposer(proposer, **options)
    pipeline = Pipeline.from_checkpoint(checkpoint, dtype=torch_dtype, device=device)
    config = ScorerConfig(method=method, global_kind=global_kind, think=think,
                          max_new_tokens_global=max_new_tokens_global, max_new_tokens_regions=max_new_tokens_regions)
    templates = read_instructions(instructions) if instructions else DEFAULT_INSTRUCTIONS
    written = score_rollouts(SelfScorer(pipeline, region_proposer, config, templates), rollouts, out, batch_size,
                             made_by={"checkpoint": checkpoint_identity(checkpoint)})
    log.info("wrote %s to %s", written, out)
    if official_out is not None:
        records = load_records(out).records
        rewrite_jsonl(Path(official_out), [record.to_official(official_kind) for record in records])
        log.info("wrote %d records in the official format (%s scores) to %s", len(records), official_kind,
                 official_out)


def export(ckpt: Path, out: Path, weights: Literal["model", "ema"] = "model", base: Path | None = None,
           name: Literal["ema", "model"] = "ema", dtype: Literal["bfloat16", "float32"] = "bfloat16") -> None:
    """Write a training checkpoint as an official checkpoint folder (BAGEL's own code loads it).

    Args:
        ckpt: a checkpoint of ``srum fit``: a .ckpt file, or the folder of a sharded (FSDP2) checkpoint.
        out: the folder to write.
        weights: the trained weights (model) or their moving average (ema).
        base: the checkpoint folder the run started from (default: the one recorded in the checkpoint); its
            configs, tokenizer and autoencoder are copied.
        name: file name of the weights: ema.safetensors (what the official inference reads) or model.safetensors.
        dtype: dtype of the written weights.
    """
    export_checkpoint(ckpt, out, weights, base, name, getattr(torch, dtype))
    log.info("exported %s to %s", ckpt, out)


def shapeworld_summarize(arms: dict[str, list[Path]], ceiling: str | None = None,
                         paired_with: str | None = None) -> None:
    """Tabulate ShapeWorld reports of several runs: each arm's SRUM - base difference, mean +- std over its runs.

    Args:
        arms: arm name -> ``report.json`` files of its runs (e.g. one per seed), as JSON:
            ``--arms '{"srum": ["runs/s0/report/report.json", ...], "uniform": [...]}'``.
        ceiling: the arm of perfect supervision: gains also shown as a share of its gain.
        paired_with: a control arm: each arm's run-by-run (seed-paired) difference from it.
    """
    from srum.shapeworld.report import summarize

    if not arms:
        raise ValueError("arms: expected at least one arm with report files")
    loaded = {}
    for arm, paths in arms.items():
        if not paths:
            raise ValueError(f"arms.{arm}: expected at least one report file")
        loaded[arm] = []
        for path in paths:
            try:
                report = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"{path}: cannot read the report ({error})") from None
            if "difference" not in report:
                raise ValueError(f"{path}: field 'difference' missing: expected the report of a srum fit run")
            loaded[arm].append(report)
    Console().print(summarize(loaded, ceiling, paired_with))


def shapeworld_curves(arms: dict[str, list[Path]], out: Path) -> None:
    """Draw the learning curves of several arms in one figure: pass rate and overall vs step, mean and min-max.

    Args:
        arms: arm name -> ``curve.json`` files of its runs (e.g. one per seed), as JSON:
            ``--arms '{"srum": ["runs/s0/report/curve.json", ...], "uniform": [...]}'``.
        out: the PNG to write.
    """
    from srum.shapeworld.curve import plot_curves, read_curve

    if not arms:
        raise ValueError("arms: expected at least one arm with curve files")
    loaded = {}
    for arm, paths in arms.items():
        if not paths:
            raise ValueError(f"arms.{arm}: expected at least one curve file")
        loaded[arm] = [read_curve(Path(path)) for path in paths]
    plot_curves(loaded, out)
    log.info("wrote %s", out)


COMMANDS = {
    "generate": generate,
    "score": score,
    "export": export,
    "model": {
        "params": model_params,
        "init": model_init,
        "overfit": model_overfit,
    },
    "shapeworld": {"summarize": shapeworld_summarize, "curves": shapeworld_curves},
}


def _overview() -> str:
    lines = ["usage: srum COMMAND [options]   (srum COMMAND --help for a command's options)", "", "commands:"]
    from srum.eval.cli import EVAL_COMMANDS
    from srum.train.cli import LIGHTNING_COMMANDS

    entries = {**LIGHTNING_COMMANDS, "plan": "Memory per GPU of a configured run, and the most candidates per GPU "
               "that fit.", "shapeworld pretrain": "Pretrain ShapeWorld's base model (unified CE + flow matching) and "
               "write its checkpoint."}
    for name, command in {"validate": EVAL_COMMANDS, **COMMANDS}.items():
        if callable(command):
            entries[name] = (command.__doc__ or "").strip().split("\n")[0]
        else:
            for sub, function in command.items():
                entries[f"{name} {sub}"] = (function.__doc__ or "").strip().split("\n")[0]
    width = max(len(name) for name in entries)
    return "\n".join(lines + [f"  {name.ljust(width)}  {text}" for name, text in entries.items()])


def _show_logs() -> None:
    """srum's own log lines, once each, as plain text. The root logger is left alone: Lightning prints its lines
    through its own handler, and a root handler would print each of them a second time."""
    logger = logging.getLogger("srum")
    logger.setLevel(logging.INFO)
    if not any(getattr(handler, "srum", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.srum = True
        logger.addHandler(handler)


def main(args: list[str] | None = None) -> None:
    explicit = args is not None
    args = list(args) if explicit else sys.argv[1:]
    _show_logs()
    if not args or args[0] in ("-h", "--help"):
        print(_overview())  # noqa: T201 - the program's own help text
        return
    try:
        if args[0] == "validate" and args[1:2] and not args[1].startswith("-"):  # a benchmark: srum.eval
            from srum.eval.cli import run_validate

            run_validate(args[1:])
            return
        if args[0] in ("fit", "validate", "test", "predict"):
            from srum.train.cli import run_lightning

            run_lightning(args if explicit else None)
            return
        if args[0] == "plan":
            from srum.plan.command import plan

            plan(args[1:])
            return
        if args[:2] == ["shapeworld", "pretrain"]:
            from srum.train.cli import run_pretrain

            run_pretrain(args[2:])
            return
        CLI(COMMANDS, args=args, as_positional=False)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"srum: error: {error}") from None

