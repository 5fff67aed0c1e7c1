"""Bulyan (El Mhamdi et al. 2018): recursive Krum selection, then per coordinate the mean of the values
closest to the median."""
import torch

from defenses import DEFENSES, Defense
from defenses.krum import recursive_krum
from fl_core.updates import compose_state, deltas, median


def closest_to_median_mean(matrix: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values closest to the coordinate's median."""
    beta = max(1, min(beta, len(matrix)))
    distance = (matrix - median(matrix, dim=0)).abs()
    nearest = distance.argsort(dim=0, stable=True)[:beta]
    return matrix.gather(0, nearest).mean(0)


@DEFENSES.register("bulyan")
class Bulyan(Defense):
    """Pick theta = n - 2f updates by recursive Krum, then per coordinate average the beta = theta - 2f
    values closest to the median. ``num_byzantine`` = f (default 1). The picked updates teach."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, num_byzantine: int = 1):
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        self.num_byzantine = num_byzantine

    def aggregate(self, agg, global_model, ctx):
        matrix = deltas(agg.updates, global_model)
        f = self.num_byzantine
        theta = max(1, len(matrix) - 2 * f)
        chosen = sorted(recursive_krum(matrix, f, theta))
        moved = closest_to_median_mean(matrix[chosen], theta - 2 * f)
        kept = [agg.updates[i] for i in chosen]
        return agg.admit(chosen, torch.ones(len(chosen)), compose_state(global_model, moved, kept))
