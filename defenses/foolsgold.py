"""FoolsGold (Fung et al. 2020): down-weight clients whose update histories look alike (sybils)."""
import torch

from defenses import DEFENSES, Defense
from fl_core.hooks import Aggregation
from fl_core.updates import compose_state, deltas


def foolsgold_weights(history: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-client learning-rate weights in [0, 1] from the (n, d) matrix of summed past updates."""
    n = len(history)
    if n == 1:
        return torch.ones(1)
    unit = torch.nn.functional.normalize(history.double(), dim=1)
    cs = unit @ unit.T - torch.eye(n, dtype=torch.double)
    max_cs = cs.max(dim=1).values
    # pardoning: honest clients similar to a sybil are not punished as much
    pardon = max_cs[:, None] < max_cs[None, :]
    cs = torch.where(pardon, cs * max_cs[:, None] / max_cs[None, :], cs)
    wv = (1 - cs.max(dim=1).values).clamp(0, 1)
    wv = wv / wv.max().clamp_min(eps)
    wv[wv == 1] = 0.99
    wv = torch.log(wv / (1 - wv) + eps) + 0.5
    wv[torch.isinf(wv) | (wv > 1)] = 1
    return wv.clamp(0, 1).float()


@DEFENSES.register("foolsgold")
class FoolsGold(Defense):
    """Keep each client's running sum of updates; clients whose sums point the same way (cosine similarity)
    get a small weight in the average and in the teacher ensemble. The state carries across rounds."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self):
        self._history: dict[int, torch.Tensor] = {}

    def aggregate(self, agg, global_model, ctx):
        matrix = deltas(agg.updates, global_model)
        for u, row in zip(agg.updates, matrix):
            self._history[u.client_id] = self._history.get(u.client_id, torch.zeros_like(row)) + row
        wv = foolsgold_weights(torch.stack([self._history[u.client_id] for u in agg.updates]))
        weights = agg.weights.float() * wv
        moved = (weights.to(matrix.device)[:, None] * matrix).sum(0) / weights.sum() if weights.sum() > 0 else \
            torch.zeros_like(matrix[0])
        ctx.report(weights={u.client_id: round(float(w), 4) for u, w in zip(agg.updates, weights)})
        return Aggregation(agg.updates, weights, compose_state(global_model, moved, agg.updates, weights))
