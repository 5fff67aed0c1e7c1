"""What the synthetic-set defenses share: features and logits of a model on the server's synthetic set,
re-training a model from a fresh initialisation on the samples kept, and the filter-then-retrain
schedule (detect on the pre-trained model before round 1 is broadcast, retrain without the flagged
samples, leave them out of every fusion). Not a defense itself (the leading underscore keeps it out
of the registry)."""
from __future__ import annotations

import torch
from torch import nn

from defenses import Defense
from fl_core.data import batch_loader, to_float
from fl_core.hooks import ClientTraining, FusionPlan, ServerContext
from fl_core.modules import SupervisedModule, fit
from fl_core.seeding import derive_seed


def head(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (its classifier head): its input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(model).__name__} has no linear classifier head")
    return linears[-1]


@torch.no_grad()
def features_and_logits(model: nn.Module, images: torch.Tensor, device: torch.device,
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, D) and logits (N, classes) of uint8 images, eval mode, on the CPU."""
    feats: list[torch.Tensor] = []
    hook = head(model).register_forward_hook(lambda m, args, out: feats.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        logits = [model(to_float(images[i: i + batch_size].to(device))).float().cpu()
                  for i in range(0, len(images), batch_size)]
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh, seeded parameters for every layer that can reset itself (BatchNorm statistics too)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()


def retrain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: ClientTraining, seed: int,
            accelerator: str) -> None:
    """Re-initialise ``model`` and train it with the server's pre-training ``recipe`` on the given samples."""
    reinitialise(model, derive_seed(seed, "retrain-init"))
    if recipe.epochs < 1 or not len(labels):
        return
    batch = recipe.optim.batch_size
    steps = recipe.epochs * -(-len(labels) // batch)
    loader = batch_loader(images, labels, batch, derive_seed(seed, "retrain"), steps=steps)
    fit(SupervisedModule(model, recipe.optim, recipe.augment, derive_seed(seed, "retrain-aug")), loader, accelerator)


class FilterThenRetrain(Defense):
    """Detect poisoned synthetic samples on the pre-trained global model before round 1 is broadcast
    (``flag``), re-train that model from a fresh initialisation on the rest with the server's
    pre-training recipe (``remedy``), and leave the flagged samples out of every fusion."""

    consumes = frozenset({"synthetic"})

    def __init__(self):
        self._flagged: dict[int, torch.Tensor] = {}  # prototype -> bool mask over ctx.synthetic

    def flag(self, model: nn.Module, ctx: ServerContext) -> torch.Tensor:
        """A bool mask over ``ctx.synthetic``: the samples judged poisoned."""
        raise NotImplementedError

    def remedy(self, model: nn.Module, keep: torch.Tensor, ctx: ServerContext) -> None:
        data = ctx.synthetic
        retrain(model, data.images[keep], data.labels[keep], ctx.pretraining, ctx.seed, ctx.accelerator)

    def before_round(self, global_model, prototype, ctx):
        if ctx.round != 1:
            return
        flagged = self.flag(global_model, ctx)
        self._flagged[prototype] = flagged
        self.remedy(global_model, ~flagged, ctx)
        ctx.report(flagged_synthetic=flagged.nonzero().flatten().tolist())

    def changes_broadcast(self, round_idx: int) -> bool:
        return round_idx == 1

    def on_fusion(self, plan: FusionPlan, global_model, ctx) -> FusionPlan:
        flagged = self._flagged.get(plan.prototype)
        if flagged is not None:
            plan.keep = plan.keep & ~flagged
        return plan


def per_class(labels: torch.Tensor, score) -> torch.Tensor:
    """A bool mask: ``score(indices)`` (a bool mask over those indices) applied to each label's samples."""
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        flagged[idx[score(idx)]] = True
    return flagged
