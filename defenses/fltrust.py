"""FLTrust (Cao et al. 2021) with the server's synthetic set as its root data."""
import copy

import torch

from defenses import DEFENSES, Defense
from fl_core.config import OptimConfig
from fl_core.data import batch_loader
from fl_core.modules import SupervisedModule, fit
from fl_core.seeding import derive_seed
from fl_core.updates import deltas, float_keys, flat, state_plus


@DEFENSES.register("fltrust")
class FLTrust(Defense):
    """The server trains a copy of the global model on its root data (the synthetic set, ``root_steps``
    SGD steps) to get a reference update g0. Each client update gets trust ReLU(cos(update, g0)), is
    rescaled to ||g0||, and the trust-weighted mean is applied."""

    consumes = frozenset({"updates", "synthetic"})
    parameter_space = True

    def __init__(self, root_steps: int = 50, lr: float = 0.01, batch_size: int = 64):
        if root_steps < 1 or lr <= 0 or batch_size < 1:
            raise ValueError("root_steps >= 1, lr > 0 and batch_size >= 1 are required")
        self.root_steps, self.lr, self.batch_size = root_steps, lr, batch_size
        self._trust: dict[int, float] = {}

    def root_update(self, global_model, ctx) -> torch.Tensor:
        server = copy.deepcopy(global_model)
        data = ctx.synthetic
        loader = batch_loader(data.images, data.labels, self.batch_size, derive_seed(ctx.seed, "fltrust", ctx.round),
                              steps=self.root_steps)
        optim = OptimConfig(optimizer="sgd", lr=self.lr, momentum=0.9, weight_decay=0.0, batch_size=self.batch_size)
        fit(SupervisedModule(server, optim, True, derive_seed(ctx.seed, "fltrust-aug", ctx.round)), loader,
            ctx.accelerator)
        keys = float_keys(global_model)
        return flat(server.state_dict(), keys) - flat(global_model.state_dict(), keys)

    def aggregate(self, updates, global_model, ctx):
        matrix = deltas(updates, global_model)
        g0 = self.root_update(global_model, ctx).to(matrix.device)
        trust = torch.relu(torch.nn.functional.cosine_similarity(matrix, g0[None], dim=1))
        self._trust = {u.client_id: float(t) for u, t in zip(updates, trust)}
        if trust.sum() <= 0:
            return state_plus(global_model, torch.zeros_like(g0))
        scaled = matrix * (g0.norm() / (matrix.norm(dim=1, keepdim=True) + 1e-12))
        return state_plus(global_model, (trust[:, None] * scaled).sum(0) / trust.sum())
