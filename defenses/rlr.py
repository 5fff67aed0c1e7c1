"""Robust learning rate (RLR; Ozdayi et al. 2021)."""
from defenses import DEFENSES, Defense
from fl_core.hooks import Aggregation
from fl_core.updates import compose_state, deltas, sample_weights, weighted_mean


@DEFENSES.register("rlr")
class RobustLearningRate(Defense):
    """Per coordinate, if fewer than ``threshold`` clients' update signs agree (|sum of signs| < threshold),
    the server learning rate is -1 there (the move is reversed), else +1; trainable parameters only (BN
    statistics are averaged). ``threshold: null`` uses 40 % of the round's clients (the paper uses 4 of 10)."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, threshold: int | None = None):
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold = threshold

    def aggregate(self, agg, global_model, ctx):
        matrix = deltas(agg.updates, global_model)
        threshold = self.threshold or max(1, round(0.4 * len(agg.updates)))
        agreement = matrix.sign().sum(0).abs()
        lr = (agreement >= threshold).float() * 2 - 1
        ctx.report(reversed_share=round(float((lr < 0).float().mean()), 4))
        moved = lr * weighted_mean(matrix, agg.weights.float() * sample_weights(agg.updates))
        return Aggregation(agg.updates, agg.weights, compose_state(global_model, moved, agg.updates, agg.weights))
