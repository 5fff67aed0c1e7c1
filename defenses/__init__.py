"""Defenses, one file each, registered by name in ``fl_core.registry.DEFENSES``; third-party ones via entry point
group ``fmfl.defenses``."""
from fl_core.hooks import Defense
from fl_core.plugins import import_package_modules
from fl_core.registry import DEFENSES

WHEN = ("final", "every")  # model repair after the last round only, or after every round


def check_when(when: str) -> str:
    """``when`` itself, or a ValueError listing the valid schedules."""
    if when not in WHEN:
        raise ValueError(f"when {when!r} unknown; valid: {', '.join(WHEN)}")
    return when


def acts_now(when: str, ctx) -> bool:
    """Whether a ``when``-scheduled repair runs in this round."""
    return when == "every" or ctx.round == ctx.rounds


@DEFENSES.register("none")
class NoDefense(Defense):
    """Undefended run."""



import_package_modules(__name__, __path__)

__all__ = ["DEFENSES", "Defense", "NoDefense"]
