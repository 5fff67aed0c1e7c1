"""Sweep a grid of cells: ``python -m benchmarks.grid [--preset default] [--scale cpu] [--set k=v] ...``.

A grid file (``benchmarks/configs/grids/<preset>.yaml``) holds a base cell config, named scales
(``cpu``, ``paper``) and axes whose cross product, minus ``exclude`` rules plus ``include`` cells, is
the grid. Each cell is keyed by the hash of its resolved config; a cell whose ``record.json`` exists
is skipped, so an interrupted grid resumes where it stopped. A cell that raises or diverges is
recorded as failed (with its traceback) and retried on the next run; a defense that cannot apply to
a setting is recorded as not applicable. At the end the report (tables, plots) is regenerated.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

from benchmarks.cli import (
    PLUGIN_HELP,
    add_budget_argument,
    add_stage_cache_argument,
    check_budget,
    check_out,
    estimate_seconds,
    runtime_overrides,
    sigterm_as_interrupt,
    signals_handled,
    writable_folder,
)
from benchmarks.gridspec import Cell, GridSpec, expand, load_grid, presets, resolve_grid_path
from benchmarks.report import write_report
from benchmarks.results import recorded_commands
from fl_core.config import check_ready, validate
from fl_core.configfile import override_key
from fl_core.records import read_record
from fl_core.registry import import_plugins
from fl_core.schema import CellConfig, ConfigError, from_dict
from fl_core.storage import Claim, read_json, write_json
from fl_core.threads import parallel_cells

EXECUTORS = ("local", "process", "ray")


def cell_dir(out: Path, key: str) -> Path:
    return out / "cells" / key


def cell_status(out: Path, key: str) -> str:
    """``done``, ``n/a`` (not applicable), ``failed`` or ``pending``."""
    folder = cell_dir(out, key)
    if read_record(folder, key) is not None:
        return "done"
    status = read_json(folder / "status.json")
    return status["status"] if status is not None else "pending"


def execute_cell(cell_config: dict, out: str, plugins: tuple[str, ...] = ()) -> dict:
    """Run one cell in this process and record its outcome on disk; returns a short status dict.

    Shared by every executor (also inside process-pool and Ray workers).
    """
    import_plugins(list(plugins))
    cfg = validate(from_dict(CellConfig, cell_config))
    folder = cell_dir(Path(out), cfg.key())
    claim = Claim(folder / "claim.json")
    if not claim.acquire():  # another runner computes it now
        return {"key": cfg.key(), "status": "elsewhere", "seconds": 0.0}
    with claim:
        if cell_status(Path(out), cfg.key()) in ("done", "n/a"):  # finished by another runner meanwhile
            return {"key": cfg.key(), "status": "elsewhere", "seconds": 0.0}
        return _compute_cell(cfg, folder)


def _compute_cell(cfg: CellConfig, folder: Path) -> dict:
    from fl_core.fl import DivergedError, run_cell

    (folder / "status.json").unlink(missing_ok=True)
    started = time.time()
    with open(folder / "log.txt", "a") as log_file:
        def log(msg: str) -> None:
            log_file.write(msg + "\n")
            log_file.flush()

        log(f"start {time.strftime('%Y-%m-%d %H:%M:%S')} key {cfg.key()}")
        try:
            record = run_cell(cfg, folder, log=log)
            log(f"done in {record['wall_seconds']:.1f} s: {record['metrics']}")
            return {"key": cfg.key(), "status": "done", "seconds": time.time() - started, **record["metrics"]}
        except NotImplementedError as err:
            outcome = {"status": "n/a", "reason": str(err)}
        except DivergedError as err:
            outcome = {"status": "failed", "error": f"diverged: {err}", "traceback": traceback.format_exc()}
        except Exception as err:  # noqa: BLE001 - a failed cell must not stop the grid
            outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc()}
        log(f"{outcome['status']}: {outcome.get('reason') or outcome.get('error')}")
        if "traceback" in outcome:
            log(outcome["traceback"])
        write_json(folder / "status.json", {"key": cfg.key(), **outcome})
        return {"key": cfg.key(), "seconds": time.time() - started, **outcome}


def stage_group(cfg: CellConfig) -> str:
    """Cells with the same group share pre-training and round 1's client training through the stage cache:
    their configs differ only in the defense and the fusion."""
    d = cfg.to_dict(with_runtime=False)
    for key in ("defense", "fusion"):
        d.pop(key)
    d["fl"].pop("fusion")
    return json.dumps(d, sort_keys=True, default=str)


def schedule(cells: list[Cell], jobs: int) -> list[Cell]:
    """The order in which ``jobs`` parallel workers take the cells: one cell of each stage group first (they
    fill the stage cache, so no two workers compute the same stage at once), then the rest longest first
    (the last cells to finish are short). Sequential runs keep the grid's order."""
    if jobs <= 1:
        return list(cells)
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(stage_group(cell.config), []).append(cell)

    def longest_first(part: list[Cell]) -> list[Cell]:
        return sorted(part, key=lambda c: -estimate_seconds(c.config))  # stable: ties keep the grid's order

    return longest_first([g[0] for g in groups.values()]) + longest_first([c for g in groups.values() for c in g[1:]])


# ---------------------------------------------------------------- executors


def _run_local(todo, out, plugins, jobs, on_done, **_):
    for cell in todo:
        on_done(cell, execute_cell(cell.config.to_dict(), str(out), plugins))


def die_with_parent(parent: int) -> None:
    """In a worker of the grid process ``parent`` (its pid): let the kernel kill it when the grid process
    dies, even by SIGKILL (Linux), so no worker goes on computing a cell a rerun would then skip as held by
    another runner. SIGKILL, not SIGTERM: Lightning's Trainer catches SIGTERM during training and ends the
    cell, and the worker would take the next queued cell. A grid that died while the worker was still
    starting (before this ran) fires no signal, so the worker checks that its parent is still the grid."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


STOP_GRACE_SECONDS = 5.0


def stop_workers(workers, grace: float = STOP_GRACE_SECONDS) -> None:
    """Terminate ``workers`` (processes), and kill those still alive after ``grace`` seconds: a cell's own
    code may catch SIGTERM (Lightning's Trainer does) and let its worker take the next queued cell; no
    cell may keep running with the code it started on."""
    for worker in workers:
        worker.terminate()
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()


def _run_process(todo, out, plugins, jobs, on_done, **_):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop = threading.Event()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        try:
            # the handlers only set a flag: the loop stops at a safe point, where no lock of the executor is
            # held (an exception raised inside one left the pool hanging)
            with signals_handled(lambda *_: stop.set(), signal.SIGINT, signal.SIGTERM):
                futures = {pool.submit(execute_cell, c.config.to_dict(), str(out), plugins): c for c in todo}
                pending = set(futures)
                while pending and not stop.is_set():
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        on_done(futures[fut], fut.result())
            if stop.is_set():
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            stop_workers(multiprocessing.active_children())
            raise


def _run_ray(todo, out, plugins, jobs, on_done, address=None, cpus_per_cell=1.0, gpus_per_cell=0.0, **_):
    try:
        import ray
    except ImportError as err:
        raise SystemExit("--executor ray needs the 'ray' package: pip install 'ray[default]'") from err
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": os.cpu_count()}
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **kwargs)
    remote = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell)(execute_cell)
    refs = {remote.remote(c.config.to_dict(), str(out), plugins): c for c in todo}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                on_done(refs[ref], ray.get(ref))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        raise


RUNNERS = {"local": _run_local, "process": _run_process, "ray": _run_ray}


def whole_grid_labels(spec: GridSpec, scale: str, overrides: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Key -> labels of every cell of the unfiltered grid; empty where some cell outside a filter cannot
    be resolved here (its data missing, say)."""
    try:
        return {c.key: c.labels for c in expand(spec, scale, overrides)}
    except ConfigError:
        return {}


def _labels_id(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True)


def write_manifest(out: Path, spec: GridSpec, scale: str, cells: list[Cell], overrides: tuple[str, ...],
                   command: str, whole_grid: Callable[[], dict[str, dict[str, str]]] | None = None) -> None:
    """``grid.json``: the grid's axes, every cell's key, labels and config (read by the report), and each
    distinct command that wrote to this folder (earlier ``--only`` subsets stay in the report). Where an
    earlier cell's labels now name another cell (a preset that pinned an old default under a new label),
    ``whole_grid`` (key -> labels of the unfiltered grid, computed only then) relabels it, so a filtered
    command does not drop it."""
    path = out / "grid.json"
    manifest = read_json(path) or {}
    previous = manifest.get("cells", [])
    current, keys = {_labels_id(c.labels) for c in cells}, {c.key for c in cells}
    if whole_grid and any(_labels_id(c["labels"]) in current and c["key"] not in keys for c in previous):
        known = whole_grid()
        previous = [{**c, "labels": known.get(c["key"], c["labels"])} for c in previous]
    listed = {c["key"] for c in previous} | keys
    orphans = [d.name for d in sorted((out / "cells").glob("*")) if d.name not in listed and (d / "record.json").is_file()]
    if orphans and whole_grid:  # finished cells a damaged or older grid.json no longer lists: back from the grid
        known = whole_grid()
        previous += [{"key": k, "labels": known[k], "config": cfg} for k in orphans
                     if k in known and (cfg := (read_record(out / "cells" / k, k) or {}).get("config")) is not None]
    commands = [c for c in recorded_commands(manifest) if c != command] + [command]
    # keep earlier cells (e.g. other --only subsets) unless a current cell with the same labels replaces them
    entries = {c["key"]: c for c in previous if _labels_id(c["labels"]) not in current}
    for cell in cells:
        entries[cell.key] = {"key": cell.key, "labels": cell.labels, "config": cell.config.to_dict(with_runtime=False)}
    write_json(path, {"grid": spec.name, "description": spec.description, "scale": scale,
                       "axes": list(spec.axes), "overrides": list(overrides), "commands": commands,
                       "cells": list(entries.values())})


def run_grid(cells: list[Cell], out: Path, *, executor: str = "local", jobs: int = 1, plugins: tuple[str, ...] = (),
             progress: bool = True, **executor_options) -> dict[str, int]:
    """Run the cells not yet done; returns counts of outcomes. Ctrl-C keeps every finished cell."""
    from tqdm.auto import tqdm

    todo = schedule([c for c in cells if cell_status(out, c.key) not in ("done", "n/a")], jobs)
    counts = {"skipped": len(cells) - len(todo), "done": 0, "failed": 0, "n/a": 0, "elsewhere": 0}
    bar = tqdm(total=len(todo), desc="grid", unit="cell", disable=not progress)

    def on_done(cell: Cell, result: dict) -> None:
        counts[result["status"]] += 1
        bar.update(1)
        text = ", ".join(f"{k}={v}" for k, v in cell.labels.items())
        if result["status"] == "done":
            bar.write(f"done   [{text}] ACC {result['acc']:.2f} ASR {result['asr']:.2f} ({result['seconds']:.0f} s)")
        elif result["status"] == "elsewhere":
            bar.write(f"skip   [{text}] another runner holds or finished it")
        else:
            bar.write(f"{result['status']:6s} [{text}] {result.get('reason') or result.get('error')}")

    try:
        RUNNERS[executor](todo, out, plugins, jobs, on_done, **executor_options)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(counts) from None
    bar.close()
    return counts


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a grid; carries the counts of the cells finished before it."""

    def __init__(self, counts: dict[str, int]):
        super().__init__()
        self.counts = counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help=f"grid preset (default: default); one of: {', '.join(presets())}")
    source.add_argument("--config", help="a grid YAML file instead of a preset")
    parser.add_argument("--scale", default="cpu", help="a scale the grid file names (default: cpu; most grids also have paper)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cell config value in every cell (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE",
                        help="run only cells whose axis label matches; a|b for either (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, their status and an estimate")
    parser.add_argument("--out", help="output folder (default: runs/<preset>-<scale>)")
    parser.add_argument("--jobs", type=int, help="cells side by side (default: as many as CPUs are free now, each "
                                                   "cell runtime.threads threads; fl_core/threads.py)")
    parser.add_argument("--executor", choices=("auto", *EXECUTORS), default="auto",
                        help="auto (default): local for one cell at a time, else process")
    parser.add_argument("--address", help="Ray cluster address (executor ray); default: a local Ray instance")
    parser.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray CPU request per cell")
    parser.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray GPU request per cell")
    parser.add_argument("--data-root", help="data root (default: $FMFL_DATA_ROOT or ./data)")
    parser.add_argument("--device", help="auto | cpu | cuda[:N]")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)
    add_budget_argument(parser)
    add_stage_cache_argument(parser)
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.exit(2, "config error: --jobs must be >= 1\n")
    try:
        quiet = [] if any(override_key(o) == "runtime.progress" for o in args.overrides) else ["runtime.progress=false"]
        overrides = list(args.overrides) + quiet + runtime_overrides(args)
        check_out(args.out)
        import_plugins(args.plugin)
        path = resolve_grid_path(args.preset, args.config)
        spec = load_grid(path)
        cells = expand(spec, args.scale, tuple(overrides), tuple(args.only))
        out = Path(args.out or Path("runs") / f"{spec.name}-{args.scale}")
        check_budget([c.config for c in cells], args.max_hours)
        if not args.dry_run:
            writable_folder(out)
            for cell in cells:
                if cell_status(out, cell.key) not in ("done", "n/a"):
                    check_ready(cell.config)
    except (ConfigError, ImportError, KeyError) as err:
        parser.exit(2, f"config error: {err}\n")
    statuses = [cell_status(out, c.key) for c in cells]
    todo = [c for c, s in zip(cells, statuses) if s not in ("done", "n/a")]
    jobs = args.jobs or parallel_cells(max(1, len(todo)), max((c.config.runtime.threads for c in todo), default=1))
    executor = args.executor if args.executor != "auto" else ("local" if jobs == 1 else "process")
    estimate = sum(estimate_seconds(c.config) for c in todo) / jobs
    print(f"grid {spec.name!r} at scale {args.scale!r}: {len(cells)} cells, {len(todo)} to run, {jobs} at a time, "
          f"rough CPU estimate {estimate / 60:.1f} min -> {out}")
    if spec.description:
        print(f"  {spec.description.strip()}")
    if args.dry_run:
        for cell, status in zip(cells, statuses):
            text = ", ".join(f"{k}={v}" for k, v in cell.labels.items())
            print(f"  {cell.key}  {status:8s} ~{estimate_seconds(cell.config):5.0f} s  {text}")
        return 0
    command = shlex.join(["python", "-m", "benchmarks.grid", *(argv if argv is not None else sys.argv[1:])])
    write_manifest(out, spec, args.scale, cells, tuple(args.overrides), command,
                   functools.cache(lambda: whole_grid_labels(spec, args.scale, tuple(overrides))))
    started = time.time()
    try:
        with sigterm_as_interrupt():
            counts = run_grid(cells, out, executor=executor, jobs=jobs, plugins=tuple(args.plugin), address=args.address,
                              cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell)
    except Interrupted as stop:
        print(f"\ninterrupted: {stop.counts['done']} cell(s) done in this run, {stop.counts['skipped']} before; "
              "nothing half-written is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"grid finished in {(time.time() - started) / 60:.1f} min: {counts}")
    if not args.no_report:
        for path in write_report(out):
            print(f"  wrote {path}")
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
