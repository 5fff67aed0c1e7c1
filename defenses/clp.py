"""Channel Lipschitzness-based pruning (CLP; Zheng et al. 2022): data-free backdoor removal."""
import torch
from torch import nn

from defenses import DEFENSES, Defense, acts_now, check_when


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each Conv2d directly followed (in module order) by a BatchNorm2d over its output channels."""
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    return [(a, b) for a, b in zip(modules, modules[1:])
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.num_features == a.out_channels]


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant: spectral norm of its BN-scaled kernel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    kernels = (conv.weight * scale.view(-1, 1, 1, 1)).flatten(2)  # (C_out, C_in, k*k)
    return torch.linalg.matrix_norm(kernels, ord=2)


@DEFENSES.register("clp")
class CLP(Defense):
    """Zero the BN scale and shift of channels whose Lipschitz bound exceeds mean + ``u`` * std within
    their layer (u = 3 in the paper), once after the last round (``when: final``, default: the paper prunes
    a trained model once; pruned channels get no gradient, so ``every`` compounds) or after every round."""

    consumes = frozenset()

    def __init__(self, u: float = 3.0, when: str = "final"):
        if u <= 0:
            raise ValueError(f"u must be > 0, got {u}")
        check_when(when)
        self.u, self.when = u, when
        self._pruned: dict[int, int] = {}

    @torch.no_grad()
    def after_round(self, global_model, prototype, ctx):
        if not acts_now(self.when, ctx):
            return global_model
        pruned = 0
        for conv, bn in conv_bn_pairs(global_model):
            lips = channel_lipschitz(conv, bn)
            bad = lips > lips.mean() + self.u * lips.std()
            bn.weight[bad] = 0
            bn.bias[bad] = 0
            pruned += int(bad.sum())
        self._pruned[prototype] = pruned
        ctx.report(pruned_channels=pruned)
        return global_model
