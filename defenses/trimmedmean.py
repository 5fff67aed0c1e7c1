"""Coordinate-wise trimmed mean (Yin et al. 2018)."""
import torch

from defenses import DEFENSES, Defense
from fl_core.hooks import Aggregation
from fl_core.updates import compose_state, deltas


def trimmed_mean(matrix: torch.Tensor, trim: int) -> torch.Tensor:
    """Per coordinate, the mean after dropping the ``trim`` largest and ``trim`` smallest values."""
    n = len(matrix)
    trim = min(trim, (n - 1) // 2)
    return matrix.sort(dim=0).values[trim: n - trim].mean(0)


@DEFENSES.register("trimmedmean")
class TrimmedMean(Defense):
    """Drop the ``beta`` share (default 0.1, at least one when beta > 0) of the largest and of the smallest
    values of each parameter, average the rest; no client is rejected, all teach."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, beta: float = 0.1):
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, agg, global_model, ctx):
        trim = max(1, int(self.beta * len(agg.updates))) if self.beta > 0 else 0
        moved = trimmed_mean(deltas(agg.updates, global_model), trim)
        return Aggregation(agg.updates, agg.weights, compose_state(global_model, moved, agg.updates, agg.weights))
