"""Defenses, one file each, registered by name in ``DEFENSES``; third-party ones via entry point group ``fmfl.defenses``."""
from fl_core.hooks import Defense
from fl_core.plugins import import_package_modules
from fl_core.registry import Registry

DEFENSES: Registry[type[Defense]] = Registry("defense", "fmfl.defenses")


@DEFENSES.register("none")
class NoDefense(Defense):
    """Undefended run."""



import_package_modules(__name__, __path__)

__all__ = ["DEFENSES", "Defense", "NoDefense"]
