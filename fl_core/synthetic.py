"""Synthetic data from a foundation model (FM): one interface, cached on disk with a manifest.

Providers return class-balanced ``ImageData`` (uint8) at the dataset's resolution:

* ``heldout``   - samples of the disjoint public pool: the offline stand-in for FM output;
* ``ddpm``      - a class-conditional diffusers ``UNet2DModel`` trained on the public pool
                  (``python -m benchmarks.fm train-ddpm``) and sampled with DDIM;
* ``diffusers`` - any text-to-image diffusers pipeline (local folder or hub id) with per-class prompts.

Poisoning is not a provider's job: attacks alter the returned set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from fl_core.data import DatasetInfo, ImageData, batch_loader, to_float
from fl_core.registry import Registry
from fl_core.schema import DDPMConfig, SyntheticConfig
from fl_core.seeding import derive_seed, numpy_rng, torch_generator
from fl_core.storage import load_tensors, read_json, save_tensors, tensor_digest, warn, write_json


@dataclass
class SyntheticRequest:
    """Everything a provider may use: never client data, never test data."""

    cfg: SyntheticConfig
    dataset: DatasetInfo  # name, classes, resolution and normalisation: no split of the dataset
    public: ImageData  # the public pool (what the FM "knows")
    seed: int
    cache_dir: Path
    device: torch.device


PROVIDERS: Registry[Callable[[SyntheticRequest], ImageData]] = Registry("synthetic provider", "fmfl.synthetic")


def balanced_counts(size: int, num_classes: int) -> list[int]:
    """``size`` split as evenly as possible over classes (earlier classes take the remainder)."""
    return [size // num_classes + (1 if k < size % num_classes else 0) for k in range(num_classes)]


def content_hash(data: ImageData) -> str:
    return tensor_digest(data.images, data.labels)


@PROVIDERS.register("heldout")
def heldout(req: SyntheticRequest) -> ImageData:
    """Class-balanced random samples of the public pool."""
    rng = numpy_rng(req.seed, "synthetic", "heldout")
    labels = req.public.labels.numpy()
    chosen = []
    for k, count in enumerate(balanced_counts(req.cfg.size, req.dataset.num_classes)):
        pool = (labels == k).nonzero()[0]
        if len(pool) < count:
            raise ValueError(f"heldout synthetic set: class {k} has {len(pool)} public samples, needs {count}; "
                             "raise data.public_size or lower synthetic.size")
        chosen.append(rng.choice(pool, size=count, replace=False))
    return req.public.subset(torch.from_numpy(np.sort(np.concatenate(chosen))))


# ---------------------------------------------------------------- DDPM (trained here, offline)


def ddpm_unet(cfg: DDPMConfig, channels: int, image_size: int, num_classes: int):
    """The class-conditional UNet; class index ``num_classes`` is the null label of classifier-free guidance."""
    from diffusers import UNet2DModel

    b = cfg.base_channels
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, layers_per_block=2 if b >= 32 else 1,
        block_out_channels=(b, 2 * b, 2 * b), norm_num_groups=min(32, b),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_classes + 1,
    )


SAMPLING_KEYS = ("weights", "sample_steps", "sample_batch", "guidance_scale")


def ddpm_training_settings(cfg: DDPMConfig) -> dict:
    """The DDPM settings that determine its trained weights."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAMPLING_KEYS}


def ddpm_folder(req: SyntheticRequest) -> Path:
    """Where the DDPM weights for this dataset / public-pool size / training config live. The FM is trained
    once, on the public pool of ``train_seed``, and serves every cell seed."""
    return ddpm_folder_of(req.cfg.ddpm, req.dataset.name, len(req.public), req.cache_dir)


def ddpm_folder_of(ddpm: DDPMConfig, dataset: str, public_size: int, cache_dir: Path) -> Path:
    """:func:`ddpm_folder` from the config alone (what validation knows before any data is loaded)."""
    if ddpm.weights:
        return Path(ddpm.weights)
    blob = [dataset, public_size, ddpm_training_settings(ddpm)]
    key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir) / "ddpm" / f"{dataset}-{key}"


def cached_for(cfg: SyntheticConfig, dataset: str, seed: int, cache_dir: Path) -> bool:
    """Whether a synthetic set of these settings, dataset and seed is in the cache (by its manifest; the
    data itself is verified when it is loaded)."""
    wanted = json.loads(json.dumps({"provider": cfg.provider, "settings": dataclasses.asdict(cfg), "dataset": dataset,
                                    "seed": seed}))
    for manifest in (Path(cache_dir) / "synthetic").glob("*/manifest.json"):
        found = read_json(manifest)
        if isinstance(found, dict) and all(found.get(k) == v for k, v in wanted.items()):
            return True
    return False


class DDPMModule(L.LightningModule):
    """Noise-prediction training of a class-conditional UNet (epsilon objective, label dropout)."""

    def __init__(self, unet, cfg: DDPMConfig, steps: int, *keys, log_every: int = 250):
        from diffusers import DDPMScheduler

        super().__init__()
        self.unet, self.cfg, self.steps = unet, cfg, steps
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.null_label = unet.config.num_class_embeds - 1
        self.generator = torch_generator(cfg.train_seed, "ddpm-train", *keys)
        self.log_every, self.losses, self.started = log_every, [], time.time()
        self.trained_on = "cpu"

    def on_fit_start(self):
        self.trained_on = str(self.device)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        x0 = to_float(images) * 2 - 1
        n = len(x0)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=self.generator)
        drop = torch.rand(n, generator=self.generator) < self.cfg.train_uncond_prob
        labels = torch.where(drop.to(labels.device), self.null_label, labels)
        xt = self.scheduler.add_noise(x0, noise, t.to(x0.device))
        loss = F.mse_loss(self.unet(xt, t.to(x0.device), class_labels=labels).sample, noise)
        self.losses.append(loss.item())
        if len(self.losses) % self.log_every == 0:
            print(f"ddpm step {len(self.losses)}/{self.steps}: loss {np.mean(self.losses[-self.log_every:]):.4f} "
                  f"({time.time() - self.started:.0f} s)", flush=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.cfg.train_lr)


def at_resolution(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images resized (antialiased) to ``size`` x ``size``; unchanged when they already are."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return (F.interpolate(to_float(images), size=(size, size), mode="bilinear", antialias=True) * 255).round().to(torch.uint8)


def fit_ddpm(unet, images: torch.Tensor, labels: torch.Tensor, cfg: DDPMConfig, steps: int, accelerator: str,
             *keys) -> DDPMModule:
    """``steps`` noise-prediction steps of ``unet`` on (images, labels) at the UNet's resolution, the UNet
    left holding the EMA weights; seeded by ``train_seed`` and ``keys``. Returns the module (losses, start)."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from fl_core.modules import fit

    loader = batch_loader(at_resolution(images, unet.config.sample_size), labels, cfg.train_batch,
                          derive_seed(cfg.train_seed, "ddpm", *keys), steps=steps)
    module = DDPMModule(unet, cfg, steps, *keys)
    ema = [WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))] if cfg.ema_decay > 0 else []
    fit(module, loader, accelerator, callbacks=ema)
    return module


def save_ddpm(module: DDPMModule, folder: Path, manifest: dict) -> None:
    """The UNet (safetensors) and its scheduler in diffusers format, and a manifest with the training facts,
    written to a temporary folder that is then renamed: a folder that exists is complete (two runners that
    train the same FM keep the first)."""
    import diffusers

    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    module.unet.save_pretrained(partial / "unet")
    module.scheduler.save_pretrained(partial / "scheduler")
    write_json(partial / "manifest.json", {
        **manifest, "training": ddpm_training_settings(module.cfg), "resolution": module.unet.config.sample_size,
        "steps": len(module.losses), "final_loss": float(np.mean(module.losses[-100:])),
        "seconds": round(time.time() - module.started, 1), "parameters": sum(p.numel() for p in module.unet.parameters()),
        "weights": "EMA" if module.cfg.ema_decay > 0 else "raw", "threads": torch.get_num_threads(),
        "device": module.trained_on, "torch": torch.__version__, "diffusers": diffusers.__version__})
    try:
        partial.rename(folder)
    except OSError:  # another runner saved the same FM meanwhile: keep its complete copy
        shutil.rmtree(partial, ignore_errors=True)


def train_ddpm(req: SyntheticRequest, accelerator: str = "auto") -> Path:
    """Train the provider's DDPM on ``req.public`` and save its (EMA) weights as safetensors with a manifest.
    ``req.public`` should be the public pool of ``train_seed`` (``benchmarks.fm.train_fm`` carves it so)."""
    cfg = req.cfg.ddpm
    channels, h, _ = req.dataset.image_shape
    torch.manual_seed(derive_seed(cfg.train_seed, "ddpm-init"))
    unet = ddpm_unet(cfg, channels, cfg.image_size or h, req.dataset.num_classes)
    module = fit_ddpm(unet, req.public.images, req.public.labels, cfg, cfg.train_steps, accelerator)
    folder = ddpm_folder(req)
    save_ddpm(module, folder, {"dataset": req.dataset.name, "public_size": len(req.public),
                               "public_sha256": content_hash(req.public)})
    return folder


def load_ddpm(req: SyntheticRequest, folder: Path | None = None):
    """The trained UNet (eval mode, on the request's device) and its DDIM sampler, from ``folder``
    (default: the provider's)."""
    from diffusers import DDIMScheduler, UNet2DModel

    folder = folder or ddpm_folder(req)
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(
            f"no trained DDPM at {folder}; train it first with\n"
            "  python -m benchmarks.fm prepare --preset <your grid>   (or, for one cell config:\n"
            "  python -m benchmarks.fm train-ddpm --config <your cell config>)")
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).to(req.device).eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(req.cfg.ddpm.sample_steps)
    return unet, scheduler


@torch.no_grad()
def ddim_sample(unet, scheduler, labels: torch.Tensor, req: SyntheticRequest, gen: torch.Generator) -> torch.Tensor:
    """uint8 samples of ``labels`` at the dataset's resolution, in batches, with classifier-free guidance
    when ``guidance_scale`` > 0."""
    cfg = req.cfg.ddpm
    channels, h, w = req.dataset.image_shape
    size, null = unet.config.sample_size, unet.config.num_class_embeds - 1
    out = []
    for start in range(0, len(labels), cfg.sample_batch):
        y = labels[start: start + cfg.sample_batch].to(req.device)
        x = torch.randn((len(y), channels, size, size), generator=gen).to(req.device)
        both = torch.cat([y, torch.full_like(y, null)])
        for t in scheduler.timesteps:
            if cfg.guidance_scale > 0:
                eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=both).sample.chunk(2)
                eps = eps_c + cfg.guidance_scale * (eps_c - eps_u)
            else:
                eps = unet(x, t, class_labels=y).sample
            x = scheduler.step(eps, t, x).prev_sample
        out.append(to_uint8((x.clamp(-1, 1) + 1) / 2, (h, w)))
    return torch.cat(out)


@PROVIDERS.register("ddpm")
def ddpm(req: SyntheticRequest) -> ImageData:
    """Class-balanced DDIM samples of the trained class-conditional DDPM (drawn with the cell seed)."""
    unet, scheduler = load_ddpm(req)
    k = req.dataset.num_classes
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(balanced_counts(req.cfg.size, k))])
    images = ddim_sample(unet, scheduler, labels, req, torch_generator(req.seed, "ddpm-sample"))
    return ImageData(images, labels, req.dataset.classes)


def to_uint8(x: torch.Tensor, size: tuple[int, int], channels: int | None = None) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 on the CPU at ``size`` (and ``channels``: 1 = luminance)."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    if channels == 1 and x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ---------------------------------------------------------------- text-to-image pipelines


def class_prompts(cfg: SyntheticConfig, classes: list[str]) -> list[str]:
    """One prompt per class: ``class_prompts[name]`` or the template with the class name."""
    d = cfg.diffusers
    return [d.class_prompts.get(name, d.prompt_template.format(label=name.replace("_", " "))) for name in classes]


def load_pipeline(req: SyntheticRequest):
    """The configured text-to-image diffusers pipeline, on the request's device."""
    from diffusers import DiffusionPipeline

    d = req.cfg.diffusers
    pipe = DiffusionPipeline.from_pretrained(d.pipeline, torch_dtype=getattr(torch, d.dtype)).to(req.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, req: SyntheticRequest, prompts: list[str], seed: int) -> torch.Tensor:
    """One batch of images, one per prompt, as uint8 at the dataset's resolution; seeded by ``seed``."""
    d = req.cfg.diffusers
    channels, h, w = req.dataset.image_shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt=prompts, num_inference_steps=d.steps, guidance_scale=d.guidance_scale,
               generator=gen, output_type="pt").images
    return to_uint8(torch.as_tensor(out), (h, w), channels)


@PROVIDERS.register("diffusers")
def diffusers_pipeline(req: SyntheticRequest) -> ImageData:
    """Class-balanced images of a text-to-image pipeline, resized to the dataset resolution."""
    pipe = load_pipeline(req)
    classes = req.dataset.classes
    prompts = class_prompts(req.cfg, classes)
    images, labels = [], []
    for k, count in enumerate(balanced_counts(req.cfg.size, len(classes))):
        for start in range(0, count, req.cfg.diffusers.batch_size):
            n = min(req.cfg.diffusers.batch_size, count - start)
            images.append(render(pipe, req, [prompts[k]] * n, derive_seed(req.seed, "diffusers", k, start)))
            labels.append(torch.full((n,), k))
    return ImageData(torch.cat(images), torch.cat(labels), classes)


# ---------------------------------------------------------------- cache


def request_key(req: SyntheticRequest) -> str:
    """Hash of what determines the provider's output."""
    cfg = dataclasses.asdict(req.cfg)
    settings = {"provider": cfg["provider"], "size": cfg["size"]}
    if req.cfg.provider in cfg:
        settings[req.cfg.provider] = cfg[req.cfg.provider]
    blob = [settings, req.dataset.name, len(req.public), content_hash(req.public)[:16], req.seed]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def synthetic_set(req: SyntheticRequest) -> tuple[ImageData, dict]:
    """The provider's output, from ``<cache>/synthetic/<key>/`` when present; returns (data, manifest)."""
    settings = {"provider": req.cfg.provider, "settings": dataclasses.asdict(req.cfg), "dataset": req.dataset.name,
                "seed": req.seed}
    return cached_images(req.cache_dir / "synthetic" / request_key(req), req.dataset.classes,
                         lambda: PROVIDERS.get(req.cfg.provider)(req), settings)


def cached_images(folder: Path, classes: list[str], make: Callable[[], ImageData],
                  settings: dict) -> tuple[ImageData, dict]:
    """``make()``'s images and labels, saved under ``folder`` with a manifest (``settings`` plus size and
    content hash) the first time and loaded from there afterwards; returns (data, manifest). A cached set
    that does not load or whose content hash differs from its manifest's is made again (warning)."""
    data_file, manifest_file = folder / "data.pt", folder / "manifest.json"
    manifest = read_json(manifest_file)
    blob = load_tensors(data_file) if manifest is not None else None
    if blob is not None:
        data = ImageData(blob["images"], blob["labels"], classes)
        if content_hash(data) == manifest.get("content_sha256"):
            return data, manifest
        warn(f"{data_file} does not match the content hash in {manifest_file}; making it again")
    data = make()
    manifest = {**settings, "size": len(data), "content_sha256": content_hash(data), "created": time.time()}
    # data first, manifest last: a manifest means complete
    save_tensors(data_file, {"images": data.images.cpu(), "labels": data.labels.cpu()})
    write_json(manifest_file, manifest)
    return data, manifest
