"""Clean accuracy (ACC), attack success rate (ASR) and robust accuracy (RA) with torchmetrics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from fl_core.data import ImageData, apply_trigger, forward_chunk, to_float
from fl_core.schema import BackdoorConfig


@dataclass
class BackdoorTestSet:
    """Triggered test images whose true label is not the target (all-to-one) or is the source (one-to-one)."""

    images: torch.Tensor  # uint8, trigger applied
    labels: torch.Tensor  # true labels
    targets: torch.Tensor  # the attacker's target label per sample


def backdoor_test_set(test: ImageData, backdoor: BackdoorConfig, trigger, seed: int) -> BackdoorTestSet:
    """Apply ``trigger`` to the eligible test samples (see :class:`BackdoorTestSet`)."""
    if backdoor.mapping == "one-to-one":
        keep = test.labels == backdoor.source
    else:
        keep = test.labels != backdoor.target
    labels = test.labels[keep]
    images = apply_trigger(trigger, test.images[keep], labels, seed=seed)
    return BackdoorTestSet(images, labels, torch.full_like(labels, backdoor.target))


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits (on the CPU) of uint8 images, in eval mode and chunks; the model's mode is restored."""
    was_training = model.training
    model.eval()
    step = forward_chunk(device, batch_size)
    out = [model(to_float(images[i: i + step].to(device))).cpu() for i in range(0, len(images), step)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def predict(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predicted labels (on the CPU) of uint8 images, in eval mode; the model's mode is restored."""
    if not len(images):
        return torch.empty(0, dtype=torch.long)
    return logits(model, images, batch_size, device).argmax(-1)


def accuracy(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Micro accuracy in percent."""
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return 100.0 * float(metric(preds, labels))


def evaluate(model: nn.Module, test: ImageData, backdoor_set: BackdoorTestSet, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """ACC on clean test data, ASR and RA on the triggered set, in percent."""
    k = test.num_classes
    clean = predict(model, test.images, batch_size, device)
    triggered = predict(model, backdoor_set.images, batch_size, device)
    return {
        "acc": accuracy(clean, test.labels, k),
        "asr": accuracy(triggered, backdoor_set.targets, k),
        "ra": accuracy(triggered, backdoor_set.labels, k),
    }


def _rate(hits: int, total: int) -> float | None:
    return round(100.0 * hits / total, 2) if total else None


def client_detection(selected: list[int], malicious: list[int], admitted: list[int]) -> dict:
    """Client-level detection of a round in %: TPR = malicious selected clients not admitted, FPR = benign
    selected clients not admitted (None where a group is empty)."""
    kept = set(admitted)
    rejected = [c for c in selected if c not in kept]
    bad = set(malicious)
    benign = [c for c in selected if c not in bad]
    return {"rejected": rejected, "detection_tpr": _rate(sum(c in bad for c in rejected), len(bad)),
            "detection_fpr": _rate(sum(c not in bad for c in rejected), len(benign))}


def sample_detection(flagged: set[int], poisoned: torch.Tensor | None, flagging: bool) -> dict:
    """Sample-level detection of synthetic poison in %: recall and precision of the ``flagged`` sample
    indices against the attack's ``poisoned`` ones (None where not defined: no flagging defense, no
    ground truth, nothing poisoned or nothing flagged)."""
    if not flagging:
        return {}
    truth = set(poisoned.tolist()) if poisoned is not None else None
    hits = len(flagged & truth) if truth is not None else 0
    return {"flagged": len(flagged),
            "flag_recall": _rate(hits, len(truth)) if truth is not None else None,
            "flag_precision": _rate(hits, len(flagged)) if truth is not None else None}
