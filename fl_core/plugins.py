"""Plugin discovery (every module of a plugin package registers itself on import) and the seam through which
``fl_core`` builds a cell's plugins from their registries."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from types import SimpleNamespace


def import_package_modules(package_name: str, package_path) -> None:
    """Import every module beside a package's ``__init__`` so that dropping in one file adds an entry."""
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")


@dataclass
class Plugins:
    """The constructed plugins a cell runs with."""

    attack: object  # fl_core.hooks.Attack
    defense: object  # fl_core.hooks.Defense (a DefenseChain for several)
    trigger: object


def registries() -> SimpleNamespace:
    """The attack, defense and trigger registries (``fl_core.registry``; the plugin packages register
    into them when first looked up)."""
    from fl_core.registry import ATTACKS, DEFENSES, TRIGGERS

    return SimpleNamespace(attacks=ATTACKS, defenses=DEFENSES, triggers=TRIGGERS)


def build_plugins(cfg) -> Plugins:
    """The attack, the defense (a chain when the config lists several) and the trigger named by a
    validated cell config."""
    from fl_core.hooks import DefenseChain

    reg = registries()
    members = [reg.defenses.get(d.name)(**d.params) for d in cfg.defenses()]
    return Plugins(attack=reg.attacks.get(cfg.attack.name)(**cfg.attack.params),
                   defense=DefenseChain(members),
                   trigger=reg.triggers.get(cfg.backdoor.trigger.kind)(**cfg.backdoor.trigger.params))
