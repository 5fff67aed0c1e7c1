"""Tables and plots from a grid's output folder, without rerunning: ``python -m benchmarks.report DIR``.

Writes ``cells.csv`` / ``cells.parquet`` (one row per cell: axes, every parameter, ACC, ASR, RA, ACC
drops, timings, versions), ``rounds.csv`` (per-round curves), ``tables.md`` and ``tables.tex``
(mean +- std over seeds; the paper layouts: attack table ACC/ASR per attack, defense table
ACC drop / ASR per defense x attack) and PNG plots (``benchmarks/plots.py``: bars, curves against
rounds, ACC-ASR trade-off; for a zoo grid the ASR CDF instead).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from benchmarks.plots import write_plots
from benchmarks.results import DETECTION, load_results, recorded_commands
from benchmarks.zoo_report import cdf_plot, zoo_tables


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
    if not group:  # one row over every cell, no grouping column
        return pd.DataFrame([{**{c: _mean_std(done[c]) for c in cols}, "seeds": len(done)}])
    table = done.groupby(group, sort=False).agg({c: _mean_std for c in cols})
    table["seeds"] = done.groupby(group, sort=False).size()
    return table.reset_index()


SUITE_DEFENSES = ("actbound", "actaudit")  # the paper's defense and the suite's default, named in every summary
BITES = 20.0  # undefended ASR (%) from which an attack counts as biting in the summary


def headline(cells: pd.DataFrame, axes: list[str], limit: int = 5) -> list[str]:
    """At most ``limit`` lines of what a grid shows: per attack that bites undefended (and per value of
    the other axes), the undefended ACC / ASR, the defense with the lowest ASR among those within 3 ACC
    points, and the paper's and the suite's defenses."""
    attack, defense = _role(axes, "attack"), _role(axes, "defense")
    done = cells[cells["status"] == "done"]
    if attack is None or defense is None or done.empty:
        return []
    others = [a for a in axes if a not in (attack, defense, "seed")]
    lines = []
    for values, group in done.groupby(others + [attack], sort=False):
        means = group.groupby(defense, sort=False).agg(
            acc=("acc", "mean"), asr=("asr", "mean"), drop=("acc_drop_vs_undefended", "mean"),
            name=("defense_name", "first"))
        undefended = means[means["name"] == "none"]
        if undefended.empty or undefended["asr"].iloc[0] < BITES:
            continue
        parts = [f"undefended ACC {undefended['acc'].iloc[0]:.1f} / ASR {undefended['asr'].iloc[0]:.1f}"]
        defended = means[means["name"] != "none"]
        within = defended[defended["drop"] <= 3]
        if not within.empty:
            best = within["asr"].idxmin()
            parts.append(f"lowest ASR at an ACC drop <= 3: {best} {within.loc[best, 'asr']:.1f}")
        parts += [f"{label} {row['asr']:.1f} (ACC drop {row['drop']:.1f})" for label, row in defended.iterrows()
                  if row["name"] in SUITE_DEFENSES]
        where = " | ".join(str(v) for v in (values if isinstance(values, tuple) else (values,)))
        lines.append(f"- **{where}**: " + "; ".join(parts))
    if len(lines) > limit:
        lines = lines[:limit - 1] + [f"- ... {len(lines) - limit + 1} more attack settings in the tables below"]
    return lines or ["- No attack reaches 20 % ASR undefended in the finished cells."]


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
    return table.reset_index().drop(columns=["_all"], errors="ignore")


def cost_table(cells: pd.DataFrame, rounds: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Per defense, its own time against the clients' local training time of the same round, over its
    cells (rounds 1 on): in the round where it works most, and over all rounds (total defense time / total
    local time). Median and maximum over cells, and how many cells exceed 1 (more defense than training).
    A round whose client training came from the stage cache (0 s) is set against the undefended cell's;
    a round with no local time either way is left out."""
    defense = _role(axes, "defense")
    needed = {"round", "defense_seconds", "local_seconds"}
    if defense is None or rounds.empty or not needed <= set(rounds):
        return pd.DataFrame()
    by_key = cells.set_index("key")
    timed = rounds[(rounds["round"] > 0) & rounds["local_seconds"].notna()]
    own = timed.set_index(["key", "round"])["local_seconds"]
    twin = own.reindex(pd.MultiIndex.from_arrays([timed["key"].map(by_key["undefended_key"]), timed["round"]]))
    timed = timed.assign(local=timed["local_seconds"].where(timed["local_seconds"] > 0, twin.to_numpy()))
    timed = timed[(timed["key"].map(by_key["defense_name"]) != "none") & (timed["local"] > 0)]
    if timed.empty:
        return pd.DataFrame()
    per_cell = timed.assign(ratio=timed["defense_seconds"] / timed["local"]).groupby([defense, "key"], sort=False).agg(
        busiest=("ratio", "max"), spent=("defense_seconds", "sum"), local=("local", "sum")).reset_index()
    per_cell["overall"] = per_cell["spent"] / per_cell["local"]

    def describe(values: pd.Series) -> str:
        return f"{values.median():.2f} (max {values.max():.2f}; {int((values > 1).sum())} above 1)"

    table = per_cell.groupby(defense, sort=False).agg(
        cells=("key", "size"), **{"busiest round: median": ("busiest", describe),
                                  "all rounds: median": ("overall", describe)})
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
    return out.fillna("-").reset_index().drop(columns=["_all"], errors="ignore")  # "-": no cell ran there


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
    summary = [] if "zoo" in axes else headline(cells, axes)
    if summary:
        md += ["## In short (mean ASR %, ACC drop against the undefended cell)", "", *summary, ""]
    tex = []
    zoo_axis = "zoo" in axes
    tables = {**(zoo_tables(cells) if zoo_axis else {}), "Summary": summary_table(cells, axes),
              **({} if zoo_axis else paper_tables(cells, axes)),
              "Pre-trained model (round 0; attack-free ACC = classification accuracy score of the synthetic set)":
                  pretrained_table(rounds, axes),
              "Defense cost: the defense's time / the clients' local training time, per round":
                  cost_table(cells, rounds, axes)}
    for title, table in tables.items():
        if table.empty:
            continue
        md += [f"## {title}", "", table.to_markdown(index=False), ""]
        tex += [latex_table(table, title, f"{grid['grid']}-{len(tex) + 1}"), ""]
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
    if zoo_axis:  # a panel per draw says nothing: the CDF over draws does
        written += [p for p in [cdf_plot(cells, out / "zoo_cdf.png")] if p is not None]
    else:
        written += write_plots(cells, rounds, axes, out)
    return written


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX text (the ten special characters escaped, ± and <= as math)."""
    out = "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)
    return out.replace("±", r"$\pm$").replace("<=", r"$\leq$").replace(">=", r"$\geq$")


def latex_table(table: pd.DataFrame, title: str, label: str) -> str:
    """A booktabs ``table`` environment with caption and label; every header and cell escaped."""
    body = table.rename(columns=lambda c: latex_escape(str(c))).map(
        lambda v: latex_escape(v) if isinstance(v, str) else v)
    return body.to_latex(index=False, escape=False, caption=latex_escape(title), label=f"tab:{label}",
                         position="htbp", na_rep="-", float_format="%.2f")


def command_lines(grid: dict) -> list[str]:
    """The command(s) that produced a grid folder, for the report's header."""
    commands = recorded_commands(grid) or [""]
    if len(commands) == 1:
        return [f"Command: `{commands[0]}`"]
    return ["Commands (each ran the cells its filters select; together they produced this folder):",
            *[f"- `{c}`" for c in commands]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("out", help="a grid output folder (holds grid.json); with --leaderboard, a folder of them")
    parser.add_argument("--leaderboard", action="store_true",
                        help="gather every grid folder under OUT into OUT/LEADERBOARD.md and OUT/leaderboard.csv")
    args = parser.parse_args(argv)
    if args.leaderboard:
        from benchmarks.leaderboard import write_leaderboard

        try:
            written = write_leaderboard(args.out)
        except FileNotFoundError as err:
            parser.exit(2, f"error: {err}\n")
    elif not (Path(args.out) / "grid.json").is_file():
        parser.exit(2, f"error: {args.out} holds no grid.json (not a grid output folder)\n")
    else:
        written = write_report(args.out)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
