"""Seconds per FL round of a cell: ``python -m benchmarks.speed [--config cfg.yaml] [--set k=v ...]``.

Runs the cell (default: benchmarks/configs/cell.yaml with 3 rounds) and prints, per round, the
seconds of local training, fusion, defense hooks and the whole round (evaluation excluded), plus
the ACC reached, as a Markdown table. ``--json FILE`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.cli import add_cell_arguments, cell_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="rounds to time (default 3)")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    args.overrides = [f"fl.rounds={args.rounds}", "runtime.progress=false", *args.overrides]
    cfg = cell_config(args)
    from fl_core.fl import run_cell

    record = run_cell(cfg, log=lambda *_: None)
    rows = [r for r in record["rounds"] if r["round"] > 0]
    print(f"cell {cfg.key()} on {record['device']}, {os.cpu_count()} CPUs visible, torch threads "
          f"{__import__('torch').get_num_threads()}")
    print("| round | local s | fusion s | defense s | round s | ACC |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['local_seconds']:.1f} | {r['fusion_seconds']:.1f} | {r['defense_seconds']:.2f} "
              f"| {r['seconds']:.1f} | {r['acc']:.2f} |")
    mean = sum(r["seconds"] for r in rows) / len(rows)
    print(f"mean seconds per round: {mean:.1f}; pre-training {record['rounds'][0]['seconds']:.1f} s; "
          f"cell wall time {record['wall_seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"key": cfg.key(), "rounds": rows, "mean_round_seconds": mean,
                       "wall_seconds": record["wall_seconds"]}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
