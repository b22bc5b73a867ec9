"""Learning curves of ShapeWorld runs: the model measured on validation prompts every few optimizer steps, so
settings (learning rate, steps, reward rule) are chosen on the validation split rather than the test split, and a
run that peaks and then collapses shows as a curve instead of hiding behind its final number."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from statistics import fmean as mean
from typing import Any

import lightning as L
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from srum.io.atomic import atomic_write
from srum.io.jsonl import write_json
from srum.shapeworld.benchmark import shapeworld_sampler
from srum.shapeworld.evaluate import evaluate_generation
from srum.shapeworld.world import prompts as world_prompts

log = logging.getLogger(__name__)

SETTINGS = ("split", "prompts", "seed")
"""What makes two curves' points comparable: the same prompts and noise seeds."""


class LearningCurve(L.Callback):
    """Args:
        every_n_steps: optimizer steps between measurements (also measured at the start and at the last step).
        prompts: prompts of the split, one image each, with the same seeds at every step (paired images, so
            the curve moves with the model rather than with the draw).
        split: prompt split; ``val`` so that choosing settings by the curve leaves the test split untouched.
        seed: seed of the prompt list and of every image's noise.
        out: folder of ``curve.json`` and ``curve.png``; default ``<default_root_dir>/report``.
    """

    def __init__(self, every_n_steps: int = 10, prompts: int = 300, split: str = "val", seed: int = 0,
                 out: Path | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected >= 1, got {every_n_steps}")
        if prompts < 1:
            raise ValueError(f"prompts: expected >= 1, got {prompts}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split: expected train, val or test, got {split!r}")
        self.every_n_steps, self.prompts, self.split, self.seed = every_n_steps, prompts, split, seed
        self.out = None if out is None else Path(out)
        self.points: list[dict] = []
        self._prompt_list = world_prompts(split, prompts, seed)

    def settings(self) -> dict:
        return {"split": self.split, "prompts": self.prompts, "seed": self.seed}

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "report" if self.out is None else self.out

    def _measured(self, step: int) -> bool:
        return any(p["step"] == step for p in self.points)

    def _measure(self, trainer: L.Trainer, module: Any) -> None:
        """Measure the model at ``trainer.global_step`` in eval mode (its mode restored after), inside a forked
        torch random state so that measuring does not shift the run's own random draws."""
        step = trainer.global_step
        model = module.model
        training = model.training
        device = next(model.parameters()).device
        try:
            model.eval()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                result = evaluate_generation(module.pipeline, self._prompt_list, shapeworld_sampler(),
                                             seed=self.seed, batch_size=100)
        finally:
            model.train(training)
        point = {"step": step, "pass_rate": sum(v.passed for v in result.verdicts) / len(result.verdicts),
                 "overall": result.report["overall"],
                 "categories": {name: c["score"] for name, c in result.report["categories"].items()}}
        self.points.append(point)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"val_curve/pass_rate": point["pass_rate"], "val_curve/overall": point["overall"]},
                                   step=step)
            self._write(self._folder(trainer))
        log.info("learning curve: step %d, pass rate %.1f%%, overall %.1f", step, 100 * point["pass_rate"],
                 point["overall"])

    def _write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        curve = {**self.settings(), "points": self.points}
        write_json(folder / "curve.json", curve)
        plot_curves({"run": [curve]}, folder / "curve.png")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.settings())  # a val and a train curve in one run keep apart

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Step 0 of a new run (here, not in ``on_fit_start``, where a resumed run's step is not restored yet);
        a resumed run measures its step unless its curve has it."""
        if not self._measured(trainer.global_step):
            self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps: accumulated micro-batches see the same step, measured once
        if step % self.every_n_steps == 0 and not self._measured(step):
            self._measure(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self._measured(trainer.global_step):
            self._measure(trainer, pl_module)
        if trainer.is_global_zero:
            Console().print(self.table())

    def table(self) -> Table:
        """The curve as a terminal table (beside the benchmark's base-vs-tuned table at the end of a fit)."""
        table = Table(title=f"Learning curve ({self.split} split, {self.prompts} prompts)")
        for header in ("step", "pass rate %", "overall"):
            table.add_column(header, justify="right")
        for point in self.points:
            table.add_row(str(point["step"]), f"{100 * point['pass_rate']:.1f}", f"{point['overall']:.1f}")
        return table

    def state_dict(self) -> dict[str, Any]:
        return {**self.settings(), "points": list(self.points)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run continues its curve; points of other prompts or seeds would not be comparable."""
        saved = {name: state_dict.get(name) for name in SETTINGS}
        if saved != self.settings():
            raise ValueError(f"trainer.callbacks LearningCurve: the checkpoint's curve was measured with {saved}, "
                             f"this run measures with {self.settings()}; resume with the same split, prompts "
                             f"and seed (or start a new run)")
        self.points = list(state_dict.get("points", []))


def read_curve(path: Path) -> dict:
    """A ``curve.json`` written by ``LearningCurve``; errors name the file."""
    try:
        curve = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the curve ({error})") from None
    points = curve.get("points") if isinstance(curve, dict) else None
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path}: field 'points' missing or empty: expected the curve.json of a run with the "
                         f"LearningCurve callback")
    for index, point in enumerate(points):
        missing = [k for k in ("step", "pass_rate", "overall") if not isinstance(point, dict) or k not in point]
        if missing:
            raise ValueError(f"{path}: points[{index}]: field(s) {', '.join(missing)} missing")
    return curve


def _band(curves: list[dict], arm: str) -> tuple[list[int], dict[str, tuple[list[float], ...]]]:
    """Steps present in every curve of the arm, and per metric the mean, min and max over the curves there."""
    by_step = [{int(p["step"]): p for p in curve["points"]} for curve in curves]  # a repeated step: the last
    steps = sorted(set.intersection(*(set(points) for points in by_step)))
    if not steps:
        raise ValueError(f"arms.{arm}: its curves have no step in common")
    scale = {"pass_rate": 100.0, "overall": 1.0}
    series = {}
    for metric, factor in scale.items():
        values = [[factor * points[s][metric] for points in by_step] for s in steps]
        series[metric] = ([mean(v) for v in values], [min(v) for v in values], [max(v) for v in values])
    return steps, series


def plot_curves(arms: dict[str, list[dict]], path: Path) -> dict[str, list[int]]:
    """Draw the learning curves of several arms in one figure, so the arms of a study are compared by their
    whole trajectory: per arm the mean over its runs (seeds) at the steps all of them measured, with a min-max
    band; pass rate (%) and overall score side by side. Writes ``path`` (PNG) atomically and returns the steps
    drawn per arm."""
    if not arms:
        raise ValueError("arms: expected at least one arm with curves")
    figure = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, 2)
    drawn = {}
    for arm, curves in arms.items():
        if not curves:
            raise ValueError(f"arms.{arm}: expected at least one curve")
        steps, series = _band(curves, arm)
        drawn[arm] = steps
        label = arm if len(curves) == 1 else f"{arm} (n={len(curves)})"
        for axis, metric in zip(panels, ("pass_rate", "overall"), strict=True):
            middle, low, high = series[metric]
            (line,) = axis.plot(steps, middle, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
            if len(curves) > 1:
                axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    for axis, title in zip(panels, ("pass rate (%)", "overall score (0-100)"), strict=True):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    if len(arms) > 1 or any(len(curves) > 1 for curves in arms.values()):
        panels[0].legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    return drawn
