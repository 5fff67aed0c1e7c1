"""Shared fixtures: a tiny learnable ImageFolder dataset written to a temporary folder, tiny cell configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from fl_core.config import load_config
from fl_core.configfile import deep_merge

TINY_CLASSES = ["circle", "cross", "square", "stripe"]


def write_tiny_imagefolder(root: Path, name: str = "tiny", per_class: tuple[int, int] = (40, 10), size: int = 16,
                           seed: int = 0, classes: list[str] = TINY_CLASSES) -> Path:
    """Write ``<root>/<name>/{train,test}/<class>/*.png``: each class a colour tint plus noise (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    for split, n in zip(("train", "test"), per_class):
        for k, cls in enumerate(classes):
            folder = root / name / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 100, (3, size, size), generator=gen)
                img[k % 3] += 100
                if k == 3:
                    img[:, ::2] += 50
                write_png(img.clamp(0, 255).to(torch.uint8), str(folder / f"{i:04d}.png"))
    return root


TINY_OVERRIDES = {
    "data": {"dataset": "tiny", "public_size": 40, "min_samples": 2},
    "model": {"width": 0.25},
    "synthetic": {"size": 20},
    "fl": {"setting": "custom", "num_clients": 3, "clients_per_round": 3, "rounds": 2,
           "client": {"batch_size": 16}},
    "pretrain": {"epochs": 1},
    "fusion": {"steps": 3, "optim": {"batch_size": 16}},
    "eval": {"batch_size": 64},
}


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return write_tiny_imagefolder(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_config(tiny_root, tmp_path):
    """Factory: a validated tiny cell config, ``extra`` merged over the tiny defaults."""

    def make(extra: dict | None = None, overrides: tuple[str, ...] = ()):
        base = deep_merge(TINY_OVERRIDES, {"runtime": {"data_root": str(tiny_root), "progress": False,
                                                       "cache_dir": str(tmp_path / "cache")}})
        return load_config(None, overrides, base=deep_merge(base, extra or {}))

    return make


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (CLIP, GPT-2) uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tiny_text_to_image_pipeline(folder: Path) -> Path:
    """A randomly initialised Stable-Diffusion-shaped pipeline built from config and saved locally."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = _byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    (folder / "tok").mkdir(parents=True)
    (folder / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                              model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_attention_heads=2, num_hidden_layers=1, projection_dim=16, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A saved, randomly initialised Stable-Diffusion-shaped pipeline (8x8 images)."""
    return _tiny_text_to_image_pipeline(tmp_path_factory.mktemp("sd"))
