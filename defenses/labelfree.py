"""Label-free fusion: the server distils from its clients only and never trains on the FM's labels."""
import torch

from defenses import DEFENSES, Defense
from defenses._synthetic import reinitialise
from fl_core.seeding import derive_seed

PRETRAIN = ("discard", "keep")


@DEFENSES.register("labelfree")
class LabelFreeFusion(Defense):
    """Every synthetic label gets CE weight 0 in fusion, so the student follows the clients' ensemble alone
    (FedDF's pure distillation). ``pretrain``: ``discard`` (default) re-initialises the global model before
    round 1 is broadcast, so no FM label reaches any model (the backdoor enters mostly through
    pre-training); ``keep`` broadcasts the pre-trained model, removing only the labels of fusion."""

    def __init__(self, pretrain: str = "discard"):
        if pretrain not in PRETRAIN:
            raise ValueError(f"pretrain {pretrain!r} unknown; valid: {', '.join(PRETRAIN)}")
        self.pretrain = pretrain

    def before_round(self, global_model, prototype, ctx):
        if ctx.round == 1 and self.pretrain == "discard":
            reinitialise(global_model, derive_seed(ctx.seed, "labelfree", prototype))

    def changes_broadcast(self, round_idx: int) -> bool:
        return round_idx == 1 and self.pretrain == "discard"

    def on_fusion(self, plan, global_model, ctx):
        plan.label_weight = torch.zeros(len(plan.keep))  # counted as flagged by the runner: every label ignored
        return plan
