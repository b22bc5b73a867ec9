"""The ShapeWorld benchmark inside Lightning: ``srum fit`` measures the model before and after training and
reports both; ``srum validate`` measures the model it is given."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import load_file

from srum.io.jsonl import write_json
from srum.model.checkpoint import checkpoint_folder, weights_file, write_safetensors_state
from srum.shapeworld.benchmark import SUMMARY_VERSION, BenchmarkConfig, run_benchmark, settings_of
from srum.shapeworld.report import write_report

Panel = tuple[list[torch.Tensor], list[torch.Tensor], list[str]]
"""Grid images (H, W, 3) uint8, their self-reward maps and captions."""


class ShapeWorldBenchmark(L.Callback):
    """Args:
        out: report folder (``report.json``, ``report.md``, ``grid.png``); default ``<default_root_dir>/report``.
        benchmark: what is drawn and judged.
        grid_prompts: test prompts shown in the grid, each model's image over its self-reward map.
        base_cache: folder where the base model's measurement is kept, keyed by its weights and the benchmark
            settings, so the runs of a study (seeds, arms, ablations) measure the same base once. None: always
            measure.
    """

    def __init__(self, out: Path | None = None, benchmark: BenchmarkConfig = BenchmarkConfig(),
                 grid_prompts: int = 8, base_cache: Path | None = Path("runs/shapeworld-base-cache")) -> None:
        self.out, self.benchmark, self.grid_prompts = out, benchmark, grid_prompts
        self.base_cache = None if base_cache is None else Path(base_cache)
        self.summaries: dict[str, dict] = {}
        self.panels: dict[str, Panel] = {}

    def _measure(self, name: str, module: Any) -> None:
        training = module.model.training
        evaluation = run_benchmark(module.pipeline, self.benchmark)
        count = min(self.grid_prompts, len(evaluation.images))
        images, texts = evaluation.images[:count], evaluation.prompts[:count]
        with torch.no_grad():
            records = module.scorer.score(images, texts, [f"{name}_{i}.png" for i in range(count)])
        kind = module.scoring.score_kind
        scores = [r.global_scores.get(kind) for r in records]
        self.summaries[name] = evaluation.summary
        self.panels[name] = (images, [m.cpu() for m in module.reward_maps(records)],
                             ["g=-" if g is None else f"g={g:+.2f}" for g in scores])
        module.model.train(training)

    def _cache_key(self, module: Any) -> str:
        weights = weights_file(checkpoint_folder(module.checkpoint), "auto")
        identity = {"weights": hashlib.sha256(weights.read_bytes()).hexdigest(), "judge": module.scoring.judge,
                    "settings": settings_of(self.benchmark), "grid_prompts": self.grid_prompts,
                    "summary": SUMMARY_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def _measure_base(self, module: Any) -> None:
        """The base measurement, from the cache when this checkpoint was measured with these settings before."""
        if self.base_cache is None:
            self._measure("base", module)
            return
        key = self._cache_key(module)
        summary_path, panel_path = self.base_cache / f"{key}.json", self.base_cache / f"{key}.safetensors"
        if summary_path.is_file() and panel_path.is_file():
            cached = json.loads(summary_path.read_text())
            tensors = load_file(panel_path)
            count = len(cached["captions"])
            self.summaries["base"] = cached["summary"]
            self.panels["base"] = ([tensors[f"image_{i}"] for i in range(count)],
                                   [tensors[f"map_{i}"] for i in range(count)], cached["captions"])
            return
        self._measure("base", module)
        images, maps, captions = self.panels["base"]
        self.base_cache.mkdir(parents=True, exist_ok=True)
        write_safetensors_state(panel_path, {**{f"image_{i}": x for i, x in enumerate(images)},
                                             **{f"map_{i}": m.float() for i, m in enumerate(maps)}}, None)
        write_json(summary_path, {"summary": self.summaries["base"], "captions": captions})

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            out = Path(trainer.default_root_dir) / "report" if self.out is None else Path(self.out)
            write_report(out, self.summaries, self.panels)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
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
