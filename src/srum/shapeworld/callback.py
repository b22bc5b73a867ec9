"""The ShapeWorld benchmark inside Lightning: ``srum fit`` measures the model before and after training and
reports both; ``srum validate`` measures the model it is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from srum.shapeworld.benchmark import BenchmarkConfig, Evaluation, run_benchmark, settings_of
from srum.shapeworld.report import write_report


class ShapeWorldBenchmark(L.Callback):
    """Args:
        out: report folder (``report.json``, ``report.md``, ``grid.png``).
        benchmark: what is drawn and judged.
        grid_prompts: test prompts shown in the grid, each model's image over its self-reward map.
        base_report: ``report.json`` of an earlier run from the same checkpoint with the same benchmark
            settings: its base numbers are reused instead of measured again (arms and seeds of one study share
            them; the grid then shows the tuned model only).
    """

    def __init__(self, out: Path = Path("runs/shapes/report"), benchmark: BenchmarkConfig = BenchmarkConfig(),
                 grid_prompts: int = 8, base_report: Path | None = None) -> None:
        self.out, self.benchmark, self.grid_prompts = Path(out), benchmark, grid_prompts
        self.base_report = base_report
        self.summaries: dict[str, dict] = {}
        self.panels: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = {}

    def _measure(self, name: str, module: Any) -> Evaluation:
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
        return evaluation

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            write_report(self.out, self.summaries, self.panels)

    def _reused_base(self) -> dict:
        path = Path(self.base_report)
        try:
            base = json.loads(path.read_text())["models"]["base"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: expected a ShapeWorld fit report with models.base ({error})") from None
        wanted = json.loads(json.dumps(settings_of(self.benchmark)))
        if base.get("settings") != wanted:
            raise ValueError(f"{path}: field models.base.settings differs from this run's benchmark settings "
                             f"(expected {wanted})")
        return base

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if "base" in self.summaries:  # a resumed run keeps the base measured at its start
            return
        if self.base_report is not None:
            self.summaries["base"] = self._reused_base()
        else:
            self._measure("base", pl_module)

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
