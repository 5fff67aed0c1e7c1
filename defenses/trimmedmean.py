"""Coordinate-wise trimmed mean (Yin et al. 2018)."""
import torch

from defenses import DEFENSES, Defense
from fl_core.updates import deltas, state_plus


def trimmed_mean(matrix: torch.Tensor, trim: int) -> torch.Tensor:
    """Per coordinate, the mean after dropping the ``trim`` largest and ``trim`` smallest values."""
    n = len(matrix)
    trim = min(trim, (n - 1) // 2)
    return matrix.sort(dim=0).values[trim: n - trim].mean(0)


@DEFENSES.register("trimmedmean")
class TrimmedMean(Defense):
    """Drop the ``beta`` share (default 0.1, at least one when beta > 0) of the largest and of the smallest
    values of each coordinate, average the rest."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, beta: float = 0.1):
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, updates, global_model, ctx):
        n = len(updates)
        trim = max(1, int(self.beta * n)) if self.beta > 0 else 0
        return state_plus(global_model, trimmed_mean(deltas(updates, global_model), trim))
