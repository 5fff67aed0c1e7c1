"""Client updates as flat vectors: the common ground of parameter-space defenses."""
from __future__ import annotations

import torch
from torch import nn

from fl_core.hooks import ClientUpdate, State


def float_keys(model: nn.Module) -> list[str]:
    """State entries that updates change (floating-point parameters and buffers), in state order."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def flat(state: State, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).float() for k in keys])


def deltas(updates: list[ClientUpdate], global_model: nn.Module) -> torch.Tensor:
    """(n_clients, n_coordinates) matrix of trained-minus-global vectors."""
    keys = float_keys(global_model)
    start = flat(global_model.state_dict(), keys)
    return torch.stack([flat(u.state(), keys) - start for u in updates])


def state_plus(global_model: nn.Module, delta: torch.Tensor) -> State:
    """The global state moved by a flat ``delta`` (integer buffers kept)."""
    out, offset = {}, 0
    for key, value in global_model.state_dict().items():
        if value.is_floating_point():
            n = value.numel()
            out[key] = (value.float() + delta[offset: offset + n].view_as(value)).to(value.dtype)
            offset += n
        else:
            out[key] = value.clone()
    return out


def set_delta(update: ClientUpdate, global_model: nn.Module, delta: torch.Tensor) -> ClientUpdate:
    """Write ``global + delta`` into the update's model in place."""
    update.model.load_state_dict(state_plus(global_model, delta))
    return update


def clip_rows(matrix: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """Rows scaled down to L2 norm <= ``max_norm``."""
    norms = matrix.norm(dim=1, keepdim=True)
    return matrix * torch.clamp(max_norm / (norms + 1e-12), max=1.0)


def weighted_mean(matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.float() / weights.float().sum()
    return (w[:, None] * matrix).sum(0)


def sample_weights(updates: list[ClientUpdate]) -> torch.Tensor:
    return torch.tensor([float(u.num_samples) for u in updates])


def parameter_mask(model: nn.Module) -> torch.Tensor:
    """Bool over the flat coordinates: True for trainable parameters, False for buffers (BN statistics)."""
    params = {name for name, _ in model.named_parameters()}
    state = model.state_dict()
    return torch.cat([torch.full((state[k].numel(),), k in params) for k in float_keys(model)])
