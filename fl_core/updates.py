"""Client updates as flat parameter vectors: the common ground of parameter-space defenses.

Every statistic here (norms, distances, cosines, signs, medians) is taken over the trainable
parameters only: BatchNorm running statistics are not learned by gradient and would dominate the
norms (on the default CNN they carry ~95 % of an update's squared norm). Buffers of a new global
state are the FedAvg mean of the admitted clients' buffers (``compose_state``).
"""
from __future__ import annotations

import torch
from torch import nn

from fl_core.hooks import Aggregation, ClientUpdate, State
from fl_core.seeding import torch_generator


def parameter_keys(model: nn.Module) -> list[str]:
    """State entries that are trainable parameters, in state order."""
    params = {name for name, _ in model.named_parameters()}
    return [k for k in model.state_dict() if k in params]


def flat(state: State, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).float() for k in keys])


def deltas(updates: list[ClientUpdate], global_model: nn.Module) -> torch.Tensor:
    """(n_clients, n_parameters) matrix of trained-minus-global parameter vectors."""
    keys = parameter_keys(global_model)
    start = flat(global_model.state_dict(), keys)
    return torch.stack([flat(u.state(), keys) - start for u in updates])


def fedavg(states: list[State], weights: list[float] | torch.Tensor) -> State:
    """Weighted mean of floating-point entries; integer buffers (BN counters) from the first state."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            stacked = torch.stack([s[key].double() for s in states])
            out[key] = torch.einsum("n,n...->...", w.to(stacked.device), stacked).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def shifted(state: State, keys: list[str], delta: torch.Tensor) -> State:
    """The entries ``keys`` of ``state`` moved by the flat vector ``delta`` (laid out in ``keys`` order)."""
    out, offset = {}, 0
    for key in keys:
        value = state[key]
        n = value.numel()
        out[key] = (value.float() + delta[offset: offset + n].view_as(value).to(value.device)).to(value.dtype)
        offset += n
    return out


def compose_state(global_model: nn.Module, delta: torch.Tensor, updates: list[ClientUpdate],
                  weights: torch.Tensor | None = None) -> State:
    """The global parameters moved by a flat parameter ``delta``; buffers averaged over ``updates`` as
    FedAvg does (``weights`` x samples), or the global buffers when no update has a positive weight."""
    weights = torch.ones(len(updates)) if weights is None else weights.detach().float().cpu()
    fed = weights * sample_weights(updates) if updates else weights
    buffers = fedavg([u.state() for u in updates], fed) if updates and fed.sum() > 0 else global_model.state_dict()
    start = global_model.state_dict()
    moved = shifted(start, parameter_keys(global_model), delta)
    return {key: moved[key] if key in moved else buffers[key].clone() for key in start}


def set_delta(update: ClientUpdate, global_model: nn.Module, delta: torch.Tensor) -> ClientUpdate:
    """Write ``global + delta`` into the update's parameters in place (its own buffers kept)."""
    state = update.model.state_dict()
    with torch.no_grad():
        for key, value in shifted(global_model.state_dict(), parameter_keys(global_model), delta).items():
            state[key].copy_(value)
    return update


def parameter_noise(global_model: nn.Module, sigma: float, seed: int, *keys) -> torch.Tensor:
    """Seeded N(0, sigma^2) over the flat trainable parameters (the purpose ``keys`` pick the stream)."""
    count = sum(global_model.state_dict()[k].numel() for k in parameter_keys(global_model))
    return sigma * torch.randn(count, generator=torch_generator(seed, *keys))


def add_noise(agg: Aggregation, global_model: nn.Module, noise: torch.Tensor) -> Aggregation:
    """The same parameter noise added to the new global state and to every admitted update (the teachers),
    so that what fusion distils from carries the privacy noise the aggregate carries."""
    for u in agg.updates:
        set_delta(u, global_model, deltas([u], global_model)[0] + noise)
    state = agg.state if agg.state is not None else fedavg_of(agg)
    return Aggregation(agg.updates, agg.weights, {**state, **shifted(state, parameter_keys(global_model), noise)})


def fedavg_of(agg: Aggregation) -> State:
    """The FedAvg state of an aggregation's admitted updates (weights x samples)."""
    return fedavg([u.state() for u in agg.updates], agg.weights.float() * sample_weights(agg.updates))


def clip_rows(matrix: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """Rows scaled down to L2 norm <= ``max_norm``."""
    norms = matrix.norm(dim=1, keepdim=True)
    return matrix * torch.clamp(max_norm / (norms + 1e-12), max=1.0)


def weighted_mean(matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.float().to(matrix.device) / weights.float().sum()
    return (w[:, None] * matrix).sum(0)


def sample_weights(updates: list[ClientUpdate]) -> torch.Tensor:
    return torch.tensor([float(u.num_samples) for u in updates])


def median(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The true median along ``dim``: the middle value, or the mean of the two middle values for an even
    count (``torch.median`` returns the lower one, a downward bias)."""
    n = values.shape[dim]
    ordered = values.sort(dim=dim).values
    low = ordered.narrow(dim, (n - 1) // 2, 1)
    high = ordered.narrow(dim, n // 2, 1)
    return ((low + high) / 2).squeeze(dim)
