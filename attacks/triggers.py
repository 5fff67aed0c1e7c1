"""Backdoor triggers as batched uint8 tensor operations, shared by poisoning and the ASR test set."""
from __future__ import annotations

import torch

from fl_core.config import TriggerConfig
from fl_core.registry import Registry
from fl_core.seeding import torch_generator

TRIGGERS: Registry[type] = Registry("trigger", "fmfl.triggers")
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left", "random")


@TRIGGERS.register("patch")
class PatchTrigger:
    """BadNets square patch: ``size`` pixels, in a corner (``margin`` from the border) or at a random place.

    ``pattern`` is ``white``, ``black`` or ``checkerboard`` (white/black alternating).
    """

    def __init__(self, size: int = 3, position: str = "bottom-right", pattern: str = "white", margin: int = 0):
        if size < 1:
            raise ValueError(f"patch size must be >= 1, got {size}")
        if position not in CORNERS:
            raise ValueError(f"patch position {position!r} unknown; valid: {', '.join(CORNERS)}")
        if pattern not in ("white", "black", "checkerboard"):
            raise ValueError(f"patch pattern {pattern!r} unknown; valid: white, black, checkerboard")
        self.size, self.position, self.pattern, self.margin = size, position, pattern, margin

    def stamp(self, channels: int) -> torch.Tensor:
        """The patch pixels, uint8 (C, size, size)."""
        if self.pattern == "checkerboard":
            ij = torch.arange(self.size)
            board = ((ij[:, None] + ij[None, :]) % 2 == 0).to(torch.uint8) * 255
            return board.expand(channels, -1, -1).clone()
        value = 255 if self.pattern == "white" else 0
        return torch.full((channels, self.size, self.size), value, dtype=torch.uint8)

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """A triggered copy of uint8 images (N, C, H, W)."""
        out = images.clone()
        n, c, h, w = out.shape
        s, m = self.size, self.margin
        if s + m > min(h, w):
            raise ValueError(f"patch of size {s} with margin {m} does not fit {h}x{w} images")
        stamp = self.stamp(c).to(out.device)
        if self.position == "random":
            gen = torch_generator(seed, "patch-position")
            ys = torch.randint(0, h - s + 1, (n,), generator=gen)
            xs = torch.randint(0, w - s + 1, (n,), generator=gen)
            span = torch.arange(s)
            rows = (ys[:, None] + span)[:, None, :, None].to(out.device)
            cols = (xs[:, None] + span)[:, None, None, :].to(out.device)
            idx_n = torch.arange(n, device=out.device)[:, None, None, None]
            idx_c = torch.arange(c, device=out.device)[None, :, None, None]
            out[idx_n, idx_c, rows, cols] = stamp.expand(n, -1, -1, -1)
            return out
        y = m if self.position.startswith("top") else h - s - m
        x = m if self.position.endswith("left") else w - s - m
        out[:, :, y: y + s, x: x + s] = stamp
        return out


def make_trigger(cfg: TriggerConfig):
    """Instantiate the trigger named in ``cfg`` with its params (clear errors for bad names and values)."""
    return TRIGGERS.get(cfg.kind)(**cfg.params)
