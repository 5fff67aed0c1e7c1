"""FLTrust (Cao et al. 2021) with the server's synthetic set as its root data."""
import copy
import math

import torch

from defenses import DEFENSES, Defense
from fl_core.data import batch_loader
from fl_core.hooks import Aggregation, ClientUpdate
from fl_core.modules import SupervisedModule, fit
from fl_core.seeding import derive_seed
from fl_core.updates import compose_state, deltas, set_delta


def root_update(global_model, ctx, client_sizes: list[int], images: torch.Tensor, labels: torch.Tensor,
                root_steps: int | None = None) -> torch.Tensor:
    """The server's reference update g0: a copy of the global model trained on the root data
    (``images``, ``labels``) as the clients train (their optimiser and augmentation; ``root_steps`` steps,
    or ``local_epochs`` x the mean client's batches per epoch). Trainable parameters, flattened."""
    training = ctx.client_training
    batch = training.optim.batch_size
    steps = root_steps or max(1, round(training.epochs * sum(math.ceil(n / batch) for n in client_sizes)
                                       / len(client_sizes)))
    server = copy.deepcopy(global_model)
    loader = batch_loader(images, labels, batch, derive_seed(ctx.seed, "fltrust", ctx.round), steps=steps)
    fit(SupervisedModule(server, training.optim, training.augment, derive_seed(ctx.seed, "fltrust-aug", ctx.round)),
        loader, ctx.accelerator)
    return deltas([ClientUpdate(-1, 0, len(labels), server)], global_model)[0]


def trust_aggregate(agg: Aggregation, global_model, ctx, g0: torch.Tensor) -> Aggregation:
    """FLTrust's rule: each update gets trust ReLU(cos(update, g0)) and is rescaled to ||g0|| in place
    (the rescaled models teach, weighted by trust); the new state is the trust-weighted mean."""
    matrix = deltas(agg.updates, global_model)
    g0 = g0.to(matrix.device)
    trust = torch.relu(torch.nn.functional.cosine_similarity(matrix, g0[None], dim=1)).cpu() * agg.weights.float()
    scaled = matrix * (g0.norm() / (matrix.norm(dim=1, keepdim=True) + 1e-12))
    for update, row in zip(agg.updates, scaled):
        set_delta(update, global_model, row)
    ctx.report(trust={u.client_id: round(float(t), 4) for u, t in zip(agg.updates, trust)})
    moved = (trust.to(scaled.device)[:, None] * scaled).sum(0) / trust.sum() if trust.sum() > 0 else \
        torch.zeros_like(g0)
    return Aggregation(agg.updates, trust, compose_state(global_model, moved, agg.updates, trust))


@DEFENSES.register("fltrust")
class FLTrust(Defense):
    """The server trains a copy of the global model on its root data (the synthetic set) exactly as the
    clients train (their optimiser, augmentation and number of local steps: ``local_epochs`` x the mean
    client's batches per epoch, or ``root_steps`` if set) to get a reference update g0. Each client update
    gets trust ReLU(cos(update, g0)) and is rescaled to ||g0|| (the rescaled models teach, weighted by
    trust), and the trust-weighted mean is applied. Trainable parameters only."""

    consumes = frozenset({"updates", "synthetic"})
    parameter_space = True

    def __init__(self, root_steps: int | None = None):
        if root_steps is not None and root_steps < 1:
            raise ValueError(f"root_steps must be >= 1, got {root_steps}")
        self.root_steps = root_steps

    def aggregate(self, agg, global_model, ctx):
        data = ctx.synthetic
        g0 = root_update(global_model, ctx, [u.num_samples for u in agg.updates], data.images, data.labels,
                         self.root_steps)
        return trust_aggregate(agg, global_model, ctx, g0)
