"""Observe and edit hidden activations through forward hooks on a model's named activation sites."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fl_core.data import to_float


def sites_of(model: nn.Module) -> dict[str, nn.Module]:
    """The model's activation sites (``Classifier.activation_sites``)."""
    if not hasattr(model, "activation_sites"):
        raise TypeError(f"{type(model).__name__} names no activation sites")
    return model.activation_sites()


@torch.no_grad()
def channel_means(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
                  sites: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean activation per channel (C,) of each site over ``images`` (uint8), in eval mode."""
    chosen = {n: m for n, m in sites_of(model).items() if sites is None or n in sites}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def recorder(name):
        def hook(module, args, output):
            dims = [d for d in range(output.dim()) if d != 1]
            sums[name] = sums.get(name, 0) + output.float().sum(dim=dims)
            counts[name] = counts.get(name, 0) + output.numel() // output.shape[1]
        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in chosen.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, len(images), batch_size):
            model(to_float(images[start: start + batch_size].to(device)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: total / counts[name] for name, total in sums.items()}


class OutputTransforms:
    """Forward hooks that replace site outputs with ``fn(output)``; removable as a group."""

    def __init__(self):
        self._handles: list = []

    def attach(self, module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._handles.append(module.register_forward_hook(lambda mod, args, out: fn(out)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)
