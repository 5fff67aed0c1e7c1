"""Attacks, one file each, registered by name in ``fl_core.registry.ATTACKS``; third-party ones via entry point
group ``fmfl.attacks``."""
from fl_core.hooks import Attack
from fl_core.plugins import import_package_modules
from fl_core.registry import ATTACKS


@ATTACKS.register("none")
class NoAttack(Attack):
    """Attack-free run (AF)."""



from attacks.triggers import TRIGGERS, make_trigger  # noqa: E402

import_package_modules(__name__, __path__)

__all__ = ["ATTACKS", "Attack", "NoAttack", "TRIGGERS", "make_trigger"]
