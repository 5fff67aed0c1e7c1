"""The report's figures as small multiples that read at any grid size: one panel per setting (the
non-defense, non-seed axes), at most ``MAX_COLUMNS`` panels a row and ``MAX_PANELS`` in all, shared axes,
a colour per defense that is the same in every figure of a grid, legends outside the data, mean ± std
over seeds (bars, bands), integer round ticks."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

MAX_COLUMNS = 6
MAX_PANELS = 36
PANEL_SIZE = (2.9, 2.4)  # inches per panel
DPI = 110
ROLES = ("attack", "defense")


def readable(axis: str) -> str:
    """An axis key as a title: ``defense.name`` -> ``defense``, ``data.dataset`` -> ``dataset``."""
    parts = axis.split(".")
    return parts[0] if parts[-1] in ("name", "label") else parts[-1].replace("_", " ")


def layout(cells: pd.DataFrame, axes: list[str]) -> tuple[str, list[str]]:
    """(the axis along a panel's x or legend: the defense, else the attack, else the cell key; the axes
    that make panels)."""
    role = {a.split(".")[0]: a for a in axes}
    series = next((role[r] for r in ("defense", "attack") if r in role), "key")
    return series, [a for a in axes if a not in (series, "seed")]


def colours(names: list[str]) -> dict[str, object]:
    """One colour per name, by its order in the grid (tab10, then tab20 for more)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def panels(frame: pd.DataFrame, panel_axes: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """(title, cells) per setting, in grid order, at most MAX_PANELS."""
    if not panel_axes:
        return [("all cells", frame)]
    groups = frame.groupby([frame[a].fillna("-").astype(str) for a in panel_axes], sort=False)
    return [(" | ".join(key if isinstance(key, tuple) else (key,)), part) for key, part in groups][:MAX_PANELS]


def grid_figure(n: int, rows_per_panel: int = 1, sharex: bool = True):
    """A figure of ``n`` panels (each ``rows_per_panel`` axes tall), wrapped at MAX_COLUMNS."""
    import matplotlib.pyplot as plt

    cols = min(MAX_COLUMNS, n)
    rows = -(-n // cols) * rows_per_panel
    fig, axs = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), squeeze=False,
                            sharex=sharex, sharey="row" if rows_per_panel > 1 else True)
    return fig, axs, cols


def finish(fig, axs, used: list, handles: dict, title: str, path: Path) -> Path:
    """Hide unused panels, put one legend to the right, title, save."""
    import matplotlib.pyplot as plt

    for ax in axs.flat:
        if ax not in used:
            ax.axis("off")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def bars(done: pd.DataFrame, axes: list[str], palette: dict, path: Path) -> Path:
    """Per setting: ASR (coloured by defense) and ACC (grey) per series value, mean ± std over seeds."""
    series, panel_axes = layout(done, axes)
    parts = panels(done, panel_axes)
    fig, axs, cols = grid_figure(len(parts), sharex=False)
    used = []
    for i, (title, part) in enumerate(parts):
        ax = axs[i // cols][i % cols]
        used.append(ax)
        stats = part.groupby(series, sort=False)[["acc", "asr"]].agg(["mean", "std"]).fillna(0)
        x = range(len(stats))
        ax.bar([k - 0.2 for k in x], stats[("acc", "mean")], 0.4, yerr=stats[("acc", "std")], color="0.75",
               label="ACC")
        ax.bar([k + 0.2 for k in x], stats[("asr", "mean")], 0.4, yerr=stats[("asr", "std")],
               color=[palette.get(n, "C1") for n in stats.index])
        ax.set_xticks(list(x), [str(n) for n in stats.index], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=8)
    for row in axs:
        row[0].set_ylabel("%")
    handles = {"ACC (grey); ASR coloured by " + readable(series): axs[0][0].patches[0]} if used else {}
    return finish(fig, axs, used, handles, f"ACC and ASR per {readable(series)}, mean ± std over seeds", path)


def curves(rounds: pd.DataFrame, axes: list[str], palette: dict, path: Path) -> Path | None:
    """Per setting: ASR (top) and ACC (bottom) against the round, one line per series value, mean ± std band."""
    from matplotlib.ticker import MaxNLocator

    if rounds.empty or "round" not in rounds:
        return None
    series, panel_axes = layout(rounds, axes)
    parts = panels(rounds, panel_axes)
    fig, axs, cols = grid_figure(len(parts), rows_per_panel=2)
    used, handles = [], {}
    for i, (title, part) in enumerate(parts):
        for m, metric in enumerate(("asr", "acc")):
            ax = axs[2 * (i // cols) + m][i % cols]
            used.append(ax)
            stats = part.groupby([series, "round"], sort=False)[metric].agg(["mean", "std"]).fillna(0)
            for name, line in stats.groupby(level=0, sort=False):
                r = line.index.get_level_values(1)
                (h,) = ax.plot(r, line["mean"], marker="o", ms=3, color=palette.get(name), label=str(name))
                ax.fill_between(r, line["mean"] - line["std"], line["mean"] + line["std"], color=palette.get(name),
                                alpha=0.15, linewidth=0)
                handles.setdefault(str(name), h)
            ax.set_ylim(0, 100)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"{metric.upper()} (%)", fontsize=8)
            if m == 0:
                ax.set_title(title, fontsize=8)
            else:
                ax.set_xlabel("round", fontsize=8)
    return finish(fig, axs, used, handles, f"ASR and ACC per round by {readable(series)} (bands: ± std over seeds)",
                  path)


def tradeoff(done: pd.DataFrame, axes: list[str], palette: dict, path: Path) -> Path:
    """Per setting: ACC against ASR, one marker per series value, mean ± std over seeds; shared axes."""
    series, panel_axes = layout(done, axes)
    parts = panels(done, panel_axes)
    fig, axs, cols = grid_figure(len(parts))
    used, handles = [], {}
    for i, (title, part) in enumerate(parts):
        ax = axs[i // cols][i % cols]
        used.append(ax)
        stats = part.groupby(series, sort=False)[["acc", "asr"]].agg(["mean", "std"]).fillna(0)
        for name, row in stats.iterrows():
            h = ax.errorbar(row[("asr", "mean")], row[("acc", "mean")], xerr=row[("asr", "std")],
                            yerr=row[("acc", "std")], marker="o", ms=5, capsize=2, linestyle="none",
                            color=palette.get(name), label=str(name))
            handles.setdefault(str(name), h)
        ax.set_xlim(-3, 103)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("ASR (%)", fontsize=8)
    for row in axs:
        row[0].set_ylabel("ACC (%)", fontsize=8)
    return finish(fig, axs, used, handles, f"ACC against ASR per {readable(series)} (upper left is better)", path)


def write_plots(cells: pd.DataFrame, rounds: pd.DataFrame, axes: list[str], out: Path) -> list[Path]:
    """bars.png, curves.png and tradeoff.png of a grid folder, with one palette for all three."""
    import matplotlib

    matplotlib.use("Agg")
    done = cells[cells["status"] == "done"]
    if done.empty:
        return []
    series, _ = layout(done, axes)
    palette = colours(list(dict.fromkeys(done[series].astype(str) if series in done else [])))
    done = done.assign(**{series: done[series].astype(str)}) if series in done else done
    if not rounds.empty and series in rounds:
        rounds = rounds.assign(**{series: rounds[series].astype(str)})
    paths = [bars(done, axes, palette, out / "bars.png"), curves(rounds, axes, palette, out / "curves.png"),
             tradeoff(done, axes, palette, out / "tradeoff.png")]
    return [p for p in paths if p is not None]
