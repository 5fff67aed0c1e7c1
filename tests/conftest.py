"""Shared fixtures: a tiny learnable ImageFolder dataset written to a temporary folder, tiny cell configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from fl_core.config import deep_merge, load_config

TINY_CLASSES = ["circle", "cross", "square", "stripe"]


def write_tiny_imagefolder(root: Path, name: str = "tiny", per_class: tuple[int, int] = (40, 10), size: int = 16,
                           seed: int = 0) -> Path:
    """Write ``<root>/<name>/{train,test}/<class>/*.png``: each class a colour tint plus noise (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    for split, n in zip(("train", "test"), per_class):
        for k, cls in enumerate(TINY_CLASSES):
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
