"""Dormant-neuron pruning for FL (Wu et al. 2022, "Mitigating backdoor attacks in federated learning"),
with the server's synthetic data in place of client-reported activations (20 % rate, as [P1])."""
import torch

from defenses import DEFENSES, Defense, acts_now, check_when
from fl_core.activations import OutputTransforms, channel_means, sites_of


@DEFENSES.register("pruning")
class DormantPruning(Defense):
    """Rank the channels of the last activation site (``site: null``) by mean activation on the synthetic
    set and mask the ``rate`` least active ones (forward-hook masks; weights untouched). ``when``:
    ``final`` prunes the model after the last round (as Wu et al.), ``every`` after every round."""

    consumes = frozenset({"synthetic"})

    def __init__(self, rate: float = 0.2, site: str | None = None, when: str = "final"):
        if not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        check_when(when)
        self.rate, self.site, self.when = rate, site, when
        self._masks: dict[int, OutputTransforms] = {}
        self._pruned: dict[int, list[int]] = {}

    def channel_mask(self, model, ctx) -> tuple[str, torch.Tensor]:
        """(site name, 0/1 keep-mask over its channels): the ``rate`` least active channels are 0."""
        sites = sites_of(model)
        name = self.site or list(sites)[-1]
        if name not in sites:
            raise ValueError(f"site {name!r} unknown; valid: {', '.join(sites)}")
        means = channel_means(model, ctx.synthetic.images, sites=[name])[name]
        keep = torch.ones_like(means)
        keep[means.argsort()[: int(self.rate * len(means))]] = 0
        return name, keep

    def after_round(self, global_model, prototype, ctx):
        if not acts_now(self.when, ctx):
            return global_model
        masks = self._masks.setdefault(prototype, OutputTransforms())
        masks.remove()
        name, keep = self.channel_mask(global_model, ctx)
        masks.attach(sites_of(global_model)[name], lambda out: out * keep.view(1, -1, *([1] * (out.dim() - 2))))
        self._pruned[prototype] = (keep == 0).nonzero().flatten().tolist()
        return global_model
