"""Tables and plots from a grid's output folder, without rerunning: ``python -m benchmarks.report DIR``.

Writes ``cells.csv`` / ``cells.parquet`` (one row per cell: axes, every parameter, ACC, ASR, RA, ACC
drops, timings, versions), ``rounds.csv`` (per-round curves), ``tables.md`` and ``tables.tex``
(mean +- std over seeds; the paper layouts: attack table ACC/ASR per attack, defense table
ACC drop / ASR per defense x attack) and PNG plots (bars, curves against rounds, ACC-ASR trade-off).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from benchmarks.zoo_report import cdf_plot, zoo_tables
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
        rec, st = read_json(folder / "record.json"), read_json(folder / "status.json")
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


def _role(axes: list[str], role: str) -> str | None:
    return next((a for a in axes if a.split(".")[0] == role), None)


def _mean_std(series: pd.Series) -> str:
    s = series.dropna()
    if s.empty:
        return "-"
    return f"{s.mean():.2f}" if len(s) == 1 else f"{s.mean():.2f} ± {s.std(ddof=1):.2f}"


def summary_table(cells: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean +- std over seeds of every metric, one row per combination of the non-seed axes."""
    group = [a for a in axes if a != "seed"]
    done = cells[cells["status"] == "done"]
    cols = ["acc", "asr", "ra", "acc_drop_vs_clean", "acc_drop_vs_undefended"]
    cols += [m for m in DETECTION if m in done and done[m].notna().any()]
    if done.empty:
        return pd.DataFrame(columns=group + cols + ["seeds"])
    if not group:
        done = done.assign(_all="all")
        group = ["_all"]
    table = done.groupby(group, sort=False).agg({c: _mean_std for c in cols})
    table["seeds"] = done.groupby(group, sort=False).size()
    return table.reset_index()


def pretrained_table(rounds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Round 0, the model pre-trained on the (possibly poisoned) synthetic set before any client trains:
    mean +- std over seeds per combination of the axes other than the defense (which acts later) and the
    seed. On attack-free cells its ACC is the synthetic set's classification accuracy score (a model of
    the default architecture trained only on it, tested on real test images)."""
    group = [a for a in axes if a != "seed" and _role([a], "defense") is None]
    if rounds.empty or "round" not in rounds or not (rounds["round"] == 0).any():
        return pd.DataFrame()
    first = rounds[rounds["round"] == 0]
    if not group:
        first, group = first.assign(_all="all"), ["_all"]
    first = first.drop_duplicates(subset=group + [c for c in ("seed",) if c in first])
    table = first.groupby(group, sort=False).agg({"acc": _mean_std, "asr": _mean_std})
    table["seeds"] = first.groupby(group, sort=False).size()
    return table.reset_index()


def pivot(cells: pd.DataFrame, rows: list[str], column: str, fmt) -> pd.DataFrame:
    """One row per combination of ``rows``, one column per value of ``column``; cells ``fmt(group)``."""
    done = cells[cells["status"] == "done"]
    if done.empty:
        return pd.DataFrame()
    keys = rows or ["_all"]
    if not rows:
        done = done.assign(_all="all")
    out = done.groupby(keys + [column], sort=False).apply(fmt, include_groups=False).unstack(column)
    return out.fillna("-").reset_index()  # "-": no cell ran for that combination


def paper_tables(cells: pd.DataFrame, axes: list[str]) -> dict[str, pd.DataFrame]:
    """The attack table (ACC / ASR per attack) and the defense table (ACC drop / ASR per defense x attack)."""
    attack, defense = _role(axes, "attack"), _role(axes, "defense")
    others = [a for a in axes if a not in (attack, defense, "seed")]
    tables = {}
    if attack:
        subset = cells if not defense else cells[cells["defense_name"] == "none"]
        tables["Attack table: ACC / ASR (%) per attack (undefended)"] = pivot(
            subset, others, attack, lambda g: f"{_mean_std(g['acc'])} / {_mean_std(g['asr'])}")
    if defense:
        rows = [defense] + others
        col = attack or "attack"
        if col not in cells:
            cells = cells.assign(attack=cells["cfg.attack.name"])
        tables["Defense table: ACC drop vs undefended / ASR (%)"] = pivot(
            cells, rows, col, lambda g: f"{_mean_std(g['acc_drop_vs_undefended'])} / {_mean_std(g['asr'])}")
        if cells["detection_tpr"].notna().any():
            tables["Client-level detection: TPR / FPR (%) of malicious / benign selected clients not admitted, "
                   "mean over rounds"] = pivot(
                cells[cells["detection_tpr"].notna()], rows, col,
                lambda g: f"{_mean_std(g['detection_tpr'])} / {_mean_std(g['detection_fpr'])}")
        if cells["flag_recall"].notna().any():
            tables["Sample-level detection: recall / precision (%) of flagged synthetic samples against the "
                   "poisoned ones"] = pivot(
                cells[cells["flag_recall"].notna()], rows, col,
                lambda g: f"{_mean_std(g['flag_recall'])} / {_mean_std(g['flag_precision'])}")
    return tables


def row_names(frame: pd.DataFrame, group: list[str]) -> pd.Series:
    """One name per row from its labels on ``group`` ("-" where a cell predates an axis and lacks it)."""
    return frame[group].fillna("-").astype(str).agg(" | ".join, axis=1)


def _plots(cells: pd.DataFrame, rounds: pd.DataFrame, axes: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = cells[cells["status"] == "done"]
    if done.empty:
        return []
    group = [a for a in axes if a != "seed"] or ["key"]
    name = row_names(done, group)
    agg = done.assign(name=name).groupby("name", sort=False)[["acc", "asr"]].agg(["mean", "std"])
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(agg) + 2), 4.5))
    x = range(len(agg))
    ax.bar([i - 0.2 for i in x], agg[("acc", "mean")], 0.4, yerr=agg[("acc", "std")].fillna(0), label="ACC")
    ax.bar([i + 0.2 for i in x], agg[("asr", "mean")], 0.4, yerr=agg[("asr", "std")].fillna(0), label="ASR")
    ax.set_xticks(list(x), agg.index, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(" | ".join(group))
    fig.tight_layout()
    paths.append(out / "bars.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if not rounds.empty:
        fig, axs = plt.subplots(1, 2, figsize=(11, 4.2))
        r_name = row_names(rounds, group) if group != ["key"] else rounds["key"]
        curves = rounds.assign(name=r_name).groupby(["name", "round"], sort=False)[["acc", "asr"]].mean()
        for label_, frame in curves.groupby(level=0, sort=False):
            for metric, axis in zip(("asr", "acc"), axs):
                axis.plot(frame.index.get_level_values(1), frame[metric], marker="o", ms=3, label=label_)
        for metric, axis in zip(("ASR", "ACC"), axs):
            axis.set_xlabel("round")
            axis.set_ylabel(f"{metric} (%)")
            axis.set_ylim(0, 100)
        axs[1].legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        paths.append(out / "curves.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    paths.append(tradeoff_plot(done, axes, out / "tradeoff.png"))
    plt.close("all")
    return paths


def tradeoff_plot(done: pd.DataFrame, axes: list[str], path: Path) -> Path:
    """ACC against ASR: one panel per attack (and per other non-seed axis value), one marker per defense
    with a legend, mean over seeds with std error bars."""
    import matplotlib.pyplot as plt

    attack, defense = _role(axes, "attack"), _role(axes, "defense")
    panel_axes = [a for a in axes if a not in (defense, "seed")]
    panels = done.groupby(panel_axes, sort=False) if panel_axes else [("all", done)]
    panels = list(panels)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axs = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), squeeze=False)
    names = list(dict.fromkeys(done[defense] if defense else ["all"]))
    markers = "osD^v<>pPX*h+x"
    colors = plt.get_cmap("tab20")
    for i, (key, frame) in enumerate(panels):
        ax = axs[i // cols][i % cols]
        for j, name in enumerate(names):
            group = frame[frame[defense] == name] if defense else frame
            if group.empty:
                continue
            ax.errorbar(group["asr"].mean(), group["acc"].mean(), xerr=group["asr"].std(ddof=1) if len(group) > 1 else 0,
                        yerr=group["acc"].std(ddof=1) if len(group) > 1 else 0, marker=markers[j % len(markers)],
                        color=colors(j % 20), linestyle="none", ms=6, capsize=2, label=name)
        ax.set_title(" | ".join(map(str, key if isinstance(key, tuple) else (key,))), fontsize=8)
        ax.set_xlim(-3, 103)
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel("ACC (%)")
    for k in range(len(panels), rows * cols):
        axs[k // cols][k % cols].axis("off")
    handles, labels = axs[0][0].get_legend_handles_labels()
    for ax in axs.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7, frameon=False)
    fig.suptitle("ACC against ASR per " + (attack or "cell") + " (upper left is better; bars: std over seeds)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * (-(-len(labels) // 6)), 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: str | Path) -> list[Path]:
    """Regenerate every table and plot of a grid output folder; returns the files written."""
    out = Path(out)
    cells, rounds, grid = load_results(out)
    axes = grid["axes"]
    written = [out / "cells.csv", out / "rounds.csv", out / "cells.parquet"]
    cells.to_csv(written[0], index=False)
    rounds.to_csv(written[1], index=False)
    cells.astype({c: str for c in cells.columns if cells[c].dtype == object}).to_parquet(written[2], index=False)
    status = cells["status"].value_counts().to_dict()
    md = [f"# Grid `{grid['grid']}` at scale `{grid['scale']}`", "",
          grid.get("description", "").strip(), "", *command_lines(grid), "",
          f"Cells: {status}. Mean ± std over the finished seeds; each row's `seeds` column counts them.", ""]
    tex = []
    zoo_axis = "zoo" in axes
    tables = {**(zoo_tables(cells) if zoo_axis else {}), "Summary": summary_table(cells, axes),
              **({} if zoo_axis else paper_tables(cells, axes)),
              "Pre-trained model (round 0; attack-free ACC = classification accuracy score of the synthetic set)":
                  pretrained_table(rounds, axes)}
    for title, table in tables.items():
        if table.empty:
            continue
        md += [f"## {title}", "", table.to_markdown(index=False), ""]
        tex += [f"% {title}", table.to_latex(index=False), ""]
    failed = cells[cells["status"].isin(["failed", "n/a"])]
    if not failed.empty:
        md += ["## Failed or not applicable cells", ""]
        for _, row in failed.iterrows():
            why = next((str(row.get(k)) for k in ("reason", "error") if isinstance(row.get(k), str) and row.get(k)),
                       "no reason recorded")
            md.append(f"- `{row['key']}` {row['status']}: {why}")
        md.append("")
    (out / "tables.md").write_text("\n".join(md))
    (out / "tables.tex").write_text("\n".join(tex))
    written += [out / "tables.md", out / "tables.tex"]
    written += _plots(cells, rounds, axes, out)
    if zoo_axis:
        written += [p for p in [cdf_plot(cells, out / "zoo_cdf.png")] if p is not None]
    return written


def command_lines(grid: dict) -> list[str]:
    """The command(s) that produced a grid folder, for the report's header."""
    commands = recorded_commands(grid) or [""]
    if len(commands) == 1:
        return [f"Command: `{commands[0]}`"]
    return ["Commands (each ran the cells its filters select; together they produced this folder):",
            *[f"- `{c}`" for c in commands]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("out", help="a grid output folder (holds grid.json)")
    args = parser.parse_args(argv)
    if not (Path(args.out) / "grid.json").is_file():
        parser.exit(2, f"error: {args.out} holds no grid.json (not a grid output folder)\n")
    for path in write_report(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
