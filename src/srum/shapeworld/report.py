"""A ShapeWorld report: one or more evaluated models (base and SRUM, say) as JSON, a Markdown table, a rich table
on the terminal, and PNG grids of the same prompts drawn by each with their self-reward maps overlaid."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from srum.io.atomic import atomic_write
from srum.io.jsonl import replace_text, write_json
from srum.reward.grid import reward_grid


def rows(summaries: dict[str, dict]) -> list[tuple[str, list[float]]]:
    """(metric, one value per model) in display order: categories, overall, pass rate, judge (overall, clean and
    per kind of mistake), agreement, then the other judge readouts."""
    first = next(iter(summaries.values()))
    names = list(first["categories"])
    out = [(name, [s["categories"][name]["score"] for s in summaries.values()]) for name in names]
    out.append(("overall", [s["overall"] for s in summaries.values()]))
    out.append(("pass rate %", [100 * s["pass_rate"] for s in summaries.values()]))
    for kind in ("seen", "unseen"):
        out.append((f"pass rate, {kind} pairs %", [100 * s["pass_rate_by_combination"][kind]
                                                  for s in summaries.values()]))
    out.append(("judge balanced acc. %", [100 * s["judge"]["balanced_accuracy"] for s in summaries.values()]))
    out.append(("judge accepts clean %", [100 * s["judge"]["clean_accepted"] for s in summaries.values()]))
    for kind in first["judge"]["wrong_rejected_by_kind"]:
        out.append((f"judge rejects {kind} %", [100 * s["judge"]["wrong_rejected_by_kind"][kind]
                                                for s in summaries.values()]))
    out.append(("agreement with checker %", [100 * s["agreement_with_checker"] for s in summaries.values()]))
    for readout in list(first.get("readouts", {}))[1:]:  # the first readout is the judge above
        values = [s["readouts"][readout] for s in summaries.values()]
        out.append((f"judge by {readout}: balanced acc. %", [100 * v["judge"]["balanced_accuracy"] for v in values]))
        out.append((f"judge by {readout}: agreement %", [100 * v["agreement_with_checker"] for v in values]))
    return out


def _headers(summaries: dict[str, dict]) -> list[str]:
    labels = list(summaries)
    return labels + ([f"{labels[-1]} - {labels[0]}"] if len(labels) > 1 else [])


def _cells(values: list[float]) -> list[str]:
    cells = [f"{v:.1f}" for v in values]
    return cells + ([f"{values[-1] - values[0]:+.1f}"] if len(values) > 1 else [])


def markdown_table(summaries: dict[str, dict]) -> str:
    headers = ["metric", *_headers(summaries)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join([name, *_cells(values)]) + " |" for name, values in rows(summaries)]
    return "\n".join(lines) + "\n"


def rich_table(summaries: dict[str, dict], title: str = "ShapeWorld (test split)") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for header in _headers(summaries):
        table.add_column(header, justify="right")
    for name, values in rows(summaries):
        table.add_row(name, *_cells(values))
    return table


def check_finite(value, where: str = "report") -> None:
    """Every number of a JSON-ready structure is finite (a report with NaN in it is a failed run)."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_finite(item, f"{where}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value}")


GRID_CELL = 144
"""Pixels per image side in the grid: small images are enlarged (nearest) so the captions fit under them."""


def _enlarged(image: torch.Tensor) -> torch.Tensor:
    factor = max(1, GRID_CELL // max(image.shape[:2]))
    return image.repeat_interleave(factor, 0).repeat_interleave(factor, 1)


def grid(panels: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]]) -> Image.Image:
    """One reward grid per model (images over their overlays), stacked top to bottom in the given order."""
    parts = [reward_grid([_enlarged(i) for i in images], maps, [f"{label}: {c}" for c in captions])
             for label, (images, maps, captions) in panels.items()]
    out = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    top = 0
    for part in parts:
        out.paste(part, (0, top))
        top += part.height
    return out


def _cell(values: torch.Tensor) -> str:
    spread = f" +- {float(values.std()):.1f}" if len(values) > 1 else ""  # one run has no spread
    return f"{float(values.mean()):+.1f}{spread}"


def _differences(runs: list[dict], metric: str) -> torch.Tensor:
    return torch.tensor([run["difference"][metric] for run in runs], dtype=torch.float64)


def summarize(reports: dict[str, list[dict]], ceiling: str | None = None, paired_with: str | None = None) -> Table:
    """Mean +- standard deviation over runs (seeds) of each arm's ``srum - base`` difference: ``reports`` maps an
    arm's name to its runs' ``report.json`` contents.

    ``ceiling`` names the arm of perfect supervision: each arm's mean pass-rate and overall gains are then also
    given as a share of its. ``paired_with`` names a control arm: each arm's differences from it, run by run (runs
    are paired by position, i.e. by seed), mean +- std."""
    for name in (ceiling, paired_with):
        if name is not None and name not in reports:
            raise ValueError(f"{name}: expected the name of an arm ({', '.join(reports)})")
    table = Table(title="ShapeWorld: SRUM - base, mean +- std over runs")
    table.add_column("metric")
    for arm, runs in reports.items():
        table.add_column(f"{arm} (n={len(runs)})", justify="right")
    metrics = [name for name, _ in rows(next(iter(reports.values()))[0]["models"])]
    for metric in metrics:
        table.add_row(metric, *[_cell(_differences(runs, metric)) for runs in reports.values()])
    if ceiling is not None:
        for metric in ("pass rate %", "overall"):
            top = float(_differences(reports[ceiling], metric).mean())
            table.add_row(f"{metric}: share of {ceiling}'s gain",
                          *[f"{100 * float(_differences(runs, metric).mean()) / top:.0f} %" if top > 0
                            else f"n/a ({ceiling} gained {top:+.1f})" for runs in reports.values()])
    if paired_with is not None:
        control = reports[paired_with]
        for metric in ("pass rate %", "overall"):
            cells = []
            for runs in reports.values():
                if len(runs) != len(control):
                    raise ValueError(f"paired_with {paired_with}: expected as many runs as each arm ({len(control)}), "
                                     f"got {len(runs)}")
                cells.append(_cell(_differences(runs, metric) - _differences(control, metric)))
            table.add_row(f"{metric}: paired - {paired_with}", *cells)
    return table


def write_report(folder: Path, summaries: dict[str, dict], panels: dict | None = None,
                 console: Console | None = None) -> dict:
    """Writes ``report.json``, ``report.md`` and (with ``panels``) ``grid.png`` into ``folder``; prints the table.
    Files are replaced atomically, so an interrupted write leaves the previous report whole."""
    report = {"benchmark": "shapeworld", "models": summaries}
    if len(summaries) > 1:
        report["difference"] = {name: values[-1] - values[0] for name, values in rows(summaries)}
    check_finite(report)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", report)
    replace_text(folder / "report.md", "# ShapeWorld report\n\n" + markdown_table(summaries))
    if panels:
        atomic_write(folder / "grid.png", lambda temporary: grid(panels).save(temporary, format="PNG"))
    (console or Console()).print(rich_table(summaries))
    return report
