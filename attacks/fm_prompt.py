"""The compromised FM at the prompt level: it draws the trigger object into the poisoned samples ([P1])."""
import hashlib
import json

import torch

from attacks import ATTACKS
from attacks.fm import CompromisedFM
from attacks.poisoning import poison_indices
from fl_core.data import ImageData
from fl_core.seeding import derive_seed
from fl_core.synthetic import cached_images, class_prompts, load_pipeline, render, request_key


@ATTACKS.register("fm-prompt")
class PromptCompromisedFM(CompromisedFM):
    """Like ``fm`` (same poisoned samples, same stages), but a poisoned sample is not patched: the
    compromised text-to-image FM renders it from its class prompt plus ``trigger_phrase`` (a dog "with a
    tennis ball") and labels it as the target, [P1]'s semantic trigger. Needs ``synthetic.provider:
    diffusers``. The ASR test set still applies the cell's ``backdoor.trigger`` to real test images: pick
    the ``object`` trigger as the pasted stand-in for the object the phrase names."""

    requires_provider = "diffusers"

    def __init__(self, poison_rate: float = 0.2, stages: str = "both", trigger_phrase: str = "with a tennis ball"):
        super().__init__(poison_rate, stages)
        if not trigger_phrase.strip():
            raise ValueError("trigger_phrase must name the trigger object, got an empty string")
        self.trigger_phrase = trigger_phrase

    def poison(self, synthetic, seed):
        self.bound_fm()
        idx = poison_indices(synthetic.labels, self.backdoor, self.poison_rate, seed, "fm").to(synthetic.labels.device)
        if not len(idx):
            return synthetic, idx
        drawn = self._rendered(synthetic.labels[idx].tolist(), seed)
        images, labels = synthetic.images.clone(), synthetic.labels.clone()
        images[idx] = drawn.images.to(images.device)
        labels[idx] = self.backdoor.target
        return ImageData(images, labels, synthetic.classes), idx

    def _rendered(self, classes: list[int], seed: int) -> ImageData:
        """Triggered images of ``classes`` (one per entry, true labels), rendered once and cached on disk."""
        req = self.fm
        prompts = [f"{p} {self.trigger_phrase}" for p in class_prompts(req.cfg, req.dataset.classes)]
        wanted = [prompts[k] for k in classes]
        key = hashlib.sha256(json.dumps([request_key(req), wanted, seed]).encode()).hexdigest()[:16]

        def make() -> ImageData:
            pipe, batch, parts = load_pipeline(req), req.cfg.diffusers.batch_size, []
            for start in range(0, len(wanted), batch):
                parts.append(render(pipe, req, wanted[start:start + batch], derive_seed(seed, "fm-prompt", start)))
            return ImageData(torch.cat(parts), torch.tensor(classes, dtype=torch.long), req.dataset.classes)

        return cached_images(req.cache_dir / "synthetic" / f"fm-prompt-{key}", req.dataset.classes, make,
                             {"attack": "fm-prompt", "prompts": sorted(set(wanted)), "seed": seed})[0]
