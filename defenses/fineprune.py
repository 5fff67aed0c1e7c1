"""Fine-pruning (Liu et al. 2018): prune dormant channels, then fine-tune, on the synthetic set."""
from defenses import DEFENSES, acts_now
from defenses.finetune import finetune
from defenses.pruning import DormantPruning


@DEFENSES.register("fineprune")
class FinePruning(DormantPruning):
    """Dormant-channel pruning (``rate``) followed by ``steps`` fine-tuning steps on the synthetic set."""

    def __init__(self, rate: float = 0.2, site: str | None = None, when: str = "final", steps: int = 100,
                 lr: float = 0.01):
        super().__init__(rate, site, when)
        if steps < 1 or lr <= 0:
            raise ValueError("steps >= 1 and lr > 0 are required")
        self.steps, self.lr = steps, lr

    def after_round(self, global_model, prototype, ctx):
        if not acts_now(self.when, ctx):
            return global_model
        super().after_round(global_model, prototype, ctx)
        finetune(global_model, ctx, self.steps, self.lr, 64, "fineprune")
        return global_model
