"""Anti-backdoor learning (Li et al., NeurIPS 2021): loss-based isolation and unlearning, on the server's
synthetic set."""
import torch
import torch.nn.functional as F

from defenses import DEFENSES
from defenses._synthetic import FilterThenRetrain, features_and_logits
from fl_core.data import batch_loader
from fl_core.modules import SupervisedModule, fit
from fl_core.schema import OptimConfig
from fl_core.seeding import derive_seed


class Unlearning(SupervisedModule):
    """Gradient ascent on the isolated samples' cross-entropy (ABL's backdoor unlearning)."""

    def training_step(self, batch, batch_idx):
        images, labels, *extras = batch
        return -F.cross_entropy(self.model(self.inputs(images, *extras)), labels)


@DEFENSES.register("abl")
class AntiBackdoorLearning(FilterThenRetrain):
    """The ``isolation_rate`` (1 %) of synthetic samples with the lowest loss under the pre-trained global
    model (backdoor samples are learned fastest) are isolated; the model then unlearns them by gradient
    ascent for ``unlearn_epochs`` (20) epochs at ``lr`` (5e-4, the paper's), and they stay out of fusion.
    The paper's local gradient ascent during training is not available: pre-training happened before any
    defense acts, so isolation reads the pre-trained model as it is."""

    def __init__(self, isolation_rate: float = 0.01, unlearn_epochs: int = 20, lr: float = 5e-4):
        super().__init__()
        if not 0 < isolation_rate < 1 or unlearn_epochs < 0 or lr <= 0:
            raise ValueError("isolation_rate must be in (0, 1), unlearn_epochs >= 0 and lr > 0")
        self.isolation_rate, self.unlearn_epochs, self.lr = isolation_rate, unlearn_epochs, lr

    def flag(self, model, ctx):
        _, logits = features_and_logits(model, ctx.synthetic.images, ctx.device)
        loss = F.cross_entropy(logits, ctx.synthetic.labels, reduction="none")
        flagged = torch.zeros(len(loss), dtype=torch.bool)
        flagged[loss.argsort()[:max(1, int(round(self.isolation_rate * len(loss))))]] = True
        return flagged

    def remedy(self, model, keep, ctx):
        isolated = ~keep
        data, batch = ctx.synthetic, ctx.pretraining.optim.batch_size
        steps = self.unlearn_epochs * -(-int(isolated.sum()) // batch)
        if steps == 0:
            return
        optim = OptimConfig(optimizer="sgd", lr=self.lr, batch_size=batch, momentum=0.9)
        loader = batch_loader(data.images[isolated], data.labels[isolated], batch, derive_seed(ctx.seed, "abl"),
                              steps=steps)
        fit(Unlearning(model, optim, False, derive_seed(ctx.seed, "abl-aug")), loader, ctx.accelerator)
