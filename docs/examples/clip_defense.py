"""Example third-party defense: bound every client update's L2 norm (run with --plugin clip_defense)."""
from defenses import DEFENSES, Defense
from fl_core.updates import clip_rows, deltas, set_delta


@DEFENSES.register("clip-example")
class ClipUpdates(Defense):
    """Scale each client's parameter update down to L2 norm <= ``max_norm``. The clipped models are
    averaged (FedAvg) and are what the server distils from: fusion's teachers are the admitted updates."""

    consumes = frozenset({"updates"})  # what the defense reads: client updates only
    parameter_space = True  # compares parameters, so it needs one architecture

    def __init__(self, max_norm: float = 5.0):
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def aggregate(self, agg, global_model, ctx):
        matrix = deltas(agg.updates, global_model)  # (clients, parameters); BatchNorm statistics excluded
        for update, row in zip(agg.updates, clip_rows(matrix, self.max_norm)):
            set_delta(update, global_model, row)  # the update's model is now the clipped one
        norms = matrix.norm(dim=1).tolist()
        ctx.report(clipped=[u.client_id for u, n in zip(agg.updates, norms) if n > self.max_norm])  # -> rounds.csv
        return agg  # every client admitted with its weight; no state given: FedAvg of the clipped models
