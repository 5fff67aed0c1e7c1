"""Every committed grid's cells in one table per threat: ``python -m benchmarks.report --leaderboard results``.

Writes ``<folder>/leaderboard.csv`` (one row per finished cell of every grid folder, archive and
development grids excluded) and ``<folder>/LEADERBOARD.md``: per threat, one row per defense with the median ASR of its
cells against each attack, its mean ACC drop against the undefended cell of the same config, and the
zoo's pass rate where ``zoo_test`` ran. Cells come from different grids, budgets and datasets; each is
compared only with its own undefended cell, and the ``cells`` column says how many stand behind a row.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from benchmarks.cli import CONFIG_DIR
from benchmarks.results import load_results
from benchmarks.zoo_report import zoo_cells

DEV_GRIDS = CONFIG_DIR / "grids" / "dev"

THREATS = {"fm": "compromised FM", "classic": "classic (malicious clients)"}
FM_ATTACKS = ("fm", "fm-prompt", "fm-generator")


def threat_of(attack: str) -> str | None:
    """The threat an attack name belongs to; None for the attack-free cells."""
    return None if attack == "none" else "fm" if attack in FM_ATTACKS else "classic"


def gather(folder: Path) -> pd.DataFrame:
    """The finished cells of every grid folder under ``folder`` (not ``archive/``), one row each, with
    ``grid``, ``threat``, ``attack``, ``defense`` and, for zoo grids, ``passes`` / ``bites``."""
    frames = []
    for manifest in sorted(folder.glob("*/grid.json")):
        cells, _, grid = load_results(manifest.parent)
        if (DEV_GRIDS / f"{grid['grid']}.yaml").is_file():
            continue  # a development selection: its variants are not contenders
        done = zoo_cells(cells) if "zoo" in grid["axes"] else cells[cells["status"] == "done"].copy()
        if done.empty:
            continue
        role = next((a for a in grid["axes"] if a.split(".")[0] == "defense"), None)
        done["defense"] = done[role].astype(str) if role else done["defense_name"]
        done["threat"] = done["cfg.attack.name"].map(threat_of)
        done["attack"] = "zoo draws" if "zoo" in grid["axes"] else done["cfg.attack.name"]
        done["grid"] = manifest.parent.name
        frames.append(done)
    if not frames:
        return pd.DataFrame()
    cells = pd.concat(frames, ignore_index=True)
    keep = ["grid", "key", "threat", "attack", "defense", "defense_name", "cfg.data.dataset", "seed", "acc", "asr",
            "ra", "acc_drop_vs_undefended", "bites", "passes"]
    return cells[[c for c in keep if c in cells]]


def threat_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per defense: cells, median ASR per attack, mean ACC drop, zoo pass rate."""
    defended = cells[cells["defense_name"] != "none"]
    rows = []
    for defense, part in defended.groupby("defense", sort=True):
        row = {"defense": defense, "cells": len(part)}
        for attack, by_attack in part.groupby("attack", sort=True):
            row[f"{attack}: median ASR"] = round(by_attack["asr"].median(), 2)
        row["mean ACC drop"] = round(part["acc_drop_vs_undefended"].mean(), 2)
        zoo = part[part["grid"].str.startswith("zoo_test") & part.get("bites", False).fillna(False).astype(bool)] \
            if "bites" in part else part.iloc[:0]
        row["zoo pass rate (%)"] = round(100 * zoo["passes"].astype(bool).mean(), 1) if len(zoo) else float("nan")
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    last = ["mean ACC drop", "zoo pass rate (%)"]
    return table[[c for c in table if c not in last] + last]


def write_leaderboard(folder: str | Path) -> list[Path]:
    """``leaderboard.csv`` and ``LEADERBOARD.md`` in ``folder``; the files written."""
    folder = Path(folder)
    cells = gather(folder)
    if cells.empty:
        raise FileNotFoundError(f"no finished grid cells under {folder} (each grid folder holds a grid.json)")
    csv, md = folder / "leaderboard.csv", folder / "LEADERBOARD.md"
    cells.to_csv(csv, index=False)
    lines = ["# Leaderboard", "", "Produced by `python -m benchmarks.report --leaderboard results` from every grid "
             "folder here (not `archive/`, not the development grids). A row pools every finished defended cell of a defense across grids, "
             "budgets and datasets; ACC drop is against the undefended cell of the same config; the zoo pass "
             "rate counts `zoo_test` draws that bite undefended (ASR <= 10 and ACC drop <= 3, `docs/ZOO.md`). "
             "Read a row with its `cells` count, and the grid tables for like-for-like comparisons.", "",
             f"Grids: {', '.join(sorted(cells['grid'].unique()))}.", ""]
    for threat, title in THREATS.items():
        table = threat_table(cells[cells["threat"] == threat])
        if not table.empty:
            lines += [f"## {title}", "", table.to_markdown(index=False), ""]
    md.write_text("\n".join(lines))
    return [csv, md]
