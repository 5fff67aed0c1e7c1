"""Model replacement / update scaling (Bagdasaryan et al. 2020)."""
import torch

from attacks import ATTACKS
from attacks.poisoning import ClientAttack


@ATTACKS.register("scaling")
class ModelReplacement(ClientAttack):
    """BadNets poisoning, then the malicious update's *parameters* (trained minus global) are multiplied
    by ``boost`` so that they survive averaging (Bagdasaryan et al. use boost = clients per round / server
    lr). BatchNorm statistics are sent as trained: boosting running variances can make them negative."""

    def __init__(self, boost: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if boost <= 0:
            raise ValueError(f"boost must be > 0, got {boost}")
        self.boost = boost

    def poison_update(self, update, global_model, ctx):
        start = dict(global_model.named_parameters())
        with torch.no_grad():
            for name, param in update.model.named_parameters():
                param.copy_(start[name] + self.boost * (param - start[name]))
        return update
