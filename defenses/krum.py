"""Krum and Multi-Krum (Blanchard et al. 2017)."""
import torch

from defenses import DEFENSES, Defense
from fl_core.updates import deltas, state_plus


def krum_scores(matrix: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Sum of squared distances from each update to its n - f - 2 nearest others."""
    n = len(matrix)
    dist = torch.cdist(matrix.double(), matrix.double()) ** 2
    k = max(1, n - num_byzantine - 2)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf"))
    return nearest.sort(dim=1).values[:, : min(k, n - 1)].sum(1)


def multi_krum_select(matrix: torch.Tensor, num_byzantine: int, keep: int) -> list[int]:
    """Indices of the ``keep`` updates chosen by repeated Krum (each pick removed before the next)."""
    remaining = list(range(len(matrix)))
    chosen = []
    while len(chosen) < keep and remaining:
        scores = krum_scores(matrix[remaining], num_byzantine) if len(remaining) > 1 else torch.zeros(1)
        chosen.append(remaining.pop(int(scores.argmin())))
    return chosen


@DEFENSES.register("krum")
class Krum(Defense):
    """Keep the update(s) closest to their neighbours. ``num_byzantine`` (f, default 1) is the assumed number
    of attackers; ``multi`` = m > 1 averages the m best (Multi-Krum; m = n - f when ``multi: -1``)."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, num_byzantine: int = 1, multi: int = 1):
        if num_byzantine < 0 or multi == 0 or multi < -1:
            raise ValueError("num_byzantine must be >= 0 and multi >= 1 (or -1 for n - f)")
        self.num_byzantine, self.multi = num_byzantine, multi

    def aggregate(self, updates, global_model, ctx):
        matrix = deltas(updates, global_model)
        keep = len(updates) - self.num_byzantine if self.multi == -1 else self.multi
        chosen = multi_krum_select(matrix, self.num_byzantine, max(1, min(keep, len(updates))))
        return state_plus(global_model, matrix[chosen].mean(0))
