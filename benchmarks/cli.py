"""Arguments shared by the command-line tools: config, overrides, data root, plugins."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import tempfile
import threading
from pathlib import Path

from fl_core.config import load_config
from fl_core.registry import import_plugins
from fl_core.schema import CellConfig, ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="cell YAML config (default: benchmarks/configs/cell.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set fl.rounds=3 (repeatable)")
    parser.add_argument("--data-root", help="data root (default: $FMFL_DATA_ROOT or ./data)")
    parser.add_argument("--device", help="auto | cpu | cuda[:N]")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    add_budget_argument(parser)
    add_stage_cache_argument(parser)


def add_stage_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-stage-cache", action="store_true",
                        help="recompute every stage instead of reusing pre-trained / round-1 client models of "
                             "cells with the same inputs (runtime.stage_cache=false)")


def runtime_overrides(args: argparse.Namespace) -> list[str]:
    """``--data-root``, ``--device`` and ``--no-stage-cache`` as config overrides."""
    out = []
    if args.data_root is not None:
        if not Path(args.data_root).is_dir():
            raise ConfigError(f"--data-root {args.data_root!r} is not a folder (a typo would fall back to another "
                              "dataset's folder)")
        out.append(f"runtime.data_root={os.path.abspath(args.data_root)}")
    if args.device:
        out.append(f"runtime.device={args.device}")
    if args.no_stage_cache:
        out.append("runtime.stage_cache=false")
    return out


PLUGIN_HELP = ("import MODULE (it runs) before the config is checked, so that the attacks / defenses / models it "
               "registers can be named (repeatable); installed plugins load through entry points only when named")
DEFAULT_MAX_HOURS = 24.0


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-hours", type=float, default=DEFAULT_MAX_HOURS,
                        help=f"refuse a cell whose rough CPU estimate exceeds this (default {DEFAULT_MAX_HOURS:g})")


def estimate_seconds(cfg: CellConfig, throughput: float = 1900.0) -> float:
    """A rough CPU estimate from the images the cell pushes through the default model (~1,900/s on 2 cores)."""
    f = cfg.fl
    pool = cfg.data.client_pool_size or 40000
    per_round = pool * f.clients_per_round / f.num_clients * f.local_epochs
    if f.fusion == "feddf":
        per_round += cfg.fusion.steps * cfg.fusion.optim.batch_size * (1 + 0.45 * f.clients_per_round)
    evals = (f.rounds // cfg.eval.every + 1) * 2 * (cfg.data.test_size or 10000) * 0.27
    pre = cfg.pretrain.epochs * cfg.synthetic.size if cfg.pretrain.enabled else 0
    return (pre + f.rounds * per_round + evals) / throughput + 5


def check_budget(configs: list[CellConfig], max_hours: float) -> None:
    """A ConfigError, with the estimate, when a cell would run longer than ``max_hours`` (a typo such as
    ``fl.rounds=100000`` is caught before it occupies the machine for months)."""
    if not math.isfinite(max_hours) or max_hours <= 0:
        raise ConfigError(f"--max-hours must be a finite number > 0, got {max_hours}")
    worst = max(configs, key=estimate_seconds, default=None)
    if worst is not None and estimate_seconds(worst) > max_hours * 3600:
        raise ConfigError(f"a cell ({worst.fl.rounds} rounds, {worst.fl.local_epochs} local epochs, model "
                          f"{worst.model.name}) is estimated at {estimate_seconds(worst) / 3600:.1f} h > --max-hours "
                          f"{max_hours:g}; raise --max-hours if that is intended")


def cell_config(args: argparse.Namespace) -> CellConfig:
    """Plugins imported, then the YAML + overrides resolved and validated (before any compute)."""
    import_plugins(args.plugin)
    return load_config(args.config or CONFIG_DIR / "cell.yaml", list(args.overrides) + runtime_overrides(args))


def check_out(out: str | None) -> None:
    """``--out`` names a folder when given: an empty one would silently write to the default."""
    if out is not None and not out.strip():
        raise ConfigError("--out is empty; name an output folder or leave --out out")


def writable_folder(path: str | Path) -> Path:
    """Create ``path`` (with parents) and check that a file can be written in it, before any compute;
    a ConfigError says why not (a file in the way, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check"):
            pass
    except OSError as err:
        raise ConfigError(f"output folder {str(path)!r} is not writable: {err.strerror or err}") from err
    return path


@contextlib.contextmanager
def signals_handled(handler, *signals: signal.Signals):
    """Inside the block, ``handler`` answers ``signals``; the previous handlers come back after it. Only the
    main thread may set handlers: elsewhere the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, earlier in previous.items():
            signal.signal(s, earlier)


def sigterm_as_interrupt():
    """A block inside which SIGTERM (``kill``, a batch scheduler's stop) takes Ctrl-C's path: a grid's
    workers stopped and its finished cells kept, a cell's partial output dropped; exit status 130."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signals_handled(interrupt, signal.SIGTERM)
