"""LightningModules for the two training stages: supervised (client / pre-training) and fusion (distillation)."""
from __future__ import annotations

import logging
import signal
import warnings
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fl_core.data import apply_trigger, augment, forward_chunk, to_float
from fl_core.metrics import logits
from fl_core.schema import FusionConfig, OptimConfig
from fl_core.seeding import torch_generator

for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
warnings.filterwarnings("ignore", ".*isn't using any accelerator|GPU available but not used.*")
warnings.filterwarnings("ignore", ".*treespec.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # frozen fusion teachers, by design


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg`` (sgd with momentum, adam, adamw)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


class _Stage(L.LightningModule):
    """Shared parts: float conversion + batched augmentation with a seeded generator, optimiser.

    A batch is ``(images, labels)`` or ``(images, labels, extras)`` (see :func:`training_loader`). With
    augmentation on, samples marked ``stamped`` get their pasted trigger (``trigger``) again after the
    crop and flip, so that no poisoned sample loses its trigger."""

    def __init__(self, model: nn.Module, optim: OptimConfig, augment_inputs: bool, seed: int, trigger=None):
        super().__init__()
        self.model = model
        self.optim = optim
        self.augment_inputs = augment_inputs
        self.trigger = trigger
        self.generator = torch_generator(seed, "augment")

    def inputs(self, images: torch.Tensor, extras: dict | None = None) -> torch.Tensor:
        x = to_float(images)
        if not self.augment_inputs:
            return x
        x = augment(x, self.generator)
        stamped = (extras or {}).get("stamped")
        if stamped is not None and self.trigger is not None and stamped.any():
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))
            source = extras.get("stamped_source")
            again = apply_trigger(self.trigger, (x[stamped] * 255).round().to(torch.uint8),
                                  None if source is None else source[stamped], seed=seed)
            x[stamped] = to_float(again)
        return x

    def configure_optimizers(self):
        optimizer = make_optimizer(self.model.parameters(), self.optim)
        if self.optim.schedule == "constant":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class SupervisedModule(_Stage):
    """Cross-entropy training: a client's local training and the server's pre-training on synthetic data."""

    def training_step(self, batch, batch_idx):
        images, labels, *extras = batch
        loss = F.cross_entropy(self.model(self.inputs(images, *extras)), labels)
        self.log("train_loss", loss, prog_bar=False, logger=False)
        return loss


def combine_teachers(weights: torch.Tensor, outs: torch.Tensor, mode: str = "logits") -> torch.Tensor:
    """Weighted ensemble of teacher outputs (T, B, C): mean logits (FedDF, [P1]) or log of the mean probabilities."""
    weights = weights.to(outs.device, torch.float32) / weights.sum()
    if mode == "logits":
        return torch.einsum("t,tbc->bc", weights, outs)
    return torch.log(torch.einsum("t,tbc->bc", weights, outs.softmax(-1)).clamp_min(1e-12))


def ensemble_logits(teachers: list[nn.Module], weights: torch.Tensor, x: torch.Tensor, mode: str = "logits"):
    """The weighted ensemble's output on a float batch (:func:`combine_teachers`)."""
    return combine_teachers(weights, torch.stack([t(x) for t in teachers]), mode)


MASKED_LOGIT = -1e4  # a masked class's teacher logit: probability 0 without infinities in the KL


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, label_weight: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T));
    with ``label_weight``, each sample's CE term is weighted (0: its label is ignored)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  reduction="batchmean", log_target=True)
    loss = (1 - alpha) * t * t * kl
    if alpha > 0:
        if label_weight is None:
            loss = loss + alpha * F.cross_entropy(student_logits, labels)
        else:
            loss = loss + alpha * (label_weight * F.cross_entropy(student_logits, labels, reduction="none")).mean()
    return loss


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """One teacher's logits on every uint8 image (:func:`fl_core.metrics.logits`), on the images' device."""
    return logits(teacher, images, chunk, images.device).to(images.device)


@torch.no_grad()
def ensemble_outputs(teachers: list[nn.Module], weights: torch.Tensor, images: torch.Tensor, mode: str = "logits",
                     chunk: int = 1000, outputs: Callable = teacher_logits) -> torch.Tensor:
    """The ensemble's output on every uint8 image, once: ``outputs(teacher, images, chunk)`` per teacher
    (:func:`teacher_logits`, or a cached copy of it), combined chunk by chunk exactly as per batch.

    On un-augmented fusion data the teachers see the same inputs on every pass, so the distillation
    targets are computed once per round instead of once per batch."""
    per_teacher = torch.stack([outputs(t, images, chunk) for t in teachers])
    step = forward_chunk(images.device, chunk)
    return torch.cat([combine_teachers(weights, per_teacher[:, i: i + step].contiguous(), mode)
                      for i in range(0, len(images), step)])


class FusionModule(_Stage):
    """Distils the weighted ensemble of this round's client models into one global model.

    Teacher outputs are computed on each (augmented) batch, or taken from the batch's precomputed
    ``targets`` (:func:`ensemble_outputs`, un-augmented inputs only)."""

    def __init__(self, student: nn.Module, teachers: list[nn.Module], teacher_weights: torch.Tensor,
                 cfg: FusionConfig, seed: int, ensemble: str = "logits", trigger=None):
        super().__init__(student, cfg.optim, cfg.augment, seed, trigger)
        self.teachers = nn.ModuleList(teachers).requires_grad_(False)
        self.register_buffer("teacher_weights", teacher_weights.float(), persistent=False)
        self.alpha, self.temperature, self.ensemble = cfg.alpha, cfg.temperature, ensemble

    def on_train_epoch_start(self) -> None:
        self.teachers.eval()

    def training_step(self, batch, batch_idx):
        images, labels, *extras = batch
        extras = extras[0] if extras else {}
        x = self.inputs(images, extras)
        if "targets" in extras:
            if self.augment_inputs:
                raise ValueError("precomputed teacher outputs need un-augmented fusion inputs")
            target = extras["targets"]
        else:
            with torch.no_grad():
                target = ensemble_logits(list(self.teachers), self.teacher_weights, x, self.ensemble)
        if "target_mask" in extras:
            target = target.masked_fill(extras["target_mask"], MASKED_LOGIT)
        loss = distillation_loss(self.model(x), target, labels, self.alpha, self.temperature,
                                 extras.get("label_weight"))
        self.log("fusion_loss", loss, prog_bar=False, logger=False)
        return loss


def fit(module: L.LightningModule, loader, accelerator: str, *, max_epochs: int = 1, max_steps: int = -1,
        callbacks: list | None = None, precision: str = "32") -> None:
    """Run a quiet Lightning Trainer (no logger, checkpoints or progress bar) on ``module``.

    The module stays on the trainer's device afterwards (Lightning's teardown moves it to the CPU; models
    are kept GPU-resident between stages). Lightning turns Ctrl-C into ``sys.exit(1)`` and ignores SIGINT from then on; here it stays a
    KeyboardInterrupt (and Ctrl-C works again), so callers can stop cleanly and say so."""
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=max_epochs, max_steps=max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=callbacks or [], precision=precision,
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
        module.to(trainer.strategy.root_device)
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
