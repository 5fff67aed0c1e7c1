"""Example third-party defense: bound every client update's L2 norm (run with --plugin clip_defense)."""
import torch

from defenses import DEFENSES, Defense


@DEFENSES.register("clip-example")
class ClipUpdates(Defense):
    """Scale each client's update (trained minus global weights) down to L2 norm <= ``max_norm``."""

    consumes = frozenset({"updates"})  # what the defense reads: client updates only
    parameter_space = True  # compares parameters, so it needs one architecture

    def __init__(self, max_norm: float = 5.0):
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def filter_update(self, update, global_model, ctx):
        delta = update.delta(global_model)
        norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
        scale = min(1.0, self.max_norm / (norm + 1e-12))
        start, state = global_model.state_dict(), update.model.state_dict()
        for key, d in delta.items():
            state[key].copy_(start[key] + scale * d)
        return update
