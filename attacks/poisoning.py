"""Shared poisoning mechanics: which samples carry the trigger, and the malicious-client base class."""
from __future__ import annotations

import torch

from fl_core.data import ImageData, Stamped, apply_trigger
from fl_core.hooks import Attack
from fl_core.schema import BackdoorConfig
from fl_core.seeding import numpy_rng, torch_generator

STAGES = ("both", "pretrain", "fusion")  # where a poisoned synthetic set is used


def eligible(labels: torch.Tensor, backdoor: BackdoorConfig) -> torch.Tensor:
    """Samples a backdoor may use: non-target classes (all-to-one) or the source class (one-to-one)."""
    if backdoor.mapping == "one-to-one":
        return labels == backdoor.source
    return labels != backdoor.target


def poison_indices(labels: torch.Tensor, backdoor: BackdoorConfig, rate: float, seed: int, *keys) -> torch.Tensor:
    """Exactly ``round(rate * n_k)`` seeded samples of every eligible class k (sorted indices)."""
    gen = torch_generator(seed, "poison", *keys)
    labels = labels.cpu()
    chosen = []
    for k in torch.unique(labels[eligible(labels, backdoor)]).tolist():
        idx = (labels == k).nonzero().flatten()
        count = int(round(rate * len(idx)))
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:count]])
    return torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long)


def poison_data(data: ImageData, trigger, backdoor: BackdoorConfig, rate: float, seed: int, *keys,
                relabel: bool = True) -> tuple[ImageData, torch.Tensor]:
    """A copy of ``data`` whose chosen samples carry the trigger (and the target label if ``relabel``)."""
    idx = poison_indices(data.labels, backdoor, rate, seed, *keys).to(data.labels.device)
    images, labels = data.images.clone(), data.labels.clone()
    if len(idx):
        images[idx] = apply_trigger(trigger, images[idx], data.true_classes()[idx], seed=seed)
        if relabel:
            labels[idx] = backdoor.target
    return ImageData(images, labels, data.classes, stamped_mask(data, idx, trigger)), idx


def stamped_mask(data: ImageData, idx: torch.Tensor, trigger) -> Stamped | None:
    """``data``'s stamped samples plus ``idx``, for a trigger that augmentation can paste again."""
    if not getattr(trigger, "local", False):
        return data.stamped  # a global trigger (blend, warp) is cropped and flipped with its image
    mask = data.stamped.mask.clone() if data.stamped is not None else torch.zeros(len(data), dtype=torch.bool,
                                                                                 device=data.labels.device)
    mask[idx] = True
    source = data.true_classes() if getattr(trigger, "class_dependent", False) else None
    return Stamped(trigger, mask, source)


def check_rate(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_stages(stages: str) -> None:
    if stages not in STAGES:
        raise ValueError(f"stages {stages!r} unknown; valid: {', '.join(STAGES)}")


class ClientAttack(Attack):
    """Classic threat: ``num_malicious`` clients (or ``malicious_fraction`` of all) poison ``poison_rate``
    of their eligible local samples with the cell's trigger, relabelled to the target.

    Malicious clients act only in rounds where they are sampled. ``frequency`` = k > 0 fixes that:
    they are put into every k-th round's selection (replacing benign clients) and kept out of the others.
    ``epochs`` > 0: malicious clients train that many local epochs (0: as many as the benign ones).
    """

    omit_at_default = {"epochs": 0}

    def __init__(self, num_malicious: int = 1, malicious_fraction: float | None = None, poison_rate: float = 0.2,
                 frequency: int = 0, epochs: int = 0):
        if num_malicious < 0:
            raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
        if malicious_fraction is not None:
            check_rate("malicious_fraction", malicious_fraction)
        check_rate("poison_rate", poison_rate)
        if frequency < 0:
            raise ValueError(f"frequency must be >= 0 (0 = natural sampling), got {frequency}")
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0 (0 = the benign clients' local epochs), got {epochs}")
        self.num_malicious, self.malicious_fraction = num_malicious, malicious_fraction
        self.poison_rate, self.frequency, self.epochs = poison_rate, frequency, epochs
        self._malicious: list[int] = []

    def local_epochs(self, client_id: int, benign_epochs: int) -> int:
        return self.epochs or benign_epochs

    def _count(self, num_clients: int) -> int:
        return self.num_malicious if self.malicious_fraction is None else round(self.malicious_fraction * num_clients)

    def check(self, cfg) -> None:
        if self._count(cfg.fl.num_clients) > cfg.fl.num_clients:
            raise ValueError(f"num_malicious {self._count(cfg.fl.num_clients)} > fl.num_clients {cfg.fl.num_clients}")

    def malicious_clients(self, num_clients: int, seed: int) -> list[int]:
        m = self._count(num_clients)
        if m > num_clients:
            raise ValueError(f"{m} malicious clients > {num_clients} clients")
        self._malicious = sorted(numpy_rng(seed, "malicious").choice(num_clients, m, replace=False).tolist())
        return self._malicious

    def local_trigger(self, client_id: int):
        """The trigger a malicious client stamps on its data (the full one; DBA uses a part)."""
        return self.trigger

    def poison_client_data(self, client_id: int, data: ImageData, seed: int) -> ImageData:
        return poison_data(data, self.local_trigger(client_id), self.backdoor, self.poison_rate, seed,
                           "client", client_id)[0]

    def select_clients(self, selected: list[int], round_idx: int, num_clients: int, seed: int) -> list[int]:
        if self.frequency == 0 or not self._malicious:
            return selected
        bad = set(self._malicious)
        benign = [c for c in selected if c not in bad]
        if round_idx % self.frequency == 0:
            keep = benign[: max(0, len(selected) - len(bad))]
            return sorted(set(keep) | bad)
        spare = [c for c in numpy_rng(seed, "replace", round_idx).permutation(num_clients).tolist()
                 if c not in bad and c not in benign]
        return sorted(benign + spare[: len(selected) - len(benign)])
