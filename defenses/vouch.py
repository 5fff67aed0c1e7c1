"""Client vouching: no FM label reaches a model until clients that never saw one vouch for it.

The threat model gives the server one trustworthy signal: benign clients train on private clean data.
A client that started from a model pre-trained on the FM's labels inherits whatever those labels taught
(the backdoor survives clean fine-tuning), so its opinion of a label is worthless; a client that started
from a model that never saw an FM label is not. The defense therefore

1. discards the server's pre-training before round 1 is broadcast, and keeps every FM label out of
   fusion (pure distillation from the clients) until round ``vouch_round``;
2. in that round, keeps (vouches for) the synthetic samples whose FM label is the top class of the
   clients' ensemble: every client of the round, whatever its prototype (the ensemble fusion distils
   from), so every prototype's model gets one judgement. With ``scope: outliers`` only the classes
   where rejected labels pile up need the vouch; the labels of every other class are kept. From then
   on only the kept samples get CE weight (the others are still distilled on, towards the clients'
   ensemble, which unlearns what their labels would teach);
3. trains the fused model on the vouched samples with the server's pre-training recipe (the
   pre-training step 1 postponed), under FedDF and FedAvg alike; with ``fresh``, from a fresh
   initialisation, so that nothing the vouching round's clients sent stays in the model;
4. with ``clip``, bounds every client update by the median update norm of its round and prototype,
   so that no client weighs more than a typical one (boosted updates lose their boost); with ``trust``
   instead, weighs the updates by FLTrust's rule against the server's own update on the samples it
   trusts (the vouched ones once judged).

Nothing in it looks at pixels or at a trigger: it reads whether a label is supported by models that
learned from clean data only, which every relabelling backdoor breaks alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defenses import DEFENSES, Defense
from defenses._synthetic import head, reinitialise
from defenses.fltrust import root_update, trust_aggregate
from fl_core.data import batch_loader
from fl_core.hooks import Aggregation
from fl_core.metrics import logits
from fl_core.modules import MASKED_LOGIT, SupervisedModule, fit
from fl_core.seeding import derive_seed
from fl_core.updates import clip_rows, deltas, median, set_delta


RESTART = ("all", "head")  # what is re-initialised before round 1: the whole model, or its classifier head
SCOPES = ("all", "outliers", "pairs", "asymmetric", "surplus")  # which labels need the clients' vouch
SUSPECT_SCOPES = SCOPES[1:]  # the scopes that find suspect classes (``all`` vouches everywhere)
OUTLIER_Z = 3.5  # the modified z-score cut-off of Iglewicz and Hoaglin (1993), not tuned here


def clip_to_median(agg: Aggregation, global_model) -> list[float]:
    """Clip every admitted update's parameter delta to the median delta norm (in place); the norms."""
    matrix = deltas(agg.updates, global_model)
    norms = matrix.norm(dim=1)
    for update, row in zip(agg.updates, clip_rows(matrix, median(norms))):
        set_delta(update, global_model, row)
    return [round(float(n), 4) for n in norms]


@torch.no_grad()
def label_rank(models, images: torch.Tensor, labels: torch.Tensor, device,
               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, how many classes the weighted mean of the models' softmax outputs ranks above its label
    (0: the label is the ensemble's top class), and that mean (the ensemble's probabilities, on the CPU)."""
    probs = torch.stack([F.softmax(logits(m, images, 500, device).float(), 1) for m in models])
    mean = torch.einsum("m,mnc->nc", weights.float() / weights.sum(), probs).cpu()
    return (mean > mean.gather(1, labels.cpu()[:, None])).sum(1), mean


NORMAL_MAD = 0.6745  # the MAD of a standard normal variable


def high_outliers(values: torch.Tensor, min_mad: float = 1.0) -> torch.Tensor:
    """Bool per entry: a high outlier of ``values`` (modified z-score 0.6745 (x - median) / MAD above
    ``OUTLIER_Z``; a MAD under ``min_mad`` counts as ``min_mad``: for counts, one sample)."""
    values = values.float()
    med = values.median()
    mad = (values - med).abs().median().clamp_min(min_mad)
    return NORMAL_MAD * (values - med) / mad > OUTLIER_Z


def asymmetry(pairs: torch.Tensor) -> torch.Tensor:
    """Per (label, judged class) count of rejected labels, how far it exceeds its mirrored count (judged,
    label) in standard deviations of a fair split: (n_lj - n_jl) / sqrt(n_lj + n_jl), 0 where both are 0.
    A judge's ordinary confusions go both ways (cat for dog and dog for cat); a one-to-one relabelling
    goes one way only."""
    both = pairs + pairs.T
    return torch.where(both > 0, (pairs - pairs.T) / both.clamp_min(1).sqrt(), torch.zeros_like(both))


def outlier_classes(labels: torch.Tensor, rejected: torch.Tensor, classes: int, surplus: bool = False,
                    judged: torch.Tensor | None = None, asymmetric: bool = False) -> torch.Tensor:
    """Bool per class: its count of rejected labels is a high outlier over the classes; with ``surplus``,
    also a class that holds an outlying number of labels (more than a balanced request gives); with
    ``judged`` (the judge's class per sample), also a class whose rejected labels pile onto one judged
    class (a one-to-one backdoor relabels one source class): an outlier over every (label, judged) pair's
    count or, with ``asymmetric``, over every pair's asymmetry against its mirrored pair (a z-score, so
    its MAD is at least a standard normal's: never more sensitive than a fair split's noise)."""
    labels, rejected = labels.cpu(), rejected.cpu()
    suspect = high_outliers(torch.bincount(labels[rejected], minlength=classes))
    if surplus:
        suspect |= high_outliers(torch.bincount(labels, minlength=classes))
    if judged is not None:
        pairs = torch.bincount(labels[rejected] * classes + judged.cpu()[rejected], minlength=classes * classes)
        pairs = pairs.view(classes, classes).float()
        off = ~torch.eye(classes, dtype=torch.bool)
        flagged = torch.zeros(classes, classes, dtype=torch.bool)
        flagged[off] = (high_outliers(asymmetry(pairs)[off], NORMAL_MAD) if asymmetric
                        else high_outliers(pairs[off]))
        suspect |= flagged.any(1)
    return suspect


class WithoutClasses(nn.Module):
    """``model`` with the classes in ``mask`` left out of its output: their logits are a constant far below
    the rest, so a cross-entropy over the output neither raises nor lowers them."""

    def __init__(self, model: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mask", mask.bool(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).masked_fill(self.mask, MASKED_LOGIT)


@DEFENSES.register("vouch")
class ClientVouching(Defense):
    """Parameters (docs/VOUCH.md says what each was chosen on):

    - ``vouch_round`` (1): the round whose clients' ensemble vouches for labels; before it no FM label
      reaches any model. Later rounds give the clients more clean training (a better judge) but leave
      fewer rounds that profit from the vouched labels.
    - ``retrain`` (True): train the fused model on the vouched samples after the vouching round (the
      postponed pre-training); False: the vouched labels act through fusion's CE term only.
    - ``fresh`` (False): the retraining starts from a fresh initialisation instead of the fused model: the
      vouching round's clients only judge, and what a malicious one taught the model in that round (from
      a restarted model every update points alike) is dropped with it.
    - ``clip`` (True): clip client updates to the round's median norm before aggregation.
    - ``trust`` (False): instead of the clip (set ``clip: false``), weigh client updates by FLTrust's rule
      (Cao et al. 2021): trust ReLU(cos(update, g0)), every update rescaled to ||g0||, where g0 is the
      server's own update, trained as the clients train on the synthetic samples it trusts: the vouched
      ones once judged, every one before (with ``fresh``, no trust is weighed in the vouching round: its
      model is dropped). A backdoor's updates share the task's direction only in part.
    - ``top_k`` (1): a label is vouched for when it is among the ensemble's ``top_k`` classes.
    - ``restart`` ("all"): what is re-initialised before round 1 (``head``: the classifier head only).
    - ``scope`` ("all"): which labels need the clients' vouch. ``outliers``: only the labels of the
      classes that collect an outlying number of rejected labels (a relabelling backdoor piles its
      rejected labels into its target class); every other label is kept. The rest of the synthetic
      set then still teaches the restarted model. ``surplus``: also the classes that hold an outlying
      number of labels (a relabelling backdoor that adds its samples to the target inflates it; one that
      keeps the class counts balanced leaves only the rejection test). ``pairs``: also the classes whose
      rejected labels pile onto one judged class (an outlying (label, judged class) pair: a one-to-one
      backdoor moves one source class into its target, too few samples to stand out per class).
      ``asymmetric``: as ``pairs``, but a pair is outlying by its asymmetry against the mirrored pair
      (label and judged class swapped), which discounts the judge's own two-way confusions.
    - ``correct`` (False): in the retraining, give the rejected samples of the suspect classes the
      clients' ensemble's top class instead of dropping them, so that the images a backdoor relabelled
      teach their own class (and outweigh the few poisoned labels the judge still vouches for).
    - ``exclude`` (False): no label of a suspect class is used, vouched or not: a judge that ranks a
      poisoned image's target first by chance vouches for it, so a suspect class's vouched labels still
      carry poison. The class is learnt from the clients only (their updates and, under FedDF, fusion's
      distillation); the retraining leaves its output out of the cross-entropy (neither taught nor
      unlearnt), and the root data of ``trust`` holds none of its samples.
    - ``fusion_labels`` (False): with ``exclude``, only the retraining goes without the suspect classes'
      labels; fusion's CE term and the root data of ``trust`` keep their vouched ones (as without
      ``exclude``). The long retraining is where a few leaked labels implant a trigger; fusion's short step,
      mostly distillation from the clients, is where the class can be relearnt.
    - ``distil`` (False): no sample of a suspect class keeps its FM label, vouched or not: the retraining
      fits them to the clients' ensemble's probabilities and fusion only distils them. A clean judge's
      probabilities follow an image's content, not its trigger, so the poisoned images the judge vouches
      for by chance cannot teach the trigger.
    """

    consumes = frozenset({"updates", "synthetic"})
    omit_at_default = {"distil": False, "trust": False, "fresh": False,  # added after the first test run
                       "exclude": False, "fusion_labels": False,
                       # retired after rounds 9 (commit 23022cf has them), 10 (c7536f3) and 12 (1355b9e,
                       # 0a901a6); at these values they changed nothing, so the cells run while they existed
                       # keep their keys
                       "average": True, "spare": False, "clients_teach": False, "renew": False,
                       "before_fusion": False, "readout": False}

    def __init__(self, vouch_round: int = 1, retrain: bool = True, clip: bool = True, restart: str = "all",
                 top_k: int = 1, scope: str = "all", correct: bool = False, distil: bool = False,
                 trust: bool = False, fresh: bool = False, exclude: bool = False, fusion_labels: bool = False):
        if vouch_round < 1:
            raise ValueError(f"vouch_round must be >= 1, got {vouch_round}")
        if restart not in RESTART:
            raise ValueError(f"restart {restart!r} unknown; valid: {', '.join(RESTART)}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} unknown; valid: {', '.join(SCOPES)}")
        if trust and clip:
            raise ValueError("trust replaces the median-norm clip: set clip: false")
        if fresh and not retrain:
            raise ValueError("fresh restarts the retraining: it needs retrain: true")
        for name, value in (("correct", correct), ("distil", distil), ("exclude", exclude)):
            if value and scope == "all":
                raise ValueError(f"{name} needs scope {' / '.join(SUSPECT_SCOPES)}: it acts on the suspect classes")
        if fusion_labels and not (exclude and retrain):
            raise ValueError("fusion_labels keeps the suspect classes' vouched labels in fusion: it needs exclude: true "
                             "and retrain: true")
        if sum((correct, distil, exclude)) > 1:
            raise ValueError("correct, distil and exclude each decide the suspect classes' labels: choose one")
        self.vouch_round, self.retrain, self.clip, self.restart, self.top_k = vouch_round, retrain, clip, restart, top_k
        self.scope, self.correct, self.distil, self.trust, self.fresh = scope, correct, distil, trust, fresh
        self.exclude, self.fusion_labels = exclude, fusion_labels
        self._suspect: torch.Tensor | None = None  # with exclude, once judged: bool per class, suspect
        self._vouched: dict[int, torch.Tensor] = {}  # prototype -> bool mask over ctx.synthetic: keeps its FM label
        self._relabelled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # prototype -> (indices, (N, C) targets)
        self._judges: list[tuple] = []  # the vouching round's (client model, weight), every prototype's
        self._judgement: tuple | None = None  # what ``judge`` decided in the vouching round

    def check(self, cfg) -> None:
        if cfg.fl.rounds < self.vouch_round:
            raise ValueError(f"defense.vouch_round {self.vouch_round} is after the last round ({cfg.fl.rounds}): "
                             "no label would ever be vouched for")

    def before_round(self, global_model, prototype, ctx):
        if ctx.round == 1:
            reinitialise(global_model if self.restart == "all" else head(global_model),
                         derive_seed(ctx.seed, "vouch", prototype))

    def changes_broadcast(self, round_idx: int) -> bool:
        return round_idx == 1

    def aggregate(self, agg, global_model, ctx):
        if not agg.updates:
            return agg
        if self.clip and len(agg.updates) > 1:
            ctx.report(norms=clip_to_median(agg, global_model))
        if self.trust and not (self.fresh and ctx.round <= self.vouch_round):  # fresh drops these rounds' model
            agg = self.trust_weigh(agg, global_model, ctx)
        if ctx.round == self.vouch_round and ctx.synthetic is not None:
            self._judges += [(u.model, w) for u, w in zip(agg.updates, agg.weights)]
        return agg

    def trust_weigh(self, agg, global_model, ctx):
        """FLTrust's aggregation with the synthetic samples this prototype trusts as root data."""
        data, vouched = ctx.synthetic, self._vouched.get(agg.updates[0].prototype)
        images, labels = data.images, data.labels
        if vouched is not None:
            images, labels = images[vouched.to(images.device)], labels[vouched.to(labels.device)]
        g0 = root_update(global_model, ctx, [u.num_samples for u in agg.updates], images, labels)
        return trust_aggregate(agg, global_model, ctx, g0)

    def vouch(self, prototype: int, ctx) -> torch.Tensor | None:
        """The mask over ``ctx.synthetic`` (True: the FM label is kept) from the vouching round on, None
        before it. It is judged once, on the first call after the vouching round's aggregations, by the
        ensemble of every client of the round, all prototypes together (the ensemble fusion distils from),
        and every prototype's model gets that judgement."""
        if self._judges:
            models, weights = zip(*self._judges)
            self._judges = []
            self._judgement = self.judge(list(models), torch.stack(list(weights)), ctx)
        if self._judgement is None or ctx.round != self.vouch_round:
            return self._vouched.get(prototype)
        vouched, relabelled, report = self._judgement
        if prototype not in self._vouched:
            self._vouched[prototype] = vouched
            if relabelled is not None:
                self._relabelled[prototype] = relabelled
            ctx.report(**report)
        return vouched

    def judge(self, models: list, weights: torch.Tensor, ctx) -> tuple:
        """(kept mask, relabelled samples or None, decisions to report) of the clients' ensemble ``models``."""
        data = ctx.synthetic
        rank, probs = label_rank(models, data.images, data.labels, ctx.device, weights)
        vouched, relabelled, report = rank < self.top_k, None, {}
        if self.scope != "all":
            suspect = outlier_classes(data.labels, ~vouched, ctx.num_classes, surplus=self.scope == "surplus",
                                      judged=probs.argmax(1) if self.scope in ("pairs", "asymmetric") else None,
                                      asymmetric=self.scope == "asymmetric")
            in_suspect = suspect[data.labels.cpu()]
            vouched |= ~in_suspect
            if self.exclude:
                self._suspect = suspect  # the retraining leaves these classes' labels out
                if not self.fusion_labels:
                    vouched &= ~in_suspect
            elif self.distil:
                vouched &= ~in_suspect
                idx = in_suspect.nonzero().flatten()
                relabelled = idx, probs[idx]
            elif self.correct:
                idx = (~vouched).nonzero().flatten()
                relabelled = idx, F.one_hot(probs[idx].argmax(1), ctx.num_classes).float()
            report["suspect_classes"] = suspect.nonzero().flatten().tolist()
        report.update(vouched=int(vouched.sum()), flagged_synthetic=(~vouched).nonzero().flatten().tolist())
        return vouched, relabelled, report

    def on_fusion(self, plan, global_model, ctx):
        vouched = self.vouch(plan.prototype, ctx)
        weight = torch.zeros(len(plan.keep)) if vouched is None else vouched.float()
        plan.label_weight = weight if plan.label_weight is None else plan.label_weight * weight
        return plan

    def after_round(self, global_model, prototype, ctx):
        vouched = self.vouch(prototype, ctx)
        if (ctx.round != self.vouch_round or not self.retrain or vouched is None
                or not (vouched.any() or prototype in self._relabelled)):
            return global_model
        data, recipe = ctx.synthetic, ctx.pretraining
        if self.exclude:  # judged by now: the retraining follows the vouching round's judgement
            vouched = vouched & ~self._suspect[data.labels.cpu()]
        keep = vouched.nonzero().flatten()
        labels = data.labels[keep.to(data.labels.device)]
        if prototype in self._relabelled:  # class probabilities as targets: one-hot FM labels, then the relabelled
            idx, targets = self._relabelled[prototype]
            labels = F.one_hot(labels, targets.shape[1]).float()
            keep, labels = torch.cat([keep, idx]), torch.cat([labels, targets.to(labels.device)])
        images = data.images[keep.to(data.images.device)]
        if self.fresh:
            reinitialise(global_model, derive_seed(ctx.seed, "vouch-fresh", prototype))
        steps = recipe.epochs * -(-len(labels) // recipe.optim.batch_size)
        model = global_model
        if self.exclude and self._suspect.any():  # the suspect classes' outputs rest
            model = WithoutClasses(global_model, self._suspect.to(images.device))
        if steps:
            loader = batch_loader(images, labels, recipe.optim.batch_size, derive_seed(ctx.seed, "vouch-train"),
                                  steps=steps)
            fit(SupervisedModule(model, recipe.optim, recipe.augment, derive_seed(ctx.seed, "vouch-aug")),
                loader, ctx.accelerator)
        return global_model
