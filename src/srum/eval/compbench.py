"""T2I-CompBench scores under the official SRUM judge protocol (srum-method.md §9.5), two ways side by side.

- ``official``: what the official scripts compute; an unreadable answer counts as -1 in its category's mean.
- ``score``: srum's number; unreadable and out-of-range answers are left out of the mean and counted.

Both aggregate alike: a mean per category; **Complex** is the unweighted mean of the complex, complex-action and
complex-spatial means (300, 212 and 58 prompts in ``val_comp.json``); **Overall** is the mean of the 8 reported
columns (7 base categories and Complex).
"""

from __future__ import annotations

import re
from statistics import fmean

from srum.eval.metrics import GroupedMean

COLUMNS: dict[str, tuple[str, ...]] = {
    "3D spatial": ("3d_spatial",),
    "Color": ("color",),
    "Complex": ("complex", "complex_action", "complex_spatial"),
    "Non-spatial": ("non_spatial",),
    "Numeracy": ("numeracy",),
    "Shape": ("shape",),
    "2D spatial": ("spatial",),
    "Texture": ("texture",),
}
"""The reported columns, in the official README's order, and the categories each one averages unweighted."""

AGGREGATION = ("per category: mean of the image scores; Complex: unweighted mean of the complex, complex_action and "
               "complex_spatial means; Overall: mean of the 8 columns. official: a judge failure counts as -1; "
               "score: failures (unreadable or outside 0-100) are left out and counted")
UNCATEGORISED = "uncategorised"


def category_key(name: str | None) -> str:
    """One spelling per category: ``non-spatial``, ``3d spatial`` and ``Complex_Action`` become ``non_spatial``,
    ``3d_spatial`` and ``complex_action``."""
    return re.sub(r"[\s_-]+", "_", name.strip().lower()) if name else UNCATEGORISED


def columns(category_means: dict[str, float]) -> dict[str, float | None]:
    """The 8 reported columns and Overall from per-category means; a column that lacks one of its categories is
    None, and so is Overall then."""
    means = {category_key(name): value for name, value in category_means.items()}
    table: dict[str, float | None] = {}
    for column, parts in COLUMNS.items():
        values = [means.get(part) for part in parts]
        table[column] = None if None in values else fmean(values)
    table["Overall"] = None if None in table.values() else fmean(table.values())
    return table


def summarise(judgements: list[dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(the reported columns, the per-category breakdown) of judgement records (``category``, ``score``: a number
    or None, ``official_score``)."""
    clean, official = GroupedMean(), GroupedMean()
    failures: dict[str, int] = {}
    for judgement in judgements:
        category = category_key(judgement.get("category"))
        official.update(category, judgement["official_score"])
        failures[category] = failures.get(category, 0) + (judgement["score"] is None)
        if judgement["score"] is not None:
            clean.update(category, judgement["score"])
    clean_means, official_means = clean.compute(), official.compute()
    reported_clean, reported_official = columns(clean_means), columns(official_means)
    metrics = {column: {"score": reported_clean[column], "official": reported_official[column]}
               for column in reported_clean}
    details = {category: {"images": official.counts[category], "failures": failures[category],
                          "score": clean_means.get(category), "official": official_means[category]}
               for category in official_means}
    return metrics, details
