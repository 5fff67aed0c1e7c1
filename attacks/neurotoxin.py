"""Neurotoxin (Zhang et al. 2022): a durable backdoor in rarely-updated coordinates."""
import torch

from attacks import ATTACKS
from attacks.poisoning import ClientAttack, check_rate


@ATTACKS.register("neurotoxin")
class Neurotoxin(ClientAttack):
    """BadNets poisoning; the malicious update is zeroed on the ``mask_ratio`` share of coordinates that
    the benign clients move most, estimated (as the attacker can) from the last change of the global
    model. Simplification: the projection is applied to the final update rather than every local step."""

    def __init__(self, mask_ratio: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        check_rate("mask_ratio", mask_ratio)
        self.mask_ratio = mask_ratio
        self._seen: dict[int, dict[str, torch.Tensor]] = {}  # round -> global state at its start

    def poison_update(self, update, global_model, ctx):
        start = {k: v.detach().clone() for k, v in global_model.state_dict().items() if v.is_floating_point()}
        self._seen.setdefault(ctx.round, start)
        previous = self._seen.get(ctx.round - 1)
        for old in [r for r in self._seen if r < ctx.round - 1]:
            del self._seen[old]
        if previous is None:
            return update
        change = torch.cat([(start[k] - previous[k]).abs().flatten() for k in start])
        k = int(self.mask_ratio * change.numel())
        if k == 0:
            return update
        threshold = torch.topk(change, k).values.min()
        state = update.model.state_dict()
        for key, delta in update.delta(global_model).items():
            keep = (start[key] - previous[key]).abs() < threshold
            state[key].copy_(start[key] + delta * keep)
        return update
