"""Weak differential privacy (Sun et al. 2019): norm clipping plus Gaussian noise on the aggregate."""
from defenses import DEFENSES
from defenses.normclip import NormClipping
from fl_core.updates import add_noise, parameter_noise


@DEFENSES.register("weakdp")
class WeakDP(NormClipping):
    """Clip updates (``max_norm``, default the median norm), average, add N(0, ``sigma``^2) to every
    parameter (not BN statistics) of the new global model (Sun et al. use sigma = 0.025). The same noise
    is added to every clipped teacher, so fusion distils from what the aggregate is made of."""

    def __init__(self, max_norm: float | None = None, sigma: float = 0.025):
        super().__init__(max_norm)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = sigma

    def aggregate(self, agg, global_model, ctx):
        noise = parameter_noise(global_model, self.sigma, ctx.seed, "weakdp", ctx.round)
        return add_noise(self.clip(agg, global_model, ctx), global_model, noise)
