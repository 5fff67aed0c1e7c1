"""Coordinate-wise median (Yin et al. 2018)."""
from defenses import DEFENSES, Defense
from fl_core.hooks import Aggregation
from fl_core.updates import compose_state, deltas, median


@DEFENSES.register("median")
class CoordinateMedian(Defense):
    """Each parameter of the new global model moves by the median of the clients' updates (the mean of
    the two middle values for an even count); no client is rejected, all teach."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def aggregate(self, agg, global_model, ctx):
        moved = median(deltas(agg.updates, global_model), dim=0)
        return Aggregation(agg.updates, agg.weights, compose_state(global_model, moved, agg.updates, agg.weights))
