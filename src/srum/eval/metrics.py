"""Means per group (a category, a tag) with torchmetrics, kept in float64 so that a mean of 0-100 scores is exact
to the last digit a report shows."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric


class GroupedMean:
    """One ``MeanMetric`` per group, made on first use; groups keep the order they were first seen in."""

    def __init__(self) -> None:
        self._metrics: dict[str, MeanMetric] = {}
        self.counts: dict[str, int] = {}
        """Values seen per group."""

    def update(self, group: str, value: float) -> None:
        if group not in self._metrics:
            self._metrics[group] = MeanMetric(nan_strategy="error").set_dtype(torch.float64)
            self.counts[group] = 0
        self._metrics[group].update(torch.tensor(float(value), dtype=torch.float64))
        self.counts[group] += 1

    def compute(self) -> dict[str, float]:
        return {group: float(metric.compute()) for group, metric in self._metrics.items()}
