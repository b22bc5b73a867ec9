"""The ShapeWorld benchmark inside Lightning: ``srum fit`` measures the model before and after training and
reports both; ``srum validate`` measures the model it is given."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from srum.io.jsonl import write_json
from srum.model.checkpoint import checkpoint_folder, weights_file
from srum.shapeworld.benchmark import SUMMARY_VERSION, BenchmarkConfig, first_images, run_benchmark, settings_of
from srum.shapeworld.checker import score
from srum.shapeworld.report import GRID_CELL, write_report
from srum.shapeworld.world import parse_spec

MEASURED = "measured"
"""A checkpoint's folder of its own benchmark summaries, by cache key: the shipped base carries the summary of
the main job's benchmark, so a first run on a fresh machine does not measure an unchanged base again."""


def base_summary_name(checkpoint: str | Path, benchmark: BenchmarkConfig) -> str:
    """The file name a base summary is kept under: it depends on the weights and the benchmark settings only (not
    on the run's judge or reward rule, which only the grid panel shows, and that is drawn anew)."""
    with weights_file(checkpoint_folder(checkpoint), "auto").open("rb") as weights:
        digest = hashlib.file_digest(weights, "sha256").hexdigest()
    identity = {"weights": digest, "settings": settings_of(benchmark), "summary": SUMMARY_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20] + ".json"


Panel = tuple[list[torch.Tensor], list[torch.Tensor], list[str]]
"""Grid images (H, W, 3) uint8, their self-reward maps and captions."""


def grid_caption(image: torch.Tensor, prompt: str, self_score: float | None) -> str:
    """What a reader needs under a grid image: the checker's verdict, the self-score and the prompt (wrapped
    to the cell)."""
    verdict = "PASS" if score(image, parse_spec(prompt)).passed else "fail"
    shown = "-" if self_score is None else f"{self_score:+.2f}"
    return "\n".join([f"{verdict} self={shown}", *textwrap.wrap(prompt, GRID_CELL // 6)])


class ShapeWorldBenchmark(L.Callback):
    """Args:
        out: report folder (``report.json``, ``report.md``, ``grid.png``); default ``<default_root_dir>/report``
            for ``fit`` and ``<default_root_dir>/report-validate`` for ``validate``, so validating a trained run
            does not replace its base-vs-SRUM report.
        benchmark: what is drawn and judged.
        grid_prompts: test prompts shown in the grid, each model's image over its self-reward map.
        base_cache: folder where the base model's summary is kept, keyed by its weights and the benchmark
            settings, so the runs of a study (seeds, arms, ablations) measure the same base once; its grid panel
            is redrawn with each run's judge and reward rule. None: always measure.
    """

    def __init__(self, out: Path | None = None, benchmark: BenchmarkConfig = BenchmarkConfig(),
                 grid_prompts: int = 8, base_cache: Path | None = Path("runs/shapeworld-base-cache")) -> None:
        self.out, self.benchmark, self.grid_prompts = out, benchmark, grid_prompts
        self.base_cache = None if base_cache is None else Path(base_cache)
        self.summaries: dict[str, dict] = {}
        self.panels: dict[str, Panel] = {}

    def _measure(self, name: str, module: Any, summary: dict | None = None) -> None:
        """Benchmark the module's model (or take its known ``summary``) and draw its grid panel: the first
        images with this run's self-reward maps."""
        training = module.model.training
        count = self.grid_prompts
        if summary is None:
            evaluation = run_benchmark(module.pipeline, self.benchmark)
            summary, images, texts = evaluation.summary, evaluation.images[:count], evaluation.prompts[:count]
        else:
            images, texts = first_images(module.pipeline, self.benchmark, count)
        with torch.no_grad():
            records = module.scorer.score(images, texts, [f"{name}_{i}.png" for i in range(len(images))])
        kind = module.scoring.score_kind
        self.summaries[name] = summary
        self.panels[name] = (images, [m.cpu() for m in module.reward_maps(records)],
                             [grid_caption(image, text, record.global_scores.get(kind))
                              for image, text, record in zip(images, texts, records, strict=True)])
        module.model.train(training)

    def _measure_base(self, module: Any) -> None:
        """The base measurement, its summary from the cache (or from the checkpoint's own ``measured`` folder,
        which the shipped base carries) when these weights were measured with these settings before."""
        if self.base_cache is None:
            self._measure("base", module)
            return
        name = base_summary_name(module.checkpoint, self.benchmark)
        for known in (self.base_cache / name, checkpoint_folder(module.checkpoint) / MEASURED / name):
            if known.is_file():
                self._measure("base", module, json.loads(known.read_text()))
                return
        self._measure("base", module)
        self.base_cache.mkdir(parents=True, exist_ok=True)
        write_json(self.base_cache / name, self.summaries["base"])

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            default = "report-validate" if trainer.state.fn == TrainerFn.VALIDATING else "report"
            out = Path(trainer.default_root_dir) / default if self.out is None else Path(self.out)
            write_report(out, self.summaries, self.panels)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.scorer is None:
            raise ValueError("trainer.callbacks: ShapeWorldBenchmark overlays self-reward maps, so it needs "
                             "model.mode online (a scorer); expected online, got offline")
        if "base" not in self.summaries:  # a resumed run keeps the base measured at its start
            self._measure_base(pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._measure("srum", pl_module)
        self._write(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.summaries.clear()
            self.panels.clear()
            self._measure("model", pl_module)
            self._write(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.summaries["base"]} if "base" in self.summaries else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base" in state_dict:
            self.summaries["base"] = state_dict["base"]
