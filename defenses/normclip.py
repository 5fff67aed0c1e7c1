"""Norm thresholding (NormThr; Sun et al. 2019, "Can you really backdoor federated learning?")."""
from defenses import DEFENSES, Defense
from fl_core.updates import clip_rows, deltas, sample_weights, state_plus, weighted_mean


@DEFENSES.register("normclip")
class NormClipping(Defense):
    """Clip each client update to L2 norm ``max_norm`` before FedAvg. ``max_norm: null`` (default) uses the
    median norm of the round's updates (adaptive, as in FLAME's clipping)."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, max_norm: float | None = None):
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def bound(self, matrix):
        return matrix.norm(dim=1).median() if self.max_norm is None else self.max_norm

    def clipped_mean(self, updates, global_model):
        """Sample-weighted mean of the clipped update vectors."""
        matrix = deltas(updates, global_model)
        return weighted_mean(clip_rows(matrix, self.bound(matrix)), sample_weights(updates))

    def aggregate(self, updates, global_model, ctx):
        return state_plus(global_model, self.clipped_mean(updates, global_model))
