"""A distillation-side filter for heterogeneous FL: teachers that disagree with the ensemble lose weight."""
import torch

from defenses import DEFENSES, Defense
from fl_core.metrics import predict


@DEFENSES.register("teacherfilter")
class TeacherFilter(Defense):
    """On (up to ``probe_size`` samples of) the synthetic set, measure each teacher's agreement with the
    ensemble's majority vote. Teachers below median - ``k`` * MAD of the agreements are dropped
    (``mode: drop``) or weighted by their agreement (``mode: downweight``). Works across architectures."""

    consumes = frozenset({"updates", "synthetic"})

    def __init__(self, k: float = 2.5, mode: str = "drop", probe_size: int = 1000):
        if k <= 0 or probe_size < 1:
            raise ValueError("k > 0 and probe_size >= 1 are required")
        if mode not in ("drop", "downweight"):
            raise ValueError(f"mode {mode!r} unknown; valid: drop, downweight")
        self.k, self.mode, self.probe_size = k, mode, probe_size
        self._agreement: dict[int, float] = {}

    def on_fusion(self, plan, global_model, ctx):
        images = plan.synthetic.images[: self.probe_size]
        preds = torch.stack([predict(u.model, images, 500, ctx.device) for u in plan.teachers])
        votes = torch.nn.functional.one_hot(preds, ctx.num_classes).sum(0).argmax(-1)
        agreement = (preds == votes).float().mean(1)
        self._agreement = {u.client_id: float(a) for u, a in zip(plan.teachers, agreement)}
        median = agreement.median()
        mad = (agreement - median).abs().median().clamp_min(1e-3)
        outlier = agreement < median - self.k * mad
        if self.mode == "drop":
            keep = [i for i in range(len(plan.teachers)) if not outlier[i]]
            plan.teachers = [plan.teachers[i] for i in keep]
            plan.teacher_weights = plan.teacher_weights[keep]
        else:
            plan.teacher_weights = plan.teacher_weights * torch.where(outlier, agreement, torch.ones_like(agreement))
        return plan
