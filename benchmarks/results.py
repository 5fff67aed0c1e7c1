"""A grid output folder read back: one row per cell (axes, config, metrics, ACC drops) and per round."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fl_core.records import read_record
from fl_core.schema import CellConfig, from_dict
from fl_core.storage import read_json
from fl_core.tracking import flatten

METRICS = ("acc", "asr", "ra")
DETECTION = ("detection_tpr", "detection_fpr", "flag_recall", "flag_precision")  # per round, in %


def recorded_commands(manifest: dict) -> list[str]:
    """Every command that wrote to a grid folder, oldest first (folders written before the list was kept
    hold one ``command``)."""
    return manifest.get("commands") or ([manifest["command"]] if "command" in manifest else [])


def defense_name(config: dict) -> str:
    """A cell's defense, or its chain of defenses joined by ``+``."""
    d = config.get("defense", {"name": "none"})
    return "+".join(x["name"] for x in d) if isinstance(d, list) else d["name"]


def detection_means(rounds: list[dict]) -> dict:
    """Each detection score averaged over the rounds where it is defined (NaN where never)."""
    out = {}
    for m in DETECTION:
        values = [r[m] for r in rounds if r.get(m) is not None]
        out[m] = sum(values) / len(values) if values else float("nan")
    return out


def _key_with(config: dict, **sections) -> str:
    data = json.loads(json.dumps(config))
    data.update(sections)
    return from_dict(CellConfig, data).key()


def load_results(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(cells, rounds, grid manifest) of a grid output folder."""
    grid = read_json(out / "grid.json")
    if grid is None:
        raise FileNotFoundError(f"{out / 'grid.json'} is missing or damaged: rerun the grid command to rewrite it")
    rows, round_rows = [], []
    for cell in grid["cells"]:
        folder = out / "cells" / cell["key"]
        row = {"key": cell["key"], **cell["labels"]}
        rec, st = read_record(folder, cell["key"]), read_json(folder / "status.json")
        if rec is not None:
            row.update(status="done", **rec["metrics"], **detection_means(rec["rounds"]), wall_seconds=rec["wall_seconds"],
                       defense_seconds=rec["defense_seconds"], torch=rec["versions"]["torch"],
                       lightning=rec["versions"]["lightning"], git_commit=rec["versions"]["git_commit"])
            for r in rec["rounds"]:
                round_rows.append({"key": cell["key"], **cell["labels"],
                                   **{k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                      for k, v in r.items() if k != "prototypes"}})
        elif st is not None:
            row.update(status=st["status"], error=st.get("error"), reason=st.get("reason"))
        else:
            row.update(status="pending")
        row.update(flatten(cell["config"], "cfg."), defense_name=defense_name(cell["config"]))
        row["clean_key"] = _key_with(cell["config"], attack={"name": "none", "params": {}})
        row["undefended_key"] = _key_with(cell["config"], defense={"name": "none", "params": {}})
        rows.append(row)
    cells = pd.DataFrame(rows, columns=None if rows else ["key", "status", "clean_key", "undefended_key"])
    for m in METRICS + DETECTION:
        if m not in cells:
            cells[m] = float("nan")
    acc = cells.set_index("key")["acc"]
    cells["acc_drop_vs_clean"] = cells["clean_key"].map(acc) - cells["acc"]
    cells["acc_drop_vs_undefended"] = cells["undefended_key"].map(acc) - cells["acc"]
    return cells, pd.DataFrame(round_rows), grid
