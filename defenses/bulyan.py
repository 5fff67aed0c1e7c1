"""Bulyan (El Mhamdi et al. 2018): Multi-Krum selection, then a coordinate-wise trimmed mean."""
from defenses import DEFENSES, Defense
from defenses.krum import multi_krum_select
from defenses.trimmedmean import trimmed_mean
from fl_core.updates import deltas, state_plus


@DEFENSES.register("bulyan")
class Bulyan(Defense):
    """Pick theta = n - 2f updates by repeated Krum, then per coordinate average the theta - 2f values
    closest to the median (a trimmed mean dropping f from each side). ``num_byzantine`` = f (default 1)."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, num_byzantine: int = 1):
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        self.num_byzantine = num_byzantine

    def aggregate(self, updates, global_model, ctx):
        matrix = deltas(updates, global_model)
        f = self.num_byzantine
        theta = max(1, len(updates) - 2 * f)
        chosen = multi_krum_select(matrix, f, theta)
        return state_plus(global_model, trimmed_mean(matrix[chosen], f))
