"""Weak differential privacy (Sun et al. 2019): norm clipping plus Gaussian noise on the aggregate."""
import torch

from defenses import DEFENSES
from defenses.normclip import NormClipping
from fl_core.seeding import torch_generator
from fl_core.updates import parameter_mask, state_plus


@DEFENSES.register("weakdp")
class WeakDP(NormClipping):
    """Clip updates (``max_norm``, default the median norm), average, add N(0, ``sigma``^2) to every
    parameter (not BN statistics) of the new global model (Sun et al. use sigma = 0.025)."""

    def __init__(self, max_norm: float | None = None, sigma: float = 0.025):
        super().__init__(max_norm)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def aggregate(self, updates, global_model, ctx):
        mean = self.clipped_mean(updates, global_model)
        noise = torch.randn(mean.shape, generator=torch_generator(ctx.seed, "weakdp", ctx.round)).to(mean.device)
        return state_plus(global_model, mean + self.sigma * noise * parameter_mask(global_model).to(mean.device))
