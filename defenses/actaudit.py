"""Activation-constrained aggregation with a synthetic-set audit: the paper's activation bounds
(``actbound``) extended with what the server itself holds (issue 15, docs/history/defense_selections.md).

1. **Constrained teachers** (option, off by default). While the server distils, the bounds (fitted on
   the aggregated model first) clamp every teacher (client model) and the student, so a trigger's
   abnormal activation cannot pass through the ensemble's soft labels. Without it the student distils
   free of its bounds (``bounded_student``: false; null clamps it in the rounds whose audit refitted them).
2. **Audit of the synthetic set** (no ground truth, no test data): per sample and its FM label,
   the *margin drop* of the label between the unbounded and the bounded aggregated model (the bounds
   cut exactly the activations a backdoor needs; the default signal) and, optionally, the *belief drop*
   in the label from the model the clients received to their ensemble after clean local training
   (clean clients forget a trigger; heavy-tailed on Fashion-MNIST, so off by default). Each signal is a
   robust z over the set (median / MAD); a sample is flagged when the mean of the signals' z exceeds
   ``audit_z`` and the bounds remove at least the share ``margin_cut`` of its label's margin (sixth
   selection: the z alone also flags confident clean samples that the bounds only trim). The same rule
   on the margin drop under a slight Gaussian blur of the image (``blur_sigma``, eighth selection) flags
   too: a global, high-frequency trigger (blend) raises no abnormal activation for the bounds to cut, but
   a blur that leaves a clean image's class alone erases it. And once enough samples are flagged, the
   pixels nearly all of them share and the rest of the set does not (a stamped trigger) are replaced by
   the set's per-pixel median, and the same rule on the margin drop under that occlusion flags every
   sample whose label rests on those pixels (``occlusion_share``, ninth selection): the high-precision
   first flags find the rest of the poison. And a label most of whose samples the clients' ensemble, after
   clean local training, believes at most half as much as the model they received (a trigger too subtle for
   any image signal, as warp, that clean training erases) has those samples flagged
   (``label_rejection``, tenth selection). Once flagged, always flagged; the bounds are then refitted
   (``refine_steps``) without having to preserve the flagged samples.
3. **Constrained aggregation.** Each client model is run on a seeded probe of the synthetic set with
   and without the global model's bounds, and the KL between the two outputs is its *bound
   divergence*. A client whose divergence is abnormal either way (|robust z| of its log over the round's
   clients > ``client_z``) is not admitted: it neither averages nor teaches. A boosted replacement
   update saturates: the bounds barely change its (confidently wrong) outputs, far below any benign
   client's divergence. The first bounds are fitted on the model the clients receive, before round 1.
   Optionally (``norm_ratio``) a client whose update is abnormally large in parameter space (the L2 norm
   of its trained-minus-global parameters over the median of the round's clients) is not admitted either:
   a boosted update is larger than any benign one even where its divergence looks benign.
4. **Corrective distillation.** A flagged sample's label leaves the CE term and the label is masked out
   of its (bounded) distillation target: the student learns what the constrained ensemble predicts
   without the suspicious label, which unlearns the trigger -> target shortcut.
5. **What is deployed.** The bounds are refitted after every round for the next audit and client rule,
   but the model evaluated and kept is the weights alone (``deploy_bounds``: false, fifth selection);
   true deploys it under its clamps, the paper's form and the default up to the fourth selection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from defenses import DEFENSES
from defenses.actbound import ActivationBounds, clamp_model, class_margins, robust_z
from fl_core.metrics import logits
from fl_core.seeding import torch_generator
from fl_core.updates import deltas, median

SIGNALS = ("both", "margin", "belief")


def label_probability(models: list[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
    """Mean over ``models`` of the softmax probability of each sample's label."""
    probs = [F.softmax(logits(m, images, 500, device), -1).gather(1, labels.cpu()[:, None]).squeeze(1)
             for m in models]
    return torch.stack(probs).mean(0)


def margin_drop(model: nn.Module, changed: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """How much of each label's ``margin`` (the model's, on the original images) the model loses on the
    ``changed`` images."""
    return margin - class_margins(logits(model, changed, 500, device), labels)


def blur_margin_drop(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor,
                     sigma: float, device: torch.device) -> torch.Tensor:
    """How much of each label's ``margin`` (the model's, on the uint8 ``images``) a Gaussian blur of
    ``sigma`` pixels (kernel 2 round(2 sigma) + 1, batched) removes."""
    k = 2 * round(2 * sigma) + 1
    return margin_drop(model, gaussian_blur(images, [k, k], [sigma, sigma]), labels, margin, device)


def shared_pixels(images: torch.Tensor, flags: torch.Tensor, share: float, tolerance: float = 8.0,
                  common: float = 0.5) -> torch.Tensor:
    """(C, H, W) mask of the pixels where at least ``share`` of the flagged uint8 ``images`` hold one value
    (their median, within ``tolerance`` levels) that at most ``common`` of all the images hold: where a
    trigger stamped on every flagged image sits, and not a background the whole set shares."""
    value = images[flags].float().median(0).values
    def holding(x):
        return ((x.float() - value).abs() <= tolerance).float().mean(0)
    return (holding(images[flags]) >= share) & (holding(images) <= common)


@DEFENSES.register("actaudit")
class AuditedActivationBounds(ActivationBounds):
    """``actbound`` (every parameter of it applies) plus constrained teachers, the audit and corrective
    distillation. Parameters, [default] (chosen on development seeds, docs/history/defense_selections.md):

    - audit_z [3.0]: flag threshold on the mean robust z of the audit's signals.
    - signals ["margin"]: the bounds' margin drop; "belief" (the clients' belief drop) or "both".
    - margin_cut [0.5, sixth selection]: flag only samples that lose at least this share of their label's
      margin (a robust z alone flags confident clean samples the bounds trim a little; 0: the z alone).
    - blur_sigma [0.5, eighth selection; null: off]: also flag, by the same z and cut, samples whose label
      margin a Gaussian blur of this many pixels removes (a global high-frequency trigger, as blend).
    - occlusion_share [0.9, ninth selection; null: off]: with at least ``OCCLUSION_MIN_FLAGS`` samples
      flagged (this round or before), the pixels where this share of them hold one value that at most half
      the set holds are occluded with the set's per-pixel median; samples whose label margin the occlusion
      removes are flagged by the same z and cut (the rest of a stamped trigger's poison).
    - label_rejection [0.5, tenth selection; null: off]: a sample is *rejected* when the clients' ensemble
      (after clean local training) holds its label with at most half the probability the model they
      received did; a label is rejected when at least this share of its samples are and that share is a
      robust outlier among the labels (z > audit_z); the rejected samples of a rejected label are flagged.
    - require_flip [False]: flag only samples whose bounded prediction leaves their label.
    - audit_passes [1]: audit -> refit passes per round.
    - correct [True]: corrective distillation of flagged samples (False: they only leave fusion).
    - reject_clients [True]: constrained aggregation; client_z [10]: threshold on the |robust z| of a
      client's log bound divergence; norm_ratio [2.0, seventh selection; null: off]: also refuse a client
      whose parameter-update norm exceeds this multiple of the round's median (a ratio, not a z: benign
      IID clients' norms agree so closely that their MAD is tiny).
    - target_agreement [0.98] of the bounds' fit (``actbound``'s 0.95 lets them change 12-25 % of clean
      predictions on Fashion-MNIST); kept_trim [null: trim]: trim of the bounds kept after each round,
      fitted on the audited set (0: they must preserve every unflagged sample).
    - constrain_teachers [False]: clamp every teacher and the student while the server distils.
    - bounded_student [False, fourth selection]: whether the student distils under its bounds: false
      never, true always, null in the rounds whose audit flagged samples and refitted the bounds.
    - deploy_bounds [False, fifth selection]: whether the model evaluated and kept after each round runs
      under its bounds (true: the paper's clamped model); false: the bounds serve the audit and the
      client rule, the weights alone are the defended model.
    """

    consumes = frozenset({"synthetic", "updates"})
    OCCLUSION_MIN_FLAGS = 50  # fewer flagged images share some pixel value by chance (~0.5^(0.9 n) per pixel)
    REJECTED_BELIEF = 0.5  # a sample is rejected when the clients keep at most this share of the broadcast belief
    omit_at_default = {**ActivationBounds.omit_at_default, "kept_trim": None, "audit_passes": 1,
                       "require_flip": False, "bounded_student": None,
                       "deploy_bounds": True, "margin_cut": 0.0,
                       "norm_ratio": None, "blur_sigma": None,
                       "occlusion_share": None, "label_rejection": None}  # added after results were published

    def __init__(self, audit_z: float = 3.0, signals: str = "margin", constrain_teachers: bool = False,
                 correct: bool = True, reject_clients: bool = True, client_z: float = 10.0,
                 target_agreement: float = 0.98, kept_trim: float | None = None, audit_passes: int = 1,
                 require_flip: bool = False, bounded_student: bool | None = False, deploy_bounds: bool = False,
                 margin_cut: float = 0.5, norm_ratio: float | None = 2.0, blur_sigma: float | None = 0.5,
                 occlusion_share: float | None = 0.9, label_rejection: float | None = 0.5, **bounds):
        super().__init__(target_agreement=target_agreement, **bounds)
        if audit_z <= 0 or client_z <= 0:
            raise ValueError(f"audit_z and client_z must be > 0, got {audit_z} and {client_z}")
        if norm_ratio is not None and norm_ratio <= 1:
            raise ValueError(f"norm_ratio must be > 1 (a multiple of the median update norm) or null, "
                             f"got {norm_ratio}")
        if blur_sigma is not None and not 0 < blur_sigma <= 5:
            raise ValueError(f"blur_sigma must be in (0, 5] pixels or null, got {blur_sigma}")
        if occlusion_share is not None and not 0.5 < occlusion_share <= 1:
            raise ValueError(f"occlusion_share must be in (0.5, 1] (a share of the flagged samples) or null, "
                             f"got {occlusion_share}")
        if label_rejection is not None and not 0 < label_rejection <= 1:
            raise ValueError(f"label_rejection must be in (0, 1] (a share of a label's samples) or null, "
                             f"got {label_rejection}")
        if signals not in SIGNALS:
            raise ValueError(f"signals {signals!r} unknown; valid: {', '.join(SIGNALS)}")
        if kept_trim is not None and not 0 <= kept_trim < 1:
            raise ValueError(f"kept_trim must be in [0, 1) or null, got {kept_trim}")
        if not 0 <= margin_cut <= 1:
            raise ValueError(f"margin_cut must be in [0, 1], got {margin_cut}")
        if audit_passes < 1:
            raise ValueError(f"audit_passes must be >= 1, got {audit_passes}")
        self.audit_z, self.signals, self.constrain_teachers, self.correct = audit_z, signals, constrain_teachers, correct
        self.reject_clients, self.client_z, self.norm_ratio = reject_clients, client_z, norm_ratio
        self.kept_trim, self.audit_passes, self.require_flip = kept_trim, audit_passes, require_flip
        self.bounded_student, self.deploy_bounds, self.margin_cut = bounded_student, deploy_bounds, margin_cut
        self.blur_sigma, self.occlusion_share, self.label_rejection = blur_sigma, occlusion_share, label_rejection
        self._broadcast: dict[int, torch.Tensor] = {}  # label probability under the model the clients received
        self._teacher_handles: list = []

    @property
    def uses_client_belief(self) -> bool:
        """Whether the audit compares the clients' belief in each label with the broadcast model's."""
        return self.signals in ("both", "belief") or self.label_rejection is not None

    def before_round(self, global_model, prototype, ctx):
        syn = ctx.synthetic
        if prototype not in self._states and self.reject_clients:
            images = self.preservation_data(prototype, syn)
            self.fit(global_model, self.state_for(global_model, prototype, images), images, self.steps,
                     (ctx.seed, ctx.round, "broadcast"))
        super().before_round(global_model, prototype, ctx)  # bounds active only if broadcast: what clients get
        if self.uses_client_belief:
            self._broadcast[prototype] = label_probability([global_model], syn.images, syn.labels, ctx.device)

    def aggregate(self, agg, global_model, ctx):
        state = self._states.get(agg.updates[0].prototype) if agg.updates else None
        if not self.reject_clients or state is None or len(agg.updates) < 3:
            return agg
        syn = ctx.synthetic
        probe = torch.randperm(len(syn), generator=torch_generator(ctx.seed, "actaudit-probe", ctx.round))[:512]
        images = syn.images[probe.to(syn.images.device)]
        divergence = []
        for update in agg.updates:
            state.enabled = False
            free = logits(update.model, images, 500, ctx.device)
            handles = clamp_model(state, update.model)
            state.enabled = True
            bounded = logits(update.model, images, 500, ctx.device)
            for h in handles:
                h.remove()
            divergence.append(F.kl_div(F.log_softmax(bounded, -1), F.log_softmax(free, -1), log_target=True,
                                       reduction="batchmean").item())
        state.enabled = False
        z = robust_z(torch.tensor(divergence).clamp_min(1e-8).log())
        admitted = z.abs() <= self.client_z
        ids = [u.client_id for u in agg.updates]
        if self.norm_ratio is not None:  # parameters only (fl_core.updates), never BatchNorm buffers
            norms = deltas(agg.updates, global_model).norm(dim=1)
            ratio = norms / median(norms).clamp_min(1e-12)
            admitted &= ratio <= self.norm_ratio
            ctx.report(update_norm_ratio={i: round(float(v), 3) for i, v in zip(ids, ratio)})
        ctx.report(bound_divergence={i: round(d, 4) for i, d in zip(ids, divergence)})
        admitted = admitted.nonzero().flatten().tolist()
        return agg.admit(admitted) if len(admitted) < len(agg.updates) else agg

    def audit(self, global_model, prototype: int, teachers: list[nn.Module], ctx) -> tuple[torch.Tensor, dict]:
        """(flags over the synthetic set, summary) from the margin drop under the bounds, the belief drop,
        the margin drop under a blur, the clients' rejection of a label and, given these and earlier rounds'
        flags, the margin drop under an occlusion of the pixels the flagged samples share."""
        syn, state = ctx.synthetic, self._states[prototype]
        labels = syn.labels.cpu()
        state.enabled = False
        unbounded = class_margins(logits(global_model, syn.images, 500, ctx.device), labels)
        state.enabled = True
        bounded = class_margins(logits(global_model, syn.images, 500, ctx.device), labels)
        state.enabled = False
        scores = {}
        if self.signals in ("both", "margin"):
            scores["margin"] = robust_z(unbounded - bounded)
        after = (label_probability(teachers, syn.images, syn.labels, ctx.device)
                 if teachers and self.uses_client_belief else None)
        if self.signals in ("both", "belief") and teachers:  # (a prototype without teachers: margin only)
            scores["belief"] = robust_z(self._broadcast[prototype] - after)
        # each signal's count is its z alone, before the cut (as recorded since the first selection);
        # blur_flags below counts the blur rule's flags after it
        summary = {f"{k}_flags": int((v > self.audit_z).sum()) for k, v in scores.items()}
        flags = torch.zeros(len(syn), dtype=torch.bool)
        if scores:
            flags = self.cut(torch.stack(list(scores.values())).mean(0), unbounded - bounded, unbounded)
            if self.require_flip:  # only samples whose label the bounds overturn
                flags &= bounded < 0
        if self.blur_sigma is not None:
            drop = blur_margin_drop(global_model, syn.images, labels, unbounded, self.blur_sigma, ctx.device)
            blur_flags = self.cut(robust_z(drop), drop, unbounded)
            summary["blur_flags"] = int(blur_flags.sum())
            flags |= blur_flags
        if self.label_rejection is not None and teachers:
            rejection_flags, rejected = self.rejection_audit(self._broadcast[prototype], after, labels, ctx.num_classes)
            summary["rejected_labels"] = rejected
            if rejected:
                summary["rejection_flags"] = int(rejection_flags.sum())
                flags |= rejection_flags
        known = flags | self._flagged[prototype] if prototype in self._flagged else flags
        if self.occlusion_share is not None and known.sum() >= self.OCCLUSION_MIN_FLAGS:
            occlusion_flags, pixels = self.occlusion_audit(global_model, syn.images, labels, unbounded, known,
                                                           ctx.device)
            summary["occluded_pixels"] = pixels
            if pixels:
                summary["occlusion_flags"] = int(occlusion_flags.sum())
                flags |= occlusion_flags
        return flags, summary

    def rejection_audit(self, belief: torch.Tensor, after: torch.Tensor, labels: torch.Tensor,
                        num_classes: int) -> tuple[torch.Tensor, list[int]]:
        """(flags, rejected labels): a sample is rejected when the clients' probability of its label
        (``after``) is at most ``REJECTED_BELIEF`` of the broadcast model's (``belief``); a label is rejected
        when at least ``label_rejection`` of its samples are and that share is a robust outlier among the
        labels (z > ``audit_z``); the rejected samples of the rejected labels are flagged."""
        rejected = after <= self.REJECTED_BELIEF * belief
        share = (torch.bincount(labels, weights=rejected.float(), minlength=num_classes)
                 / torch.bincount(labels, minlength=num_classes).clamp_min(1))
        suspect = (share >= self.label_rejection) & (robust_z(share) > self.audit_z)
        return rejected & suspect[labels], suspect.nonzero().flatten().tolist()

    def occlusion_audit(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, margin: torch.Tensor,
                        known: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        """(flags, number of occluded pixels): the pixels the ``known`` flagged images share
        (``shared_pixels`` at ``occlusion_share``) are replaced by the set's per-pixel median, and the
        samples whose label ``margin`` the occlusion removes are flagged by ``cut``."""
        mask = shared_pixels(images, known.to(images.device), self.occlusion_share)
        if not mask.any():
            return torch.zeros(len(images), dtype=torch.bool), 0
        drop = margin_drop(model, torch.where(mask, images.median(0).values, images), labels, margin, device)
        return self.cut(robust_z(drop), drop, margin), int(mask.sum())

    def cut(self, z: torch.Tensor, drop: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """Samples whose score ``z`` exceeds ``audit_z`` and whose label ``margin`` loses at least the share
        ``margin_cut`` of its size (``drop``): a large drop, not just a large z on a confident sample."""
        flags = z > self.audit_z
        if self.margin_cut:
            flags &= drop >= self.margin_cut * margin.abs()
        return flags

    def on_fusion(self, plan, global_model, ctx):
        plan = super().on_fusion(plan, global_model, ctx)
        p = plan.prototype
        images = self.preservation_data(p, ctx.synthetic)
        new = p not in self._states
        state = self.state_for(global_model, p, images)
        self.fit(global_model, state, images, self.steps if new else self.refine_steps, (ctx.seed, ctx.round, "audit"))
        same = [u.model for u in plan.teachers if u.prototype == p]
        refit = False
        for audit_pass in range(self.audit_passes):  # each pass audits with bounds freed of the last flags
            flags, summary = self.audit(global_model, p, same, ctx)
            previous = self._flagged.get(p)
            flags = flags | previous if previous is not None else flags
            self._flagged[p] = flags
            if flags.any() and self.refine_steps:  # bounds that need not preserve the flagged samples
                later = [audit_pass] if audit_pass else []  # the first pass keeps the one-pass random stream
                self.fit(global_model, state, self.preservation_data(p, ctx.synthetic), self.refine_steps,
                         (ctx.seed, ctx.round, "audited", *later))
                refit = True
        # null: the student distils under the bounds exactly when the audit refitted them
        state.enabled = refit if self.bounded_student is None else self.bounded_student
        if self.correct:
            plan.label_weight = (~flags).float()
            plan.target_mask = F.one_hot(ctx.synthetic.labels.cpu(), ctx.num_classes).bool() & flags[:, None]
        else:
            plan.keep = plan.keep & ~flags.to(plan.keep.device)
        if self.constrain_teachers:
            self._teacher_handles += [h for m in same for h in clamp_model(state, m)]
            state.enabled = True  # teachers and student clamped while the server distils
        ctx.report(flagged_synthetic=flags.nonzero().flatten().tolist(), student_bounded=float(state.enabled),
                   **summary)
        return plan

    def after_round(self, global_model, prototype, ctx):
        for handle in self._teacher_handles:
            handle.remove()
        self._teacher_handles.clear()
        return super().after_round(global_model, prototype, ctx)

