"""Every random stream is derived from the config seed plus a purpose key."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends on ``seed`` and the purpose ``keys`` only."""
    text = "/".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator; draw on the CPU and move results, so CPU and GPU runs share streams."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
