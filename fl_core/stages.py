"""What cells share and what a record names: the stage cache (outputs of training stages keyed by the
content of their inputs), the digests that key it, and the versions of the code and machine."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fl_core.data import ImageData
from fl_core.hooks import State
from fl_core.schema import CellConfig
from fl_core.storage import load_tensors, save_tensors, tensor_digest, warn


def versions() -> dict:
    import lightning
    import torchvision

    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "git_commit": commit, "platform": platform.platform(),
            "cpu": cpu_model()}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name and the vector kernels torch runs on it (``AMD EPYC (AVX2)``): float results
    on the CPU are reproducible on the same pair, and their last digits (which training lets grow) change
    across them. The name alone is not enough: one name covers CPU generations with other kernels."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


class StageCache:
    """Outputs of training stages that cells share (``<cache>/stages/<key>.pt``), keyed by a hash of
    exactly what determines them: every input tensor's content and every setting the stage reads. A
    defense, the rounds or the fusion settings do not enter the pre-training key, so the cells of a
    grid that differ only there pre-train once; round 1's client training is shared the same way
    while the defense leaves the broadcast model alone (``Defense.changes_broadcast``). Writes are
    atomic (safe under two runners)."""

    def __init__(self, folder: Path | None):
        self.folder = folder  # None: disabled

    @classmethod
    def for_cell(cls, cfg: CellConfig, cache_dir: Path) -> StageCache:
        """The cache a cell uses: under its cache folder, unless ``runtime.stage_cache`` is off."""
        return cls(cache_dir / "stages" if cfg.runtime.stage_cache else None)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def load(self, key: str) -> dict | None:
        """The blob stored under ``key``; None when absent, or (with a warning naming the file) when the
        file is not the whole output of that key: another key's, or content that does not match its hash."""
        if self.folder is None:
            return None
        path = self.folder / f"{key}.pt"
        stored = load_tensors(path)
        if stored is None:
            return None
        if not isinstance(stored, dict) or stored.get("key") != key or "blob" not in stored:
            warn(f"{path} is not a stage output of key {key}; computing it again")
            return None
        if stored.get("sha256") != blob_digest(stored["blob"]):
            warn(f"{path} does not match its content hash; computing it again")
            return None
        return stored["blob"]

    def save(self, key: str, blob: dict) -> None:
        if self.folder is not None:
            save_tensors(self.folder / f"{key}.pt", {"key": key, "sha256": blob_digest(blob), "blob": blob})

    def cached(self, key: str, compute: Callable[[], dict]) -> dict:
        """The stored blob of ``key``, or ``compute()`` stored under it (computed only, when disabled)."""
        blob = self.load(key)
        if blob is None:
            blob = compute()
            self.save(key, blob)
        return blob


def blob_digest(blob) -> str:
    """SHA-256 over a nested blob's structure (keys, types, shapes, dtypes) and content."""
    digest = hashlib.sha256()

    def visit(node):
        if isinstance(node, torch.Tensor):
            digest.update(f"T{tuple(node.shape)}{node.dtype}".encode())
            digest.update(node.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            digest.update(f"D{len(node)}".encode())
            for k in sorted(node, key=str):
                digest.update(repr(k).encode())
                visit(node[k])
        elif isinstance(node, (list, tuple)):
            digest.update(f"L{len(node)}".encode())
            for item in node:
                visit(item)
        else:
            digest.update(repr(node).encode())

    visit(blob)
    return digest.hexdigest()


def data_digest(data: ImageData) -> str:
    """Content hash of a labelled set, including which samples carry a pasted trigger."""
    mask = data.stamped.mask if data.stamped is not None else torch.zeros(0, dtype=torch.bool)
    source = [data.stamped.source] if data.stamped is not None and data.stamped.source is not None else []
    return tensor_digest(data.images, data.labels, mask, *source)


def model_digest(models: list[nn.Module]) -> str:
    return tensor_digest(*[v for m in models for v in m.state_dict().values()])


def cpu_state(model: nn.Module) -> State:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def training_settings(cfg: CellConfig, device: torch.device) -> list:
    """What every training stage of a cell reads besides its data: seed, precision, device kind, CPU threads
    and CPU model (both change the last digits), augmentation, trigger."""
    return [cfg.seed, cfg.precision, device.type, cfg.runtime.threads, cfg.data.augment, dataclasses.asdict(cfg.backdoor),
            cpu_model()]
