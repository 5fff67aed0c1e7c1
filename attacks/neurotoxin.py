"""Neurotoxin (Zhang et al. 2022): a durable backdoor in rarely-updated coordinates."""
import lightning as L
import torch

from attacks import ATTACKS
from attacks.poisoning import ClientAttack, check_rate


class Projection(L.Callback):
    """After every optimiser step, put the frozen coordinates (``keep`` False) back to their start values:
    local training as projected gradient descent onto the allowed coordinates, for any optimiser."""

    def __init__(self, start: dict[str, torch.Tensor], keep: dict[str, torch.Tensor]):
        self.start, self.keep = start, keep

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, param in pl_module.model.named_parameters():
            param.copy_(torch.where(self.keep[name].to(param.device), param, self.start[name].to(param.device)))


@ATTACKS.register("neurotoxin")
class Neurotoxin(ClientAttack):
    """BadNets poisoning, trained only on the coordinates benign clients rarely move. The attacker estimates
    the benign update by the global model's last change (parameters only, BN statistics excluded),
    freezes its top ``mask_ratio`` share of coordinates by magnitude (the paper's small top-k; default
    5 %) and projects its model back onto the rest after every local step. Round 1 has no observed
    change and trains unprojected."""

    def __init__(self, mask_ratio: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        check_rate("mask_ratio", mask_ratio)
        self.mask_ratio = mask_ratio
        self._seen: dict[tuple, dict[int, dict[str, torch.Tensor]]] = {}  # architecture -> round -> parameters

    def keep_mask(self, global_model, round_idx: int) -> dict[str, torch.Tensor] | None:
        """Per parameter: True where the attacker may move it; None while no global change was observed."""
        params = {k: v.detach().clone() for k, v in global_model.named_parameters()}
        history = self._seen.setdefault(tuple((k, tuple(v.shape)) for k, v in params.items()), {})
        history.setdefault(round_idx, params)
        for old in [r for r in history if r < round_idx - 1]:
            del history[old]
        previous = history.get(round_idx - 1)
        k = int(self.mask_ratio * sum(v.numel() for v in params.values()))
        if previous is None or k == 0:
            return None
        change = {name: (history[round_idx][name] - previous[name]).abs() for name in params}
        threshold = torch.topk(torch.cat([c.flatten() for c in change.values()]), k).values.min()
        return {name: c < threshold for name, c in change.items()}

    def training_callbacks(self, client_id, global_model, ctx):
        keep = self.keep_mask(global_model, ctx.round)
        if keep is None:
            return []
        return [Projection({k: v.detach().clone() for k, v in global_model.named_parameters()}, keep)]
