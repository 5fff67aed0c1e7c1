"""Seconds, images/s and GFLOP/s per stage of a cell: ``python -m benchmarks.speed [--config cfg.yaml] [--set k=v]``.

Runs the cell (default: benchmarks/configs/cell.yaml with 3 rounds, stage cache off so every stage is
computed) and prints, per stage, seconds, training images per second and GFLOP/s (FLOPs of one
training image of the model counted with torch's FLOP counter: forward + backward), per round the
seconds of local training, fusion and defense hooks, and the ACC reached. ``--compare REF`` times the
same command at another git ref (a temporary worktree) right after, on the same machine, and prints
the ratios: speed claims are ratios measured side by side, not wall times from different days.
``--json FILE`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.cli import add_cell_arguments, cell_config

REPO = Path(__file__).resolve().parent.parent


def training_flops_per_image(cfg) -> float:
    """FLOPs of one forward + backward pass of one image through the cell's (first) model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fl_core.data import dataset_facts
    from fl_core.models import build_model

    facts = dataset_facts(cfg.data.dataset, cfg.runtime.data_root, cfg.runtime.cache_dir)
    model = build_model(cfg.model.specs()[0], facts.shape[0], facts.classes, (0.5,) * facts.shape[0],
                        (0.25,) * facts.shape[0])
    x = torch.rand(8, *facts.shape)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / len(x)


def stage_rows(record: dict, cfg, flops: float) -> list[dict]:
    """Seconds, images and throughput of pre-training, local training and fusion, summed over rounds."""
    rounds = [r for r in record["rounds"] if r["round"] > 0]
    pre_images = cfg.synthetic.size * cfg.pretrain.epochs if cfg.pretrain.enabled else 0
    local_images = sum(record["client_sizes"]) * cfg.fl.clients_per_round / cfg.fl.num_clients \
        * cfg.fl.local_epochs * len(rounds)
    fusion_images = cfg.fusion.steps * cfg.fusion.optim.batch_size * len(rounds) if cfg.fl.fusion == "feddf" else 0
    rows = [("pre-training", record["rounds"][0]["seconds"], pre_images),
            ("local training", sum(r["local_seconds"] for r in rounds), local_images),
            ("fusion (student steps)", sum(r["fusion_seconds"] for r in rounds), fusion_images)]
    return [{"stage": name, "seconds": sec, "images": images,
             "images_per_s": images / sec if sec > 0 else float("nan"),
             "gflops": images * flops / sec / 1e9 if sec > 0 else float("nan")} for name, sec, images in rows]


def measure(argv: list[str]) -> dict:
    """Run the cell of ``argv`` (the speed tool's own arguments) here and return its numbers."""
    import torch

    parser = argparse.ArgumentParser()
    add_cell_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    args, _ = parser.parse_known_args(argv)
    args.overrides = [f"fl.rounds={args.rounds}", "runtime.progress=false", "runtime.stage_cache=false",
                      *args.overrides]
    cfg = cell_config(args)
    from fl_core.fl import run_cell

    record = run_cell(cfg, log=lambda *_: None)
    flops = training_flops_per_image(cfg)
    rounds = [r for r in record["rounds"] if r["round"] > 0]
    return {"key": cfg.key(), "device": record["device"], "threads": torch.get_num_threads(),
            "flops_per_training_image": flops, "stages": stage_rows(record, cfg, flops), "rounds": rounds,
            "mean_round_seconds": sum(r["seconds"] for r in rounds) / len(rounds),
            "wall_seconds": record["wall_seconds"]}


def print_report(result: dict, title: str) -> None:
    print(f"## {title}: cell {result['key']} on {result['device']}, {os.cpu_count()} CPUs visible, "
          f"torch threads {result['threads']}, {result['flops_per_training_image'] / 1e6:.1f} MFLOP per training image")
    print("| stage | seconds | images | images/s | GFLOP/s |")
    print("|---|---|---|---|---|")
    for s in result["stages"]:
        print(f"| {s['stage']} | {s['seconds']:.1f} | {s['images']:.0f} | {s['images_per_s']:.0f} | {s['gflops']:.1f} |")
    print("| round | local s | fusion s | defense s | round s | ACC |")
    print("|---|---|---|---|---|---|")
    for r in result["rounds"]:
        print(f"| {r['round']} | {r['local_seconds']:.1f} | {r['fusion_seconds']:.1f} | {r['defense_seconds']:.2f} "
              f"| {r['seconds']:.1f} | {r['acc']:.2f} |")
    print(f"mean seconds per round: {result['mean_round_seconds']:.1f}; cell wall time {result['wall_seconds']:.0f} s")


def measure_at_ref(ref: str, argv: list[str]) -> dict:
    """The same measurement at git ``ref``, in a temporary worktree, with this checkout's data root."""
    with tempfile.TemporaryDirectory(prefix="speed-ref-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
        try:
            out = Path(tmp) / "result.json"
            data_root = [] if "--data-root" in argv else [
                "--data-root", str(Path(os.environ.get("FMFL_DATA_ROOT") or REPO / "data").resolve())]
            subprocess.run([sys.executable, "-m", "benchmarks.speed", *argv, *data_root, "--json", str(out)],
                           cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)})
            result = json.loads(out.read_text())
            return result.get("here", result)  # refs before this tool's stage table wrote the bare numbers
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="rounds to time (default 3)")
    parser.add_argument("--compare", metavar="REF", help="also time the same cell at this git ref and print ratios")
    parser.add_argument("--json", help="also write the measurements to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    cell_argv = [a for i, a in enumerate(argv) if a not in ("--compare", "--json")
                 and (i == 0 or argv[i - 1] not in ("--compare", "--json"))]
    here = measure(cell_argv)
    print_report(here, "this checkout")
    results = {"here": here}
    if args.compare:
        there = measure_at_ref(args.compare, cell_argv)
        if "stages" in there:
            print_report(there, f"ref {args.compare}")
        results["ref"] = there
        print(f"## ratio ({args.compare} seconds / this checkout's seconds; > 1: this checkout is faster)")
        print(f"- mean round: {there['mean_round_seconds'] / here['mean_round_seconds']:.2f}x")
        print(f"- cell wall time: {there['wall_seconds'] / here['wall_seconds']:.2f}x")
        for mine, theirs in zip(here["stages"], there.get("stages", [])):
            if mine["seconds"] > 0 and theirs["seconds"] > 0:
                print(f"- {mine['stage']}: {theirs['seconds'] / mine['seconds']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
