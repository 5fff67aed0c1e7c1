"""Coordinate-wise median (Yin et al. 2018)."""
from defenses import DEFENSES, Defense
from fl_core.updates import deltas, state_plus


@DEFENSES.register("median")
class CoordinateMedian(Defense):
    """Each coordinate of the new global model moves by the median of the clients' updates."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def aggregate(self, updates, global_model, ctx):
        return state_plus(global_model, deltas(updates, global_model).median(dim=0).values)
