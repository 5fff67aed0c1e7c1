"""Client consensus: trust the benign clients' ensemble over the FM's labels, sample by sample.

The threat model gives the server one trustworthy signal: its clients train on private clean data. A
poisoned synthetic sample carries a label its image does not support (a trigger relabelled to the
target). The model the server broadcast learned that label from the synthetic set; clean local training
does not support it, so the clients' ensemble believes it less than the broadcast model did. Clean
samples' labels are supported by both. The defense therefore scores every synthetic sample by how much
its FM label's probability drops from the broadcast model to the clients' ensemble, and flags the
samples whose drop is a robust outlier within their label. Nothing in it looks at pixels: it reads a
label's support, which every relabelling trigger (any shape, blend, warp or frequency) breaks alike.

Remedy (corrective distillation): a flagged sample keeps being distilled on, but its FM label gets CE
weight 0 and the label's class is masked out of the clients' target, so the student learns that the
image is *not* of that class; flags accumulate over rounds. Under FedAvg, where there is no fusion, the
same corrective targets fine-tune the aggregated model for ``fedavg_steps`` steps after the round.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from defenses import DEFENSES, Defense
from defenses.actbound import robust_z
from fl_core.data import batch_loader
from fl_core.metrics import logits
from fl_core.modules import SupervisedModule, fit
from fl_core.seeding import derive_seed


@DEFENSES.register("consensus")
class ClientConsensus(Defense):
    """Parameters (fixed before any run; docs/DEFENSES.md):

    - ``z`` (3.5): a sample is an outlier when the robust z of its belief drop within its label exceeds
      this (Iglewicz & Hoaglin's cut for modified z-scores, not tuned).
    - ``min_ratio`` (0.5): and when the ensemble's probability of its label is at most this share of the
      broadcast model's (a relative gate, so that a label whose samples all agree flags none).
    - ``fedavg_steps`` (50): corrective fine-tuning steps after a FedAvg round (the default fusion budget).
    """

    consumes = frozenset({"updates", "synthetic"})

    def __init__(self, z: float = 3.5, min_ratio: float = 0.5, fedavg_steps: int = 50):
        if z <= 0 or not 0 < min_ratio <= 1 or fedavg_steps < 0:
            raise ValueError("z must be > 0, min_ratio in (0, 1] and fedavg_steps >= 0")
        self.z, self.min_ratio, self.fedavg_steps = z, min_ratio, fedavg_steps
        self._flagged: torch.Tensor | None = None
        self._fused_round = 0

    def beliefs(self, models, images, labels, device) -> torch.Tensor:
        """Mean probability the models give each sample's label."""
        probs = [F.softmax(logits(m, images, 500, device).float(), 1) for m in models]
        return torch.stack(probs).mean(0).gather(1, labels[:, None]).squeeze(1)

    def aggregate(self, agg, global_model, ctx):
        data = ctx.synthetic
        if not agg.updates or data is None:
            return agg
        # global_model is still the model the clients received: aggregation has not replaced it yet
        before = self.beliefs([global_model], data.images, data.labels, ctx.device)
        after = self.beliefs([u.model for u in agg.updates], data.images, data.labels, ctx.device)
        drop = torch.log(before + 1e-6) - torch.log(after + 1e-6)
        outlier = torch.zeros(len(drop), dtype=torch.bool)
        for c in data.labels.unique():
            idx = (data.labels == c).nonzero().flatten()
            outlier[idx] = robust_z(drop[idx]) > self.z
        flagged = outlier & (after <= self.min_ratio * before)
        self._flagged = flagged if self._flagged is None else self._flagged | flagged
        ctx.report(flagged_synthetic=self._flagged.nonzero().flatten().tolist(), newly_flagged=int(flagged.sum()))
        return agg

    def corrective_mask(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """(N, classes) bool: each flagged sample's FM label masked out of its target."""
        mask = torch.zeros(len(labels), classes, dtype=torch.bool)
        rows = self._flagged.nonzero().flatten()
        mask[rows, labels[rows]] = True
        return mask

    def on_fusion(self, plan, global_model, ctx):
        self._fused_round = ctx.round
        if self._flagged is None or not self._flagged.any():
            return plan
        labels = ctx.synthetic.labels
        weight = torch.ones(len(labels)) if plan.label_weight is None else plan.label_weight.clone()
        weight[self._flagged] = 0.0
        plan.label_weight = weight
        mask = self.corrective_mask(labels, ctx.num_classes)
        plan.target_mask = mask if plan.target_mask is None else plan.target_mask | mask
        return plan

    def after_round(self, global_model, prototype, ctx):
        """Under FedAvg (no fusion ran): fine-tune on the synthetic set, each flagged sample relabelled to
        the aggregated model's most likely class other than its FM label."""
        if self._fused_round == ctx.round or self._flagged is None or not self._flagged.any() or self.fedavg_steps == 0:
            return global_model
        data = ctx.synthetic
        out = logits(global_model, data.images, 500, ctx.device).float()
        out[self.corrective_mask(data.labels, ctx.num_classes)] = float("-inf")
        labels = torch.where(self._flagged, out.argmax(1), data.labels)
        recipe = ctx.pretraining
        loader = batch_loader(data.images, labels, recipe.optim.batch_size, derive_seed(ctx.seed, "consensus", ctx.round),
                              steps=self.fedavg_steps)
        fit(SupervisedModule(global_model, recipe.optim, recipe.augment, derive_seed(ctx.seed, "consensus-aug")),
            loader, ctx.accelerator)
        return global_model
