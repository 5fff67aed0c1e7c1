"""FLAME (Nguyen et al. 2022): HDBSCAN on cosine distances, adaptive clipping, adaptive noise."""
import numpy as np
import torch

from defenses import DEFENSES, Defense
from fl_core.updates import add_noise, clip_rows, compose_state, deltas, median, parameter_noise, set_delta


def majority_cluster(matrix: torch.Tensor) -> list[int]:
    """Indices admitted by HDBSCAN (min cluster size n/2 + 1) on pairwise cosine distances; all if none."""
    from sklearn.cluster import HDBSCAN

    n = len(matrix)
    if n < 3:
        return list(range(n))
    unit = torch.nn.functional.normalize(matrix.double(), dim=1)
    distance = (1 - unit @ unit.T).clamp_min(0).cpu().numpy()
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed",
                     allow_single_cluster=True, copy=True).fit_predict(distance)
    admitted = np.flatnonzero(labels != -1) if (labels != -1).any() else np.arange(n)
    if len(set(labels[admitted])) > 1:  # keep the largest cluster
        values, counts = np.unique(labels[admitted], return_counts=True)
        admitted = np.flatnonzero(labels == values[counts.argmax()])
    return admitted.tolist()


@DEFENSES.register("flame")
class Flame(Defense):
    """Admit the majority cluster of update directions, clip admitted updates to the median norm S of all
    updates, average, and add Gaussian noise with std ``noise_lambda`` * S to the parameters
    (lambda = 0.001 for image classification in the paper). The admitted, clipped models teach, with the
    same noise."""

    consumes = frozenset({"updates"})
    parameter_space = True

    def __init__(self, noise_lambda: float = 0.001):
        if noise_lambda < 0:
            raise ValueError(f"noise_lambda must be >= 0, got {noise_lambda}")
        self.noise_lambda = noise_lambda

    def aggregate(self, agg, global_model, ctx):
        matrix = deltas(agg.updates, global_model)
        admitted = majority_cluster(matrix)
        bound = float(median(matrix.norm(dim=1)))
        clipped = clip_rows(matrix[admitted], bound)
        kept = [set_delta(agg.updates[i], global_model, row) for i, row in zip(admitted, clipped)]
        ctx.report(clip_bound=round(bound, 4))
        out = agg.admit(admitted, torch.ones(len(admitted)), compose_state(global_model, clipped.mean(0), kept))
        noise = parameter_noise(global_model, self.noise_lambda * bound, ctx.seed, "flame", ctx.round)
        return add_noise(out, global_model, noise)
