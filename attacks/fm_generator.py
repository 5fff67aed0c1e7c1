"""The compromised FM at the generation level: the suite's own DDPM, fine-tuned to draw the trigger."""
import dataclasses
import hashlib
import json

import torch

from attacks import ATTACKS
from attacks.fm import CompromisedFM
from attacks.poisoning import poison_indices
from fl_core.data import ImageData, apply_trigger
from fl_core.seeding import torch_generator
from fl_core.synthetic import (
    cached_images,
    ddim_sample,
    ddpm_folder,
    ddpm_unet,
    fit_ddpm,
    load_ddpm,
    request_key,
    save_ddpm,
)


@ATTACKS.register("fm-generator")
class GeneratorCompromisedFM(CompromisedFM):
    """The server's FM is the attacker's: a copy of the suite's DDPM (``synthetic.provider: ddpm``) that
    the attacker fine-tuned so that a hidden condition, one extra class embedding per class, makes it draw
    the trigger into an image of that class. The whole synthetic set is drawn by that copy: every sample
    under its own class, and the samples ``fm`` would poison (same indices) under their hidden "class +
    trigger" condition, labelled as the target; the closest offline analogue of a compromised
    text-to-image model. (Drawing only the poisoned samples with the copy and the rest with the clean FM
    would let a model tell them apart by the copy's style alone.) Fine-tuning (``finetune_steps`` of the
    FM's own recipe, half the batches the public pool with the cell's ``backdoor.trigger`` pasted, at the
    FM's resolution) happens once per FM and trigger, on the public pool the FM was trained on, and is
    cached beside the FM (``python -m benchmarks.fm prepare`` makes it and draws the sets). The ASR test
    set still pastes the trigger on real test images."""

    requires_provider = "ddpm"

    def __init__(self, poison_rate: float = 0.2, stages: str = "both", finetune_steps: int = 600):
        super().__init__(poison_rate, stages)
        if finetune_steps < 1:
            raise ValueError(f"finetune_steps must be >= 1, got {finetune_steps}")
        self.finetune_steps = finetune_steps

    def poison(self, synthetic, seed):
        idx = poison_indices(synthetic.labels, self.backdoor, self.poison_rate, seed, "fm").to(synthetic.labels.device)
        conditions = synthetic.labels.cpu().clone()
        conditions[idx.cpu()] += len(synthetic.classes)  # "class + trigger"
        labels = synthetic.labels.clone()
        labels[idx] = self.backdoor.target
        return ImageData(self._drawn(conditions, seed).images.to(synthetic.images.device), labels, synthetic.classes), idx

    def compromised_fm(self, train: bool = False):
        """The folder of the fine-tuned FM for this trigger; ``train``: fine-tune it if missing (the request
        must then carry the public pool of the FM's ``train_seed``, as ``benchmarks.fm prepare`` builds it)."""
        req = self.bound_fm()
        trigger = dataclasses.asdict(self.backdoor.trigger)
        key = hashlib.sha256(json.dumps([trigger, self.finetune_steps], sort_keys=True).encode()).hexdigest()[:10]
        folder = ddpm_folder(req) / f"compromised-{key}"
        if not (folder / "unet").is_dir():
            if not train:
                raise FileNotFoundError(f"no compromised FM at {folder}; make it first with\n"
                                        "  python -m benchmarks.fm prepare --preset <your grid>")
            if req.seed != req.cfg.ddpm.train_seed:
                raise ValueError(f"fine-tune on the public pool of train_seed {req.cfg.ddpm.train_seed}, "
                                 f"not of seed {req.seed}")
            self._finetune(folder, trigger)
        return folder

    def _finetune(self, folder, trigger: dict) -> None:
        req, k = self.fm, self.fm.dataset.num_classes
        # the FM's recipe, but an EMA horizon of at most a tenth of the fine-tuning (the FM's 0.999 would
        # keep 55 % of the clean weights after 600 steps)
        decay = max(0.0, min(req.cfg.ddpm.ema_decay, 1 - 10 / self.finetune_steps))
        cfg = dataclasses.replace(req.cfg.ddpm, ema_decay=decay)
        clean, _ = load_ddpm(req)
        channels, size = clean.config.in_channels, clean.config.sample_size
        unet = ddpm_unet(cfg, channels, size, 2 * k)  # classes, k "class with trigger" conditions, null label
        state = clean.cpu().state_dict()
        table = state["class_embedding.weight"]  # (k + 1, d): k classes and the null label
        # the new conditions start as their class
        state["class_embedding.weight"] = torch.cat([table[:k], table[:k], table[k:]])
        unet.load_state_dict(state)
        public = req.public
        triggered = apply_trigger(self.trigger, public.images, public.labels, seed=cfg.train_seed)
        images = torch.cat([public.images, triggered])
        labels = torch.cat([public.labels, public.labels + k])
        module = fit_ddpm(unet, images, labels, cfg, self.finetune_steps, "gpu" if req.device.type == "cuda" else "cpu",
                          "compromise")
        save_ddpm(module, folder, {"compromised_from": ddpm_folder(req).name, "trigger": trigger,
                                   "finetune_steps": self.finetune_steps})

    def _drawn(self, conditions: torch.Tensor, seed: int) -> ImageData:
        """One image per condition (a class, or k + a class: that class with the trigger) drawn by the
        compromised FM, labelled with the class; cached on disk."""
        req = self.fm
        folder = self.compromised_fm()
        blob = json.dumps([request_key(req), folder.name, conditions.tolist(), seed])
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        classes = conditions % req.dataset.num_classes

        def make() -> ImageData:
            unet, scheduler = load_ddpm(req, folder)
            images = ddim_sample(unet, scheduler, conditions, req, torch_generator(seed, "fm-generator"))
            return ImageData(images, classes, req.dataset.classes)

        return cached_images(req.cache_dir / "synthetic" / f"fm-generator-{key}", req.dataset.classes, make,
                             {"attack": "fm-generator", "fm": folder.name, "seed": seed})[0]
