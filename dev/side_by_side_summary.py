"""Summary of ``dev/side_by_side.sh``: ``python dev/side_by_side_summary.py OUT REF``.

Reads the wall seconds and the cells' ``record.json`` files the script left in OUT and writes
``summary.md`` and ``summary.json`` there: each speed ratio (REF's time over this checkout's) and, for
the grids, the largest difference in ACC / ASR between cells with the same attack and defense.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def seconds(out: Path, name: str) -> float:
    """Wall seconds of one timed part."""
    return float((out / f"{name}.seconds").read_text())


def record(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text())


def fusion_per_round(folder: Path) -> float:
    """Mean fusion seconds per round of one cell."""
    rounds = [r for r in record(folder)["rounds"] if r.get("round", 0) >= 1 and "fusion_seconds" in r]
    return sum(r["fusion_seconds"] for r in rounds) / len(rounds)


def cell_label(config: dict) -> str:
    defense = config["defense"]
    defense = defense if isinstance(defense, dict) else defense[0]
    multi = (defense.get("params") or {}).get("multi")
    name = "multikrum" if defense["name"] == "krum" and multi not in (None, 0, 1) else defense["name"]
    return f"{config['attack']['name']}/{name}"


def grid_metrics(folder: Path) -> dict[str, dict]:
    """Final ACC / ASR of every finished cell of a grid folder, by attack/defense."""
    cells = {}
    for path in (folder / "cells").glob("*/record.json"):
        rec = json.loads(path.read_text())
        cells[cell_label(rec["config"])] = rec["metrics"]
    return cells


def compare_grids(out: Path, ref_name: str, new_name: str) -> dict:
    ref, new = grid_metrics(out / ref_name), grid_metrics(out / new_name)
    shared = sorted(set(ref) & set(new))
    diff = {c: max(abs(ref[c][m] - new[c][m]) for m in ("acc", "asr")) for c in shared}
    return {"ref_seconds": seconds(out, ref_name), "new_seconds": seconds(out, new_name),
            "ratio": seconds(out, ref_name) / seconds(out, new_name), "cells": len(shared),
            "max_metric_difference": diff}


def main(out: Path, ref: str) -> dict:
    summary = {
        "ref": ref,
        "fusion_seconds_per_round": {name: fusion_per_round(out / name)
                                     for name in ("fusion_ref", "fusion_new2", "fusion_new1")},
        "default_grid": compare_grids(out, "grid_ref", "grid_new"),
        "defense_table_fm_slice": compare_grids(out, "defense_ref", "defense_new"),
        "cell_seconds": {name: seconds(out, name) for name in ("cell_quiet", "cell_busy", "cell_busy_threads2")},
    }
    fm_ref, fm_new = record(out / "fm_ref_threads1")["metrics"], grid_metrics(out / "grid_new").get("fm/none")
    summary["fm_cell_at_one_thread"] = {"ref": fm_ref, "new": fm_new}
    f = summary["fusion_seconds_per_round"]
    c = summary["cell_seconds"]
    lines = [f"# Side by side against {ref}", "", "| measure | REF | this checkout | ratio |", "|---|---|---|---|",
             f"| fusion s/round, attack-table cpu scale, 2 threads | {f['fusion_ref']:.1f} | {f['fusion_new2']:.1f} "
             f"| {f['fusion_ref'] / f['fusion_new2']:.2f}x |",
             f"| fusion s/round, this checkout at 1 thread | | {f['fusion_new1']:.1f} | {f['fusion_ref'] / f['fusion_new1']:.2f}x |"]
    for name in ("default_grid", "defense_table_fm_slice"):
        g = summary[name]
        worst = max(g["max_metric_difference"].values(), default=float("nan"))
        lines.append(f"| {name} ({g['cells']} cells), wall s; largest ACC/ASR difference {worst:.2f} | "
                     f"{g['ref_seconds']:.0f} | {g['new_seconds']:.0f} | {g['ratio']:.2f}x |")
    lines += ["", "| default cell, this checkout | quiet, 1 thread | beside a busy process | slowdown |", "|---|---|---|---|"]
    lines += [f"| {label} | {c['cell_quiet']:.0f} s | {c[name]:.0f} s | {c[name] / c['cell_quiet']:.2f}x |"
              for label, name in (("1 thread (default)", "cell_busy"), ("2 threads", "cell_busy_threads2"))]
    lines += ["", f"Undefended FM cell at one thread: REF {fm_ref}, this checkout {fm_new}."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python dev/side_by_side_summary.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder dev/side_by_side.sh wrote")
    parser.add_argument("ref", help="the reference commit it compared against")
    args = parser.parse_args()
    main(args.out, args.ref)
