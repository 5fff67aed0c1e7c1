"""The attack zoo: a declared distribution over backdoor attacks, drawn by index, with a held-out protocol.

A draw is a function of its index alone: its trigger family and parameters, target, mapping and poison
rate, and for the classic threat the malicious clients, their poison rate, boost and the fusion. Two
disjoint index ranges: **development** draws (``dev``, indices from 0) on which defenses are chosen, and
**test** draws (``test``, from ``TEST_START``), run once on frozen defenses. The families in
``TEST_ONLY`` never meet a defense on development draws (only undefended, to check that they bite), so
the test draws measure families no defense was developed on.

In a grid the axis named ``zoo`` takes ``{zoo: all | <family>, draws: dev | test, n: N, threat: fm |
classic | clean}`` and expands into N cells (``benchmarks.gridspec.expand``); each draw fixes the cell's seed
(test draws 0-2, development draws 100-102, by index). The ``clean`` threat is no attack at all: the
draw's trigger, target and seed on an attack-free run, whose ASR is the draw's *natural* ASR (how often a
model that never saw a poisoned sample already sends triggered inputs to the target): a defense that
gives back the clean model ends near it, and goes under it only by also suppressing the trigger's natural
effect.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from fl_core.schema import ConfigError
from fl_core.seeding import derive_seed

AXIS = "zoo"
SETS = ("seed", "backdoor", "attack", "fl.fusion")  # the config keys a draw sets
DEV_START, TEST_START = 0, 1_000_000
RANGES = {"dev": (DEV_START, TEST_START), "test": (TEST_START, 2 * TEST_START)}
FAMILIES = ("patch", "blend", "warp", "object", "sig", "lowfreq", "ftrojan", "bpp", "refool")
TEST_ONLY = ("ftrojan", "bpp", "refool")
THREATS = ("fm", "classic", "clean")
CLASSES = 10  # the zoo's targets and sources are drawn for ten-class datasets (CIFAR-10, Fashion-MNIST)
CLIENTS = 10  # cross-silo: the classic boost goes up to clients / malicious clients (n / m)
SPEC_KEYS = {"zoo", "draws", "n", "threat", "label"}


@dataclass(frozen=True)
class Draw:
    """One attack of the zoo: cell-config overrides keyed by index and threat."""

    index: int
    threat: str
    family: str
    overrides: dict[str, Any]

    @property
    def split(self) -> str:
        return "test" if self.index >= TEST_START else "dev"

    @property
    def label(self) -> str:
        start = RANGES[self.split][0]
        return f"{self.split}{self.index - start:03d}-{self.family}-{self.threat}"


def _rng(index: int, part: str) -> random.Random:
    return random.Random(derive_seed(index, "zoo", part))


def _u(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 3)


def _colour(rng: random.Random) -> list[int]:
    return [rng.randint(0, 255) for _ in range(3)]


CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


def trigger_params(family: str, rng: random.Random) -> dict[str, Any]:
    """The parameter ranges of each family (around each paper's defaults; see docs/ZOO.md)."""
    if family == "patch":
        return {"size": rng.randint(2, 5), "position": rng.choice(CORNERS + ("random",)),
                "pattern": rng.choice(("white", "black", "checkerboard", "color", "random")),
                "margin": rng.randint(0, 2), "color": _colour(rng), "pattern_seed": rng.randint(0, 9999)}
    if family == "blend":
        return {"alpha": _u(rng, 0.1, 0.3), "pattern": "noise", "pattern_seed": rng.randint(0, 9999)}
    if family == "warp":
        return {"grid_size": rng.randint(4, 8), "strength": _u(rng, 0.5, 1.0), "field_seed": rng.randint(0, 9999)}
    if family == "object":
        return {"size": rng.randint(4, 8), "color": _colour(rng), "position": rng.choice(CORNERS + ("random",))}
    if family == "sig":
        return {"amplitude": _u(rng, 15, 40), "frequency": float(rng.randint(3, 10)),
                "direction": rng.choice(("horizontal", "vertical"))}
    if family == "lowfreq":
        return {"alpha": _u(rng, 0.1, 0.3), "cutoff": _u(rng, 0.05, 0.2), "pattern_seed": rng.randint(0, 9999)}
    if family == "ftrojan":
        return {"magnitude": _u(rng, 20, 60), "bands": rng.choice(("mid", "high", "both"))}
    if family == "bpp":
        return {"bits": rng.randint(3, 5), "dither": "floyd"}
    if family == "refool":
        return {"alpha": _u(rng, 0.2, 0.4), "sigma": _u(rng, 0.5, 2.5), "shift": rng.randint(0, 4),
                "pool_seed": rng.randint(0, 9999)}
    raise ConfigError(f"zoo: unknown family {family!r}; valid: {', '.join(FAMILIES)}")


def draw(index: int, threat: str) -> Draw:
    """The zoo's attack number ``index`` for ``threat`` (the trigger and backdoor are the same for both
    threats; the threat's own part comes from its own stream)."""
    if threat not in THREATS:
        raise ConfigError(f"zoo: threat {threat!r} unknown; valid: {', '.join(THREATS)}")
    if not 0 <= index < RANGES["test"][1]:
        raise ConfigError(f"zoo: draw index {index} outside the development and test ranges")
    family = FAMILIES[index % len(FAMILIES)]
    rng = _rng(index, "backdoor")
    target = rng.randrange(CLASSES)
    backdoor: dict[str, Any] = {"trigger": {"kind": family, "params": trigger_params(family, _rng(index, "trigger"))},
                                "target": target, "mapping": "all-to-one", "source": None}
    if rng.random() < 0.25:
        backdoor.update(mapping="one-to-one", source=rng.choice([k for k in range(CLASSES) if k != target]))
    split = "test" if index >= TEST_START else "dev"
    seed = index % 3 if split == "test" else 100 + index % 3
    overrides: dict[str, Any] = {"seed": seed, "backdoor": backdoor}
    rng = _rng(index, threat)
    if threat == "fm":
        overrides["attack"] = {"name": "fm", "params": {"poison_rate": _u(rng, 0.05, 0.3)}}
    elif threat == "clean":
        overrides["attack"] = {"name": "none", "params": {}}
    else:
        m = rng.randint(1, 5)
        boost = 1.0 if rng.random() < 0.5 else _u(rng, 1.0, CLIENTS / m)
        overrides["attack"] = {"name": "scaling", "params": {"num_malicious": m, "poison_rate": _u(rng, 0.2, 0.5),
                                                             "boost": boost}}
        overrides["fl"] = {"fusion": rng.choice(("fedavg", "feddf"))}
    return Draw(index, threat, family, overrides)


def is_spec(value: Any) -> bool:
    return isinstance(value, dict) and AXIS in value


def expand_spec(spec: dict) -> list[Draw]:
    """The draws an axis value ``{zoo, draws, n, threat}`` names: the first ``n`` indices of the range
    whose family matches (``all``: every index, the families in turn)."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"zoo axis value: unknown key(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(SPEC_KEYS - {'label'}))}")
    family, split, n, threat = spec.get("zoo"), spec.get("draws"), spec.get("n"), spec.get("threat")
    if family != "all" and family not in FAMILIES:
        raise ConfigError(f"zoo axis value: zoo {family!r} unknown; valid: all, {', '.join(FAMILIES)}")
    if split not in RANGES:
        raise ConfigError(f"zoo axis value: draws {split!r} unknown; valid: dev, test")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"zoo axis value: n must be a whole number >= 1, got {n!r}")
    if threat not in THREATS:
        raise ConfigError(f"zoo axis value: threat {threat!r} unknown; valid: {', '.join(THREATS)}")
    start = RANGES[split][0]
    if family == "all":
        indices = range(start, start + n)
    else:
        first = start + (FAMILIES.index(family) - start) % len(FAMILIES)
        indices = range(first, first + n * len(FAMILIES), len(FAMILIES))
    return [draw(i, threat) for i in indices]


def defended(data: dict) -> bool:
    """Whether a cell config (plain dict) names any defense other than ``none``."""
    d = data.get("defense", {"name": "none"})
    return any(x.get("name", "none") != "none" for x in (d if isinstance(d, list) else [d]))


def allowed(d: Draw, data: dict) -> bool:
    """The protocol: a development draw of a test-only family runs undefended only, and so does a clean
    draw (it measures the draw's trigger, not a defense)."""
    return not ((d.threat == "clean" or (d.split == "dev" and d.family in TEST_ONLY)) and defended(data))
