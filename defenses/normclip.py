"""Norm thresholding (NormThr; Sun et al. 2019, "Can you really backdoor federated learning?")."""
from defenses import DEFENSES, Defense
from fl_core.hooks import Aggregation
from fl_core.updates import clip_rows, deltas, median, set_delta


@DEFENSES.register("normclip")
class NormClipping(Defense):
    """Clip each client update's parameters to L2 norm ``max_norm``, then FedAvg; the clipped models are
    also the fusion's teachers. ``max_norm: null`` (default) uses the median norm of the round's updates
    (adaptive, as in FLAME's clipping)."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, max_norm: float | None = None):
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def clip(self, agg, global_model, ctx) -> Aggregation:
        """The aggregation with every admitted model clipped in place; reports norms and the bound."""
        matrix = deltas(agg.updates, global_model)
        norms = matrix.norm(dim=1)
        bound = float(median(norms)) if self.max_norm is None else self.max_norm
        for update, row in zip(agg.updates, clip_rows(matrix, bound)):
            set_delta(update, global_model, row)
        ctx.report(norms=[round(float(n), 4) for n in norms], clip_bound=round(bound, 4))
        return Aggregation(agg.updates, agg.weights)  # FedAvg of the clipped models

    def aggregate(self, agg, global_model, ctx):
        return self.clip(agg, global_model, ctx)
