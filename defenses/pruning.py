"""Dormant-neuron pruning for FL (Wu et al. 2022, "Mitigating backdoor attacks in federated learning"),
with the server's synthetic data in place of client-reported activations (20 % rate, as [P1])."""
import torch
from torch import nn

from defenses import DEFENSES, Defense, acts_now, check_when
from fl_core.activations import channel_means, sites_of


def prune_channels(model: nn.Module, site: str, channels: torch.Tensor, width: int) -> str:
    """Silence ``channels`` of activation ``site`` in the weights themselves (saved and broadcast with the
    model): zero the scale and shift of the BatchNorm that feeds the site (exact: ReLU(0) = 0), or, for
    the last site (``width`` channels), the classifier's input columns (exact behind global pooling).
    Returns which was done."""
    modules = dict(model.named_modules())
    parent_name, _, child = site.rpartition(".")
    parent = modules.get(parent_name)
    if isinstance(parent, nn.Sequential) and child.isdigit() and int(child) > 0 and \
            isinstance(parent[int(child) - 1], nn.BatchNorm2d):
        bn = parent[int(child) - 1]
        with torch.no_grad():
            bn.weight[channels] = 0
            bn.bias[channels] = 0
        return "batchnorm"
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if site == list(sites_of(model))[-1] and linears and linears[-1].in_features == width:
        with torch.no_grad():
            linears[-1].weight[:, channels] = 0
        return "classifier"
    raise ValueError(f"cannot prune site {site!r} in the weights: it is neither fed by a BatchNorm nor the last "
                     "site before the classifier; choose another site")


@DEFENSES.register("pruning")
class DormantPruning(Defense):
    """Rank the channels of the last activation site (``site: null``) by mean activation on the synthetic
    set and prune the ``rate`` least active ones in the weights (``prune_channels``), so the saved and
    broadcast models are the pruned ones. ``when``: ``final`` prunes the model after the last round (as
    Wu et al.), ``every`` after every round."""

    consumes = frozenset({"synthetic"})

    def __init__(self, rate: float = 0.2, site: str | None = None, when: str = "final"):
        if not 0 <= rate < 1:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        check_when(when)
        self.rate, self.site, self.when = rate, site, when
        self._pruned: dict[int, list[int]] = {}

    def dormant_channels(self, model, ctx) -> tuple[str, torch.Tensor, int]:
        """(site name, indices of its ``rate`` least active channels on the synthetic set, its width)."""
        sites = sites_of(model)
        name = self.site or list(sites)[-1]
        if name not in sites:
            raise ValueError(f"site {name!r} unknown; valid: {', '.join(sites)}")
        means = channel_means(model, ctx.synthetic.images, sites=[name])[name]
        return name, means.argsort()[: int(self.rate * len(means))], len(means)

    def after_round(self, global_model, prototype, ctx):
        if not acts_now(self.when, ctx):
            return global_model
        name, channels, width = self.dormant_channels(global_model, ctx)
        prune_channels(global_model, name, channels, width)
        self._pruned[prototype] = sorted(channels.tolist())
        ctx.report(pruned_channels=len(channels))
        return global_model
