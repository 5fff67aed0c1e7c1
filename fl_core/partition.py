"""Seeded splits of a label vector: the stratified public / client split and the client partitions
(IID, Dirichlet label skew, shards), each client with at least ``min_samples``."""
from __future__ import annotations

import numpy as np
import torch

from fl_core.seeding import numpy_rng


def stratified_split(labels: torch.Tensor, size: int, seed: int, *keys: object) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, chosen) with ``size`` chosen, class proportions kept."""
    labels = np.asarray(labels)
    if not 0 <= size <= len(labels):
        raise ValueError(f"cannot take {size} of {len(labels)} samples")
    rng = numpy_rng(seed, "stratified", *keys)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * size).astype(int)
    for i in np.argsort(-(counts / counts.sum() * size - quota))[: size - quota.sum()]:
        quota[i] += 1
    chosen = []
    for cls, q in zip(classes, quota):
        idx = np.flatnonzero(labels == cls)
        chosen.append(rng.choice(idx, size=q, replace=False))
    chosen = np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=int)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return rest, chosen


def _check_min(parts: list[np.ndarray], min_samples: int, what: str) -> list[np.ndarray]:
    smallest = min(len(p) for p in parts)
    if smallest < min_samples:
        raise ValueError(f"{what}: a client got {smallest} samples < data.min_samples={min_samples}; "
                         "use fewer clients, a larger client pool or a smaller min_samples")
    return [np.sort(p) for p in parts]


def partition_iid(labels: np.ndarray, num_clients: int, min_samples: int, seed: int) -> list[np.ndarray]:
    """Uniformly random equal-size split."""
    perm = numpy_rng(seed, "partition", "iid").permutation(len(labels))
    return _check_min(np.array_split(perm, num_clients), min_samples, "iid partition")


def partition_dirichlet(labels: np.ndarray, num_clients: int, beta: float, min_samples: int, seed: int,
                        max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with Dirichlet(beta) proportions.

    Redraws (up to ``max_tries``) until every client holds at least ``min_samples``.
    """
    labels = np.asarray(labels)
    rng = numpy_rng(seed, "partition", "dirichlet")
    if len(labels) < num_clients * min_samples:
        raise ValueError(f"dirichlet partition: {len(labels)} samples cannot give {num_clients} clients "
                         f"{min_samples} each")
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            props = rng.dirichlet(np.full(num_clients, beta))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        parts = [np.concatenate(p) for p in parts]
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(p) for p in parts]
    raise ValueError(f"dirichlet partition: no draw in {max_tries} gave every client >= {min_samples} samples "
                     f"(beta={beta}); raise beta or lower data.min_samples")


def partition_shards(labels: np.ndarray, num_clients: int, shards_per_client: int, min_samples: int,
                     seed: int) -> list[np.ndarray]:
    """Sort by label, cut into equal shards, deal ``shards_per_client`` random shards to each client."""
    labels = np.asarray(labels)
    rng = numpy_rng(seed, "partition", "shards")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
    return _check_min([np.concatenate([shards[s] for s in row]) for row in deal], min_samples, "shards partition")


def partition(labels: np.ndarray, num_clients: int, scheme: str, *, beta: float = 0.5, shards_per_client: int = 2,
              min_samples: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Client index lists (into ``labels``) for partition ``scheme``."""
    if scheme == "iid":
        return partition_iid(labels, num_clients, min_samples, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, beta, min_samples, seed)
    if scheme == "shards":
        return partition_shards(labels, num_clients, shards_per_client, min_samples, seed)
    raise ValueError(f"unknown partition {scheme!r}; valid: iid, dirichlet, shards")


# ---------------------------------------------------------------- batches and augmentation
