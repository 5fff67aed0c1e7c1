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
def site_outputs(model: nn.Module, images: torch.Tensor, sites: list[str],
                 reduce: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``reduce(output)`` of each named site for every image (uint8), concatenated over batches, eval mode."""
    modules = sites_of(model)
    got: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    handles = [modules[s].register_forward_hook(lambda m, a, o, s=s: got[s].append(reduce(o))) for s in sites]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch_size):
            model(to_float(images[i: i + batch_size].to(device)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {s: torch.cat(v) for s, v in got.items()}


def channel_peaks(output: torch.Tensor) -> torch.Tensor:
    """Each sample's largest activation per channel: (B, C, ...) -> (B, C); (B, C) passes through."""
    return output.flatten(2).amax(-1) if output.dim() > 2 else output


def channel_means(model: nn.Module, images: torch.Tensor, sites: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean activation per channel (C,) of each site over ``images`` and positions."""
    names = list(sites_of(model)) if sites is None else sites
    per_sample = site_outputs(model, images, names, lambda o: o.float().flatten(2).mean(-1) if o.dim() > 2 else o)
    return {name: acts.mean(0) for name, acts in per_sample.items()}


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
