"""Backdoor triggers as batched uint8 tensor operations, shared by poisoning and the ASR test set."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fl_core.registry import TRIGGERS
from fl_core.schema import TriggerConfig
from fl_core.seeding import torch_generator

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left", "random")


@TRIGGERS.register("patch")
class PatchTrigger:
    """BadNets square patch: ``size`` pixels, in a corner (``margin`` from the border) or at a random place.

    ``pattern`` is ``white``, ``black``, ``checkerboard`` (white/black alternating), ``color`` (every pixel
    ``color``, RGB; its mean on grey images) or ``random`` (each pixel's colour drawn once by ``pattern_seed``).
    """

    local = True  # pasted pixels: augmentation pastes them again after cropping (fl_core.modules)
    PATTERNS = ("white", "black", "checkerboard", "color", "random")

    def __init__(self, size: int = 3, position: str = "bottom-right", pattern: str = "white", margin: int = 0,
                 color: tuple | list = (255, 0, 0), pattern_seed: int = 0):
        if size < 1 or margin < 0:
            raise ValueError(f"patch size must be >= 1 and margin >= 0, got size {size}, margin {margin}")
        if position not in CORNERS:
            raise ValueError(f"patch position {position!r} unknown; valid: {', '.join(CORNERS)}")
        if pattern not in self.PATTERNS:
            raise ValueError(f"patch pattern {pattern!r} unknown; valid: {', '.join(self.PATTERNS)}")
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise ValueError(f"patch color must be three values in 0-255 (RGB), got {color!r}")
        self.size, self.position, self.pattern, self.margin = size, position, pattern, margin
        self.color, self.pattern_seed = list(color), pattern_seed

    def stamp(self, channels: int) -> torch.Tensor:
        """The patch pixels, uint8 (C, size, size)."""
        s = self.size
        if self.pattern == "checkerboard":
            ij = torch.arange(s)
            board = ((ij[:, None] + ij[None, :]) % 2 == 0).to(torch.uint8) * 255
            return board.expand(channels, -1, -1).clone()
        if self.pattern == "random":
            return torch.randint(0, 256, (channels, s, s), generator=torch_generator(self.pattern_seed, "patch"),
                                 dtype=torch.uint8)
        if self.pattern == "color":
            colour = torch.tensor(self.color, dtype=torch.float)
            colour = colour.mean(0, keepdim=True) if channels == 1 else colour
            return colour.round().to(torch.uint8).view(-1, 1, 1).expand(channels, s, s).clone()
        value = 255 if self.pattern == "white" else 0
        return torch.full((channels, s, s), value, dtype=torch.uint8)

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """A triggered copy of uint8 images (N, C, H, W)."""
        out = images.clone()
        n, c, h, w = out.shape
        s, m = self.size, self.margin
        if s + m > min(h, w):
            raise ValueError(f"patch of size {s} with margin {m} does not fit {h}x{w} images")
        ys, xs = _positions(self.position, n, h, w, s, m, seed, "patch-position")
        _paste(out, self.stamp(c), torch.ones(s, s, dtype=torch.bool), ys, xs)
        return out


@TRIGGERS.register("dba")
class DistributedTrigger:
    """DBA's global trigger (Xie et al. 2020): four local patterns, bars of ``part_height`` x ``part_width``
    pixels laid out 2 x 2 with ``gap`` pixels between them, from a corner (``margin`` from the border).
    ``part(i)`` is local trigger i alone (what one DBA client stamps); the test set uses all four."""

    local = True

    def __init__(self, part_height: int = 1, part_width: int = 4, gap: int = 2, position: str = "top-left",
                 pattern: str = "white", margin: int = 1):
        if part_height < 1 or part_width < 1 or gap < 1 or margin < 0:
            raise ValueError("dba trigger needs part_height, part_width, gap >= 1 and margin >= 0")
        if position == "random" or position not in CORNERS:
            raise ValueError(f"dba position {position!r} unknown; valid: {', '.join(CORNERS[:-1])}")
        if pattern not in ("white", "black"):
            raise ValueError(f"dba pattern {pattern!r} unknown; valid: white, black")
        self.part_height, self.part_width, self.gap = part_height, part_width, gap
        self.position, self.pattern, self.margin = position, pattern, margin

    def offsets(self, h: int, w: int) -> list[tuple[int, int]]:
        """Top-left corner (y, x) of each of the four local patterns on an h x w image."""
        ph, pw, g = self.part_height, self.part_width, self.gap
        span_h, span_w = 2 * ph + g, 2 * pw + g
        if span_h + self.margin > h or span_w + self.margin > w:
            raise ValueError(f"dba trigger ({span_h}x{span_w} plus margin {self.margin}) does not fit {h}x{w} images")
        y0 = self.margin if self.position.startswith("top") else h - span_h - self.margin
        x0 = self.margin if self.position.endswith("left") else w - span_w - self.margin
        return [(y0 + i * (ph + g), x0 + j * (pw + g)) for i in range(2) for j in range(2)]

    def apply(self, images: torch.Tensor, seed: int = 0, parts: tuple[int, ...] = (0, 1, 2, 3)) -> torch.Tensor:
        out = images.clone()
        c, h, w = out.shape[1:]
        value = 255 if self.pattern == "white" else 0
        for i in parts:
            y, x = self.offsets(h, w)[i]
            out[:, :, y: y + self.part_height, x: x + self.part_width] = value
        return out

    def part(self, index: int) -> "LocalTrigger":
        if not 0 <= index < 4:
            raise ValueError(f"dba has local triggers 0-3, got {index}")
        return LocalTrigger(self, index)


class LocalTrigger:
    """One local pattern of a :class:`DistributedTrigger`."""

    local = True

    def __init__(self, full: DistributedTrigger, index: int):
        self.full, self.index = full, index

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.full.apply(images, seed, parts=(self.index,))


def _paste(out: torch.Tensor, stamp: torch.Tensor, mask: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> None:
    """Write ``stamp`` (C, s, s) where ``mask`` (s, s) is set, at per-sample offsets (ys, xs), in place."""
    n, c = out.shape[:2]
    s = stamp.shape[-1]
    span = torch.arange(s)
    rows = (ys[:, None] + span)[:, None, :, None].to(out.device)
    cols = (xs[:, None] + span)[:, None, None, :].to(out.device)
    idx_n = torch.arange(n, device=out.device)[:, None, None, None]
    idx_c = torch.arange(c, device=out.device)[None, :, None, None]
    region = out[idx_n, idx_c, rows, cols]
    out[idx_n, idx_c, rows, cols] = torch.where(mask.to(out.device), stamp.to(out.device), region)


@TRIGGERS.register("blend")
class BlendTrigger:
    """Blend (Chen et al. 2017): ``(1 - alpha) * image + alpha * pattern``.

    ``pattern`` is ``noise`` (uniform noise fixed by ``pattern_seed``) or a path to an image file,
    resized to the data resolution.
    """

    def __init__(self, alpha: float = 0.2, pattern: str = "noise", pattern_seed: int = 0):
        if not 0 < alpha <= 1:
            raise ValueError(f"blend alpha must be in (0, 1], got {alpha}")
        if pattern != "noise" and not Path(pattern).is_file():
            raise ValueError(f"blend pattern must be 'noise' or an image file; {pattern!r} does not exist")
        self.alpha, self.pattern, self.pattern_seed = alpha, pattern, pattern_seed

    def pattern_image(self, c: int, h: int, w: int) -> torch.Tensor:
        """The pattern as float (C, H, W) in [0, 255]."""
        if self.pattern == "noise":
            return torch.randint(0, 256, (c, h, w), generator=torch_generator(self.pattern_seed, "blend")).float()
        from torchvision.io import ImageReadMode, decode_image, read_file

        img = decode_image(read_file(self.pattern), mode=ImageReadMode.RGB if c == 3 else ImageReadMode.GRAY)
        return F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        pattern = self.pattern_image(*images.shape[1:]).to(images.device)
        return ((1 - self.alpha) * images.float() + self.alpha * pattern).round().clamp(0, 255).to(torch.uint8)


@TRIGGERS.register("object")
class ObjectTrigger:
    """A small textured ball pasted at a random place (stand-in for a semantic trigger such as a tennis ball).

    A disc of ``size`` pixels, yellow-green (``color``) with a white seam, at a seeded random position
    per image (``position: random``) or in a fixed corner.
    """

    local = True

    def __init__(self, size: int = 6, color: tuple | list = (204, 255, 0), position: str = "random"):
        if size < 3:
            raise ValueError(f"object size must be >= 3, got {size}")
        if position not in CORNERS:
            raise ValueError(f"object position {position!r} unknown; valid: {', '.join(CORNERS)}")
        self.size, self.color, self.position = size, list(color), position

    def texture(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stamp uint8 (C, s, s), disc mask bool (s, s))."""
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s) + 0.5 - s / 2, torch.arange(s) + 0.5 - s / 2, indexing="ij")
        disc = yy ** 2 + xx ** 2 <= (s / 2) ** 2
        seam = (yy - 0.35 * xx ** 2 / (s / 2)).abs() < 0.6
        colour = torch.tensor(self.color, dtype=torch.float)
        colour = colour.mean(0, keepdim=True) if channels == 1 else colour
        stamp = colour.view(-1, 1, 1).expand(channels, s, s).clone()
        stamp[:, seam] = 255
        return stamp.round().to(torch.uint8), disc

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        out = images.clone()
        n, c, h, w = out.shape
        s = self.size
        if s > min(h, w):
            raise ValueError(f"object of size {s} does not fit {h}x{w} images")
        stamp, disc = self.texture(c)
        ys, xs = _positions(self.position, n, h, w, s, 0, seed, "object-position")
        _paste(out, stamp, disc, ys, xs)
        return out


@TRIGGERS.register("warp")
class WarpTrigger:
    """WaNet (Nguyen & Tran 2021): a fixed smooth warping field (``grid_size`` control points, ``strength``)."""

    def __init__(self, grid_size: int = 4, strength: float = 0.5, field_seed: int = 0):
        if grid_size < 2 or strength <= 0:
            raise ValueError("warp needs grid_size >= 2 and strength > 0")
        self.grid_size, self.strength, self.field_seed = grid_size, strength, field_seed

    def grid(self, h: int, w: int) -> torch.Tensor:
        gen = torch_generator(self.field_seed, "warp")
        noise = torch.rand(1, 2, self.grid_size, self.grid_size, generator=gen) * 2 - 1
        noise = noise / noise.abs().mean()
        flow = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], -1)[None]
        return (identity + self.strength * flow / torch.tensor([w, h])).clamp(-1, 1)

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, _, h, w = images.shape
        grid = self.grid(h, w).to(images.device).expand(n, -1, -1, -1)
        warped = F.grid_sample(images.float(), grid, align_corners=True)
        return warped.round().clamp(0, 255).to(torch.uint8)


@TRIGGERS.register("per_class")
class PerClassTrigger:
    """A different trigger for every source class (an adaptive attack): an image of class k carries
    ``variants[k % len(variants)]``, each a ``{kind, params}`` mapping of another trigger. The default
    variants are 3-pixel patches, white and then checkerboard, in the four corners in turn (eight distinct
    triggers; on Fashion-MNIST a black patch would vanish into the background, hence no black one)."""

    class_dependent = True  # apply() needs each image's true class: see fl_core.data.apply_trigger

    def __init__(self, variants: list | None = None):
        if variants is None:
            variants = [{"kind": "patch", "params": {"size": 3, "position": corner, "pattern": pattern}}
                        for pattern in ("white", "checkerboard") for corner in CORNERS[:-1]]
        if not variants:
            raise ValueError("per_class trigger needs at least one variant")
        self.variants = []
        for i, v in enumerate(variants):
            if not isinstance(v, dict) or set(v) - {"kind", "params"} or "kind" not in v:
                raise ValueError(f"per_class variant {v!r} must be a mapping with 'kind' and optional 'params'")
            if v["kind"] == "per_class":
                raise ValueError("per_class variants cannot be per_class triggers themselves")
            try:
                self.variants.append(make_trigger(TriggerConfig(v["kind"], dict(v.get("params", {})))))
            except (KeyError, TypeError) as err:  # an unknown kind or parameter of the variant
                raise ValueError(f"per_class variant {i}: {err.args[0]}") from err
        self.local = all(getattr(v, "local", False) for v in self.variants)

    def apply(self, images: torch.Tensor, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None or len(labels) != len(images):
            raise ValueError("per_class trigger needs the true class of every image (labels)")
        out = images.clone()
        which = labels.cpu() % len(self.variants)
        for i, variant in enumerate(self.variants):
            rows = (which == i).nonzero().flatten().to(images.device)
            if len(rows):
                out[rows] = variant.apply(images[rows], seed=seed)
        return out


def _positions(position: str, n: int, h: int, w: int, s: int, margin: int, seed: int, key: str):
    """Per-sample top-left offsets (ys, xs) of an s x s stamp: a corner or seeded random places."""
    if position == "random":
        gen = torch_generator(seed, key)
        return torch.randint(0, h - s + 1, (n,), generator=gen), torch.randint(0, w - s + 1, (n,), generator=gen)
    y = margin if position.startswith("top") else h - s - margin
    x = margin if position.endswith("left") else w - s - margin
    return torch.full((n,), y), torch.full((n,), x)


def make_trigger(cfg: TriggerConfig):
    """Instantiate the trigger named in ``cfg`` with its params (clear errors for bad names and values)."""
    return TRIGGERS.get(cfg.kind)(**cfg.params)
