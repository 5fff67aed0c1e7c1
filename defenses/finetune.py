"""Fine-tuning on the server's synthetic data (Liu et al. 2018 style repair)."""
from defenses import DEFENSES, Defense, acts_now, check_when
from fl_core.data import batch_loader
from fl_core.modules import SupervisedModule, fit
from fl_core.schema import OptimConfig
from fl_core.seeding import derive_seed


def finetune(model, ctx, steps: int, lr: float, batch_size: int, key: str) -> None:
    """``steps`` SGD steps of cross-entropy on the synthetic set (labels as the FM gave them)."""
    data = ctx.synthetic
    loader = batch_loader(data.images, data.labels, batch_size, derive_seed(ctx.seed, key, ctx.round), steps=steps)
    optim = OptimConfig(optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4, batch_size=batch_size)
    fit(SupervisedModule(model, optim, True, derive_seed(ctx.seed, key + "-aug", ctx.round)), loader, ctx.accelerator)


@DEFENSES.register("finetune")
class FineTune(Defense):
    """Fine-tune each fused global model on the synthetic set for ``steps`` steps (lr ``lr``), after the
    last round (``when: final``, default) or after every round."""

    consumes = frozenset({"synthetic"})

    def __init__(self, steps: int = 100, lr: float = 0.01, batch_size: int = 64, when: str = "final"):
        if steps < 1 or lr <= 0 or batch_size < 1:
            raise ValueError("steps >= 1, lr > 0 and batch_size >= 1 are required")
        check_when(when)
        self.steps, self.lr, self.batch_size, self.when = steps, lr, batch_size, when

    def after_round(self, global_model, prototype, ctx):
        if acts_now(self.when, ctx):
            finetune(global_model, ctx, self.steps, self.lr, self.batch_size, "finetune")
        return global_model
