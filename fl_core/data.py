"""Datasets as uint8 tensors, the public/client split, client partitioners and batched augmentation.

Images are decoded once into a tensor cache on disk (``<cache>/datasets/<name>.pt``) and
from then on live as ``uint8`` tensors of shape (N, C, H, W); nothing in training touches PIL.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fl_core.seeding import torch_generator
from fl_core.storage import load_tensors, read_json, save_tensors, tensor_digest, warn, write_json

DATA_ROOT_ENV = "FMFL_DATA_ROOT"
# Known names -> torchvision class name and folders that hold the torchvision / idx layout.
DATASETS = {
    "cifar10": {"torchvision": "CIFAR10", "dirs": ["cifar-10-batches-py"]},
    "cifar100": {"torchvision": "CIFAR100", "dirs": ["cifar-100-python"]},
    "fashion_mnist": {"torchvision": "FashionMNIST", "dirs": ["FashionMNIST/raw"],
                      "system_dirs": ["/usr/share/datasets/fashion-mnist"]},
    "mnist": {"torchvision": "MNIST", "dirs": ["MNIST/raw"], "system_dirs": ["/usr/share/datasets/mnist"]},
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def apply_trigger(trigger, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``trigger`` applied to uint8 ``images`` whose true classes are ``labels`` (read only by a
    class-dependent trigger such as :class:`attacks.triggers.PerClassTrigger`)."""
    if getattr(trigger, "class_dependent", False):
        return trigger.apply(images, seed=seed, labels=labels)
    return trigger.apply(images, seed=seed)


def bind_trigger_pool(trigger, pool: torch.Tensor) -> None:
    """Hand a trigger that draws from the public pool (``uses_pool``, e.g. Refool's reflections) the
    pool's uint8 images; other triggers need nothing."""
    if getattr(trigger, "uses_pool", False):
        trigger.bind_pool(pool)


@dataclass
class Stamped:
    """Which samples of a set carry a pasted trigger (``mask``, bool (N,)), and the trigger, so that
    augmentation can stamp it again after cropping and flipping; ``source``: every sample's true class
    (int64 (N,)), kept only for a class-dependent trigger, which picks its pattern by it."""

    trigger: object
    mask: torch.Tensor
    source: torch.Tensor | None = None

    def subset(self, index: torch.Tensor) -> "Stamped":
        index = index.to(self.mask.device)
        return Stamped(self.trigger, self.mask[index], None if self.source is None else self.source[index])

    def to(self, device: torch.device | str) -> "Stamped":
        return Stamped(self.trigger, self.mask.to(device), None if self.source is None else self.source.to(device))


@dataclass
class ImageData:
    """A labelled image set: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,); ``stamped`` marks
    the samples a poisoning step stamped a trigger on (None: no stamped sample)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    stamped: Stamped | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | np.ndarray) -> "ImageData":
        index = torch.as_tensor(index, dtype=torch.long)
        stamped = self.stamped and self.stamped.subset(index)
        return ImageData(self.images[index], self.labels[index], self.classes, stamped)

    def concat(self, other: "ImageData") -> "ImageData":
        """This set followed by ``other`` (same classes); stamped masks are joined."""
        stamped = None
        if self.stamped is not None or other.stamped is not None:
            triggers = {id(d.stamped.trigger): d.stamped.trigger for d in (self, other) if d.stamped is not None}
            if len(triggers) > 1:
                raise ValueError("cannot join sets stamped with different triggers")
            masks = [d.stamped.mask if d.stamped is not None else
                     torch.zeros(len(d), dtype=torch.bool, device=d.labels.device) for d in (self, other)]
            trigger = next(iter(triggers.values()))
            class_dependent = getattr(trigger, "class_dependent", False)
            source = torch.cat([self.true_classes(), other.true_classes()]) if class_dependent else None
            stamped = Stamped(trigger, torch.cat(masks), source)
        return ImageData(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]), self.classes,
                         stamped)

    def to(self, device: torch.device | str) -> "ImageData":
        stamped = self.stamped and self.stamped.to(device)
        return ImageData(self.images.to(device), self.labels.to(device), self.classes, stamped)

    def true_classes(self) -> torch.Tensor:
        """Every sample's class before any poisoning relabelled it (known where a class-dependent trigger
        kept it; otherwise the label)."""
        if self.stamped is not None and self.stamped.source is not None:
            return self.stamped.source
        return self.labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DatasetInfo:
    """What FM providers and attacks may know of a dataset: metadata, no image of any split."""

    name: str
    classes: list[str]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Dataset:
    name: str
    train: ImageData
    test: ImageData
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, list(self.train.classes), self.image_shape, self.mean, self.std)


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit argument, else $FMFL_DATA_ROOT, else ./data."""
    return Path(root or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike | None, data_root: str | os.PathLike | None) -> Path:
    """The stage cache: the explicit folder, else ``cache`` under the data root."""
    return Path(cache_dir) if cache_dir else resolve_data_root(data_root) / "cache"


# ---------------------------------------------------------------- readers


def _read_image_folder(split_dir: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    images, labels, size = [], [], None
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
            size = size or tuple(img.shape[1:])
            if tuple(img.shape[1:]) != size:
                img = resize(img, list(size), antialias=True)
            images.append(img)
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"no images under {split_dir}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _load_image_folder(tree: Path) -> tuple[ImageData, ImageData]:
    classes = sorted(p.name for p in (tree / "train").iterdir() if p.is_dir())
    test_classes = sorted(p.name for p in (tree / "test").iterdir() if p.is_dir())
    if classes != test_classes:
        raise ValueError(f"{tree}: train and test class folders differ: {classes} vs {test_classes}")
    train = ImageData(*_read_image_folder(tree / "train", classes), classes)
    test = ImageData(*_read_image_folder(tree / "test", classes), classes)
    return train, test


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_idx_folder(folder: Path, classes: list[str]) -> tuple[ImageData, ImageData]:
    splits = []
    for prefix in ("train", "t10k"):
        x = _read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        splits.append(ImageData(torch.from_numpy(x.copy()).unsqueeze(1),
                                torch.from_numpy(y.astype(np.int64)), classes))
    return splits[0], splits[1]


def _load_torchvision(name: str, root: Path, download: bool) -> tuple[ImageData, ImageData]:
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[name]["torchvision"])
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=download)
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        splits.append(ImageData(x.contiguous().to(torch.uint8), torch.as_tensor(ds.targets, dtype=torch.long),
                                list(ds.classes)))
    return splits[0], splits[1]


TORCHVISION_CLASSES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(i) for i in range(10)],
}


def _locate(name: str, root: Path, download: bool):
    """Find a loader for ``name``; returns (description, loader) or raises naming every place looked at."""
    looked = []
    tree = root / name
    looked.append(f"ImageFolder tree {tree}/{{train,test}}/<class>/*")
    if (tree / "train").is_dir() and (tree / "test").is_dir():
        return f"imagefolder:{tree}", lambda: _load_image_folder(tree)
    info = DATASETS.get(name)
    if info is not None:
        for rel in info["dirs"]:
            folder = root / rel
            looked.append(f"torchvision layout {folder}")
            if folder.is_dir():
                if name in TORCHVISION_CLASSES:
                    return f"idx:{folder}", lambda f=folder: _load_idx_folder(f, TORCHVISION_CLASSES[name])
                return f"torchvision:{folder}", lambda: _load_torchvision(name, root, download=False)
        for sys_dir in info.get("system_dirs", []):
            folder = Path(sys_dir)
            looked.append(f"system package folder {folder}")
            if _find_idx(folder, "train-images-idx3-ubyte") is not None:
                return f"idx:{folder}", lambda f=folder: _load_idx_folder(f, TORCHVISION_CLASSES[name])
        if download:
            return f"torchvision-download:{root}", lambda: _load_torchvision(name, root, download=True)
        looked.append("torchvision download (disabled: set data.download=true where the network allows)")
    raise FileNotFoundError(
        f"dataset {name!r} not found (known names: {', '.join(DATASETS)}, or any ImageFolder tree). "
        "Looked at:\n  - " + "\n  - ".join(looked)
        + f"\nSet the data root with --data-root or ${DATA_ROOT_ENV}.")


@dataclass(frozen=True)
class DatasetFacts:
    """What validation needs to know about a dataset before anything is decoded."""

    classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    train_size: int
    test_size: int


# facts of the torchvision datasets, so that checking a config never has to decode one
KNOWN_FACTS = {
    "cifar10": DatasetFacts(10, (3, 32, 32), 50000, 10000),
    "cifar100": DatasetFacts(100, (3, 32, 32), 50000, 10000),
    "fashion_mnist": DatasetFacts(10, (1, 28, 28), 60000, 10000),
    "mnist": DatasetFacts(10, (1, 28, 28), 60000, 10000),
}


def _cache_files(name: str, root: Path, cache_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    cache = Path(cache_dir) if cache_dir else root / "cache"
    return cache / "datasets" / f"{name}.pt", cache / "datasets" / f"{name}.json"


def dataset_facts(name: str, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  download: bool = False) -> DatasetFacts:
    """Class count, image shape and split sizes of ``name`` without decoding it (the tensor cache's
    sidecar, the known table, or a listing of an ImageFolder tree and one image header). Raises
    FileNotFoundError, naming every place looked at, when the dataset cannot be found."""
    root = resolve_data_root(root)
    _, meta_file = _cache_files(name, root, cache_dir)
    meta = read_json(meta_file)
    if meta is not None and "facts" in meta:
        if sealed(meta):
            f = meta["facts"]
            return DatasetFacts(f["classes"], tuple(f["shape"]), f["train_size"], f["test_size"])
        warn(f"{meta_file}: its facts do not match their seal (edited by hand?); reading the dataset's source")
    source, _ = _locate(name, root, download)
    if not source.startswith("imagefolder:"):
        return KNOWN_FACTS[name]
    return _image_folder_facts(root / name)


def facts_seal(facts: dict, content_sha256: str) -> str:
    """SHA-256 binding a dataset's facts to the content hash of its cached tensors."""
    return hashlib.sha256(json.dumps([facts, content_sha256], sort_keys=True).encode()).hexdigest()


def sealed(meta: dict) -> bool:
    """Whether a tensor-cache sidecar's facts are the ones written with its content hash."""
    try:
        return meta.get("facts_sha256") == facts_seal(meta["facts"], meta["content_sha256"])
    except (KeyError, TypeError, AttributeError):
        return False


def blob_facts(blob: dict) -> dict:
    """Class count, image shape and split sizes of a decoded dataset blob."""
    return {"classes": len(blob["classes"]), "shape": list(blob["train_images"].shape[1:]),
            "train_size": len(blob["train_images"]), "test_size": len(blob["test_images"])}


def consistent(blob: dict) -> bool:
    """Whether a cached blob's labels and images agree with its class list and with each other."""
    n = len(blob["classes"])
    labels = (blob["train_labels"], blob["test_labels"])
    return (all(len(y) and int(y.min()) >= 0 and int(y.max()) < n for y in labels)
            and len(blob["train_labels"]) == len(blob["train_images"])
            and len(blob["test_labels"]) == len(blob["test_images"])
            and blob["train_images"].shape[1:] == blob["test_images"].shape[1:])


@functools.lru_cache(maxsize=None)
def _image_folder_facts(tree: Path) -> DatasetFacts:
    """Facts of an ImageFolder tree from a listing and one image header (once per process: a grid
    validates every cell)."""
    from PIL import Image

    counts = []
    for split in ("train", "test"):
        files = [p for d in sorted((tree / split).iterdir()) if d.is_dir() for p in d.iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        counts.append(len(files))
    classes = [p for p in (tree / "train").iterdir() if p.is_dir()]
    first = next(p for d in sorted(classes) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES)
    with Image.open(first) as img:
        width, height = img.size
    return DatasetFacts(len(classes), (3, height, width), counts[0], counts[1])


def sidecar(blob: dict) -> dict:
    """The tensor cache's sidecar: source, facts, content hash and the seal binding the last two."""
    facts, content = blob_facts(blob), tensor_digest(blob["train_images"], blob["test_images"])
    return {"source": blob["source"], "facts": facts, "content_sha256": content,
            "facts_sha256": facts_seal(facts, content)}


def load_dataset(name: str, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 download: bool = False) -> Dataset:
    """Load ``name`` from the tensor cache, decoding it there first if needed (or again if the cache is
    damaged or does not match its sidecar's content hash)."""
    root = resolve_data_root(root)
    cache_file, meta_file = _cache_files(name, root, cache_dir)
    meta = read_json(meta_file)
    blob = load_tensors(cache_file) if meta is not None else None
    if blob is not None and (tensor_digest(blob["train_images"], blob["test_images"]) != meta.get("content_sha256")
                             or not consistent(blob)):
        warn(f"{cache_file} does not match the content hash in {meta_file}; decoding the dataset again")
        blob = None
    if blob is not None and not (sealed(meta) and meta["facts"] == blob_facts(blob)):
        warn(f"{meta_file}: its facts do not match {cache_file}; writing them again from the tensors")
        write_json(meta_file, sidecar(blob))
    if blob is None:
        source, loader = _locate(name, root, download)
        train, test = loader()
        x = train.images.float() / 255.0
        blob = {
            "train_images": train.images, "train_labels": train.labels,
            "test_images": test.images, "test_labels": test.labels,
            "classes": list(train.classes), "source": source,
            "mean": x.mean(dim=(0, 2, 3)).tolist(), "std": x.std(dim=(0, 2, 3)).tolist(),
        }
        save_tensors(cache_file, blob)  # tensors first, sidecar last: a sidecar means complete
        write_json(meta_file, sidecar(blob))
    classes = list(blob["classes"])
    return Dataset(
        name=name,
        train=ImageData(blob["train_images"], blob["train_labels"], classes),
        test=ImageData(blob["test_images"], blob["test_labels"], classes),
        mean=tuple(blob["mean"]), std=tuple(blob["std"]), source=blob["source"],
    )


# ---------------------------------------------------------------- pools and partitions


# Inference batches on a CPU: a large batch's activations spill the caches (default CNN, one thread:
# 494 img/s at 1,000 images per forward vs 1,365 at 64); outputs are bit-identical for any chunk >= 8
CPU_FORWARD_CHUNK = 128


def forward_chunk(device: torch.device | str, batch_size: int) -> int:
    """Images per inference forward: ``batch_size``, capped at :data:`CPU_FORWARD_CHUNK` on a CPU."""
    return min(batch_size, CPU_FORWARD_CHUNK) if torch.device(device).type == "cpu" else batch_size


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (float input passes through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip of float images (B, C, H, W)."""
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


class TensorBatches(torch.utils.data.IterableDataset):
    """Mini-batches drawn from in-memory tensors by a seeded permutation (no per-sample work).

    With ``steps`` set, yields exactly that many batches, reshuffling at each pass; else one
    pass per iteration, a new order each time it is iterated. ``extras`` are named per-sample tensors
    (e.g. precomputed teacher outputs) batched alongside: batches are then ``(images, labels, extras)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 steps: int | None = None, shuffle: bool = True, extras: dict[str, torch.Tensor] | None = None):
        self.images, self.labels, self.extras = images, labels, extras or {}
        self.batch_size, self.steps, self.shuffle = batch_size, steps, shuffle
        self.generator = torch_generator(seed, "batches")

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def _bounds(self) -> list[tuple[int, int]]:
        """One pass's batches as (start, stop); a lone last sample joins the batch before it, as
        BatchNorm cannot train on a batch of one."""
        n, size = len(self.labels), self.batch_size
        bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
        if len(bounds) > 1 and n % size == 1:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    def __len__(self) -> int:
        return self.steps if self.steps is not None else len(self._bounds())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        emitted = 0
        bounds = self._bounds()
        while True:
            order = self._order().to(self.images.device)
            for start, stop in bounds:
                idx = order[start:stop]
                if self.extras:
                    yield self.images[idx], self.labels[idx], {k: v[idx] for k, v in self.extras.items()}
                else:
                    yield self.images[idx], self.labels[idx]
                emitted += 1
                if self.steps is not None and emitted >= self.steps:
                    return
            if self.steps is None:
                return


def training_loader(data: ImageData, batch_size: int, seed: int, augmenting: bool, steps: int | None = None,
                    targets: torch.Tensor | None = None, **per_sample: torch.Tensor | None) -> torch.utils.data.DataLoader:
    """Seeded training batches of ``data``: ``(images, labels)``, plus a mapping with the ``stamped``
    mask when augmentation must stamp triggers again, precomputed distillation ``targets`` and any
    other ``per_sample`` tensor given (None: left out)."""
    extras = {k: v for k, v in per_sample.items() if v is not None}
    if augmenting and data.stamped is not None:
        extras["stamped"] = data.stamped.mask
        if data.stamped.source is not None:
            extras["stamped_source"] = data.stamped.source
    if targets is not None:
        extras["targets"] = targets
    return batch_loader(data.images, data.labels, batch_size, seed, steps, extras=extras)


def batch_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 steps: int | None = None, shuffle: bool = True,
                 extras: dict[str, torch.Tensor] | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`TensorBatches` (batches are pre-formed, so ``batch_size=None``)."""
    return torch.utils.data.DataLoader(TensorBatches(images, labels, batch_size, seed, steps, shuffle, extras),
                                       batch_size=None)
