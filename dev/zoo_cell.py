"""The one ``zoo_dev`` cell a development diagnostic runs (shared by ``dev.round_trace`` and
``dev.vouch_diagnostic``)."""
from __future__ import annotations

import argparse


def development_cell(parser: argparse.ArgumentParser, draw: str, dataset: str, defense: str,
                     overrides: tuple[str, ...] = ()):
    """The config of ``draw`` on ``dataset`` under ``defense`` at the cpu budget; a test draw is refused
    through ``parser`` (a diagnostic reads the attack's ground truth, which no test draw may inform)."""
    if not draw.startswith("dev"):
        parser.error("development draws only (dev...)")
    from benchmarks.gridspec import expand, load_grid, resolve_grid_path

    only = (f"zoo={draw}", f"data.dataset={dataset}", f"defense={defense}")
    [cell] = expand(load_grid(resolve_grid_path("zoo_dev", None)), "cpu", tuple(overrides), only)
    return cell.config
