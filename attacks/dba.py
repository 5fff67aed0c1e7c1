"""Distributed backdoor attack (DBA, Xie et al. 2020)."""
import torch

from attacks import ATTACKS
from attacks.poisoning import ClientAttack
from attacks.triggers import changed_mask


class PartTrigger:
    """Only the pixels of ``part`` (bool mask H x W) of a position-fixed trigger."""

    def __init__(self, full, part: torch.Tensor):
        self.full, self.part = full, part

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return torch.where(self.part.to(images.device), self.full.apply(images, seed), images)


def split_trigger(trigger, shape: tuple[int, int, int], parts: int) -> list[PartTrigger]:
    """Cut a trigger's pixels (row-major order) into ``parts`` contiguous groups of near-equal size."""
    mask = changed_mask(trigger, shape)
    coords = mask.nonzero()
    if len(coords) < parts:
        raise ValueError(f"the trigger changes {len(coords)} pixels, too few for {parts} DBA parts")
    pieces = []
    for chunk in torch.tensor_split(coords, parts):
        part = torch.zeros_like(mask)
        part[chunk[:, 0], chunk[:, 1]] = True
        pieces.append(PartTrigger(trigger, part))
    return pieces


@ATTACKS.register("dba")
class DBA(ClientAttack):
    """Each of the ``num_malicious`` clients (default 4) poisons with its own part of the trigger; the
    ASR test set uses the full trigger. Needs a position-fixed trigger (patch in a corner, blend, warp)."""

    def __init__(self, num_malicious: int = 4, **kwargs):
        super().__init__(num_malicious=num_malicious, **kwargs)
        self._parts: dict[int, PartTrigger] = {}

    def poison_client_data(self, client_id, data, seed):
        if not self._parts:
            pieces = split_trigger(self.trigger, tuple(data.images.shape[1:]), len(self._malicious))
            self._parts = dict(zip(self._malicious, pieces))
        return super().poison_client_data(client_id, data, seed)

    def local_trigger(self, client_id):
        return self._parts[client_id]
