"""Robust learning rate (RLR; Ozdayi et al. 2021)."""
from defenses import DEFENSES, Defense
from fl_core.updates import deltas, sample_weights, state_plus, weighted_mean


@DEFENSES.register("rlr")
class RobustLearningRate(Defense):
    """Per coordinate, if fewer than ``threshold`` clients' update signs agree (|sum of signs| < threshold),
    the server learning rate is -1 there (the move is reversed), else +1. ``threshold: null`` uses
    40 % of the round's clients (the paper uses 4 of 10)."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, threshold: int | None = None):
        if threshold is not None and threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.threshold = threshold

    def aggregate(self, updates, global_model, ctx):
        matrix = deltas(updates, global_model)
        threshold = self.threshold or max(1, round(0.4 * len(updates)))
        agreement = matrix.sign().sum(0).abs()
        lr = (agreement >= threshold).float() * 2 - 1
        return state_plus(global_model, lr * weighted_mean(matrix, sample_weights(updates)))
