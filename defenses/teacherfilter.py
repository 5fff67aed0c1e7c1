"""A distillation-side filter for heterogeneous FL: teachers that disagree with the ensemble lose weight."""
import torch

from defenses import DEFENSES, Defense
from fl_core.metrics import predict
from fl_core.seeding import torch_generator
from fl_core.updates import median


@DEFENSES.register("teacherfilter")
class TeacherFilter(Defense):
    """On a seeded random probe of ``probe_size`` synthetic samples (drawn anew each round), measure each
    teacher's agreement with the ensemble's majority vote. Teachers below median - ``k`` * MAD of the
    agreements are dropped (``mode: drop``: weight 0, they do not teach) or weighted by their agreement
    (``mode: downweight``). Works across architectures."""

    consumes = frozenset({"updates", "synthetic"})

    def __init__(self, k: float = 2.5, mode: str = "drop", probe_size: int = 1000):
        if k <= 0 or probe_size < 1:
            raise ValueError("k > 0 and probe_size >= 1 are required")
        if mode not in ("drop", "downweight"):
            raise ValueError(f"mode {mode!r} unknown; valid: drop, downweight")
        self.k, self.mode, self.probe_size = k, mode, probe_size

    def on_fusion(self, plan, global_model, ctx):
        synthetic = ctx.synthetic
        probe = torch.randperm(len(synthetic), generator=torch_generator(ctx.seed, "teacherfilter", ctx.round))
        images = synthetic.images[probe[: self.probe_size].to(synthetic.images.device)]
        preds = torch.stack([predict(u.model, images, 500, ctx.device) for u in plan.teachers])
        votes = torch.nn.functional.one_hot(preds, ctx.num_classes).sum(0).argmax(-1)
        agreement = (preds == votes).float().mean(1).cpu()
        centre = median(agreement)
        mad = median((agreement - centre).abs()).clamp_min(1e-3)
        outlier = agreement < centre - self.k * mad
        factor = torch.where(outlier, torch.zeros_like(agreement) if self.mode == "drop" else agreement,
                             torch.ones_like(agreement))
        plan.teacher_weights = plan.teacher_weights * factor
        ctx.report(agreement={u.client_id: round(float(a), 4) for u, a in zip(plan.teachers, agreement)},
                   dropped=[u.client_id for u, o in zip(plan.teachers, outlier) if o and self.mode == "drop"])
        return plan
