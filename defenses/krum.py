"""Krum and Multi-Krum (Blanchard et al. 2017)."""
import torch

from defenses import DEFENSES, Defense
from fl_core.updates import compose_state, deltas


def krum_scores(matrix: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Sum of squared distances from each update to its n - f - 2 nearest others."""
    n = len(matrix)
    if n == 1:
        return torch.zeros(1, dtype=torch.double)
    dist = torch.cdist(matrix.double(), matrix.double()) ** 2
    k = max(1, n - num_byzantine - 2)
    nearest = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dist.device), float("inf"))
    return nearest.sort(dim=1).values[:, : min(k, n - 1)].sum(1)


def recursive_krum(matrix: torch.Tensor, num_byzantine: int, keep: int) -> list[int]:
    """Indices of ``keep`` updates picked one at a time by Krum, each pick removed before the next
    (Bulyan's selection step)."""
    remaining = list(range(len(matrix)))
    chosen = []
    while len(chosen) < keep and remaining:
        scores = krum_scores(matrix[remaining], num_byzantine)
        chosen.append(remaining.pop(int(scores.argmin())))
    return chosen


@DEFENSES.register("krum")
class Krum(Defense):
    """Keep the update(s) with the best Krum scores. ``num_byzantine`` (f, default 1) is the assumed number
    of attackers; ``multi`` = m > 1 averages the m best-scored updates (Multi-Krum; m = n - f when
    ``multi: -1``). The kept updates are the fusion's teachers."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, num_byzantine: int = 1, multi: int = 1):
        if num_byzantine < 0 or multi == 0 or multi < -1:
            raise ValueError("num_byzantine must be >= 0 and multi >= 1 (or -1 for n - f)")
        self.num_byzantine, self.multi = num_byzantine, multi

    def aggregate(self, agg, global_model, ctx):
        matrix = deltas(agg.updates, global_model)
        n = len(matrix)
        keep = max(1, min(n - self.num_byzantine if self.multi == -1 else self.multi, n))
        scores = krum_scores(matrix, self.num_byzantine)
        chosen = sorted(scores.argsort()[:keep].tolist())
        ctx.report(krum_scores={u.client_id: round(float(s), 4) for u, s in zip(agg.updates, scores)})
        kept = [agg.updates[i] for i in chosen]
        return agg.admit(chosen, torch.ones(keep), compose_state(global_model, matrix[chosen].mean(0), kept))
