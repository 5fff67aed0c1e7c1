"""The attack zoo's report: pass rates and ASR distributions per defense over the draws of a grid.

A draw *bites* when its undefended cell reaches ASR >= ``BITES``; a defended cell of a biting draw
*passes* when its ASR <= ``PASS_ASR`` and its ACC drop against the undefended cell of the same draw
<= ``PASS_DROP``. Draws that do not bite are counted apart, never as passes. Where the grid holds a
draw's attack-free cell (threat ``clean``), the draw's *natural* ASR is that cell's ASR, and a biting draw
is *reachable* when its natural ASR <= ``PASS_ASR`` (a defense that leaves a model as good as a clean one
can pass it); the pass criterion itself stays the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

BITES, PASS_ASR, PASS_DROP = 50.0, 10.0, 3.0
DEFENSE_AXIS = "defense"


def draw_id(label: str) -> str:
    """``dev019-blend-fm`` -> ``dev019``: what a draw's threats have in common."""
    return label.split("-", 1)[0]


def zoo_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The finished attacked cells with ``threat``, ``family``, ``undefended_asr``, ``natural_asr`` (NaN
    without the draw's clean cell), ``bites``, ``reachable`` and ``passes``."""
    done = cells[cells["status"] == "done"].copy()
    if done.empty:
        return done
    attack = done["cfg.attack.name"]
    done["threat"] = attack.map(lambda name: "clean" if name == "none" else "fm" if name == "fm" else "classic")
    done["natural_asr"] = float("nan")
    if "zoo" in done:
        clean = done[(done["threat"] == "clean") & (done["defense_name"] == "none")]
        natural = dict(zip(zip(clean["cfg.data.dataset"], clean["zoo"].map(draw_id)), clean["asr"]))
        done["natural_asr"] = [natural.get((d, draw_id(z)), float("nan"))
                               for d, z in zip(done["cfg.data.dataset"], done["zoo"])]
    done = done[done["threat"] != "clean"]
    done["family"] = done["cfg.backdoor.trigger.kind"]
    done["dataset"] = done["cfg.data.dataset"]
    if DEFENSE_AXIS not in done:
        done[DEFENSE_AXIS] = done["defense_name"]
    asr = cells.set_index("key")["asr"]
    done["undefended_asr"] = done["undefended_key"].map(asr)
    done["bites"] = done["undefended_asr"] >= BITES
    done["reachable"] = done["bites"] & (done["natural_asr"] <= PASS_ASR)
    done["passes"] = done["bites"] & (done["asr"] <= PASS_ASR) & (done["acc_drop_vs_undefended"] <= PASS_DROP)
    return done


def _summary(frame: pd.DataFrame, natural: bool) -> pd.Series:
    """One row of a pass-rate table; with ``natural`` (the grid holds clean cells), also how many biting
    draws have a measured natural ASR, how many of them are reachable, and the pass rate over those."""
    biting = frame[frame["bites"]]
    reachable = {}
    if natural:
        ok = biting[biting["reachable"]]
        reachable = {"natural ASR measured": int(biting["natural_asr"].notna().sum()), "reachable": len(ok),
                     "pass rate, reachable (%)": round(100 * ok["passes"].mean(), 1) if len(ok) else float("nan")}
    return pd.Series({
        "draws": len(frame),
        "bite": len(biting),
        "pass rate (%)": round(100 * biting["passes"].mean(), 1) if len(biting) else float("nan"),
        **reachable,
        "median ASR": round(biting["asr"].median(), 2) if len(biting) else float("nan"),
        "p90 ASR": round(biting["asr"].quantile(0.9), 2) if len(biting) else float("nan"),
        "median ACC drop": round(biting["acc_drop_vs_undefended"].median(), 2) if len(biting) else float("nan"),
        "no bite: median ASR": round(frame.loc[~frame["bites"], "asr"].median(), 2) if (~frame["bites"]).any()
        else float("nan"),
    })


def zoo_tables(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Pass-rate tables per defense: by threat, by threat x dataset, by threat x family; and which
    draws bite undefended, per family."""
    done = zoo_cells(cells)
    if done.empty:
        return {}
    order = list(dict.fromkeys(done[DEFENSE_AXIS]))
    natural = bool(done["natural_asr"].notna().any())

    def by(keys: list[str]) -> pd.DataFrame:
        table = done.groupby([DEFENSE_AXIS] + keys, sort=False).apply(
            _summary, natural=natural, include_groups=False).reset_index()
        table[DEFENSE_AXIS] = pd.Categorical(table[DEFENSE_AXIS], order, ordered=True)
        counts = {c: int for c in ("draws", "bite", "natural ASR measured", "reachable") if c in table}
        return table.sort_values([DEFENSE_AXIS] + keys).astype(counts)

    undefended = done[done["defense_name"] == "none"]
    bite = undefended.groupby(["threat", "dataset", "family"]).agg(
        draws=("asr", "size"), bite=("bites", "sum"), median_asr=("asr", "median"), min_asr=("asr", "min"),
        max_asr=("asr", "max")).round(2).reset_index()
    caption = (f"pass = ASR <= {PASS_ASR:g} and ACC drop <= {PASS_DROP:g} against the undefended cell of the "
               f"same draw, over the draws that bite (undefended ASR >= {BITES:g})")
    return {f"Zoo: pass rate per threat ({caption})": by(["threat"]),
            "Zoo: pass rate per threat and dataset": by(["threat", "dataset"]),
            "Zoo: pass rate per threat and trigger family": by(["threat", "family"]),
            "Zoo: which draws bite undefended (ASR >= 50), per family": bite,
            "Zoo: every undefended draw, its parameters and its ASR": draw_table(undefended)}


def draw_table(undefended: pd.DataFrame) -> pd.DataFrame:
    """One row per undefended draw: what was drawn (trigger, backdoor, attack) and what it reached."""
    columns = {"zoo": "draw", "dataset": "dataset", "cfg.backdoor.trigger.params": "trigger parameters",
               "cfg.backdoor.target": "target", "cfg.backdoor.mapping": "mapping",
               "cfg.attack.params": "attack parameters", "acc": "ACC", "asr": "ASR", "bites": "bites",
               "natural_asr": "natural ASR"}
    present = {k: v for k, v in columns.items() if k in undefended and undefended[k].notna().any()}
    table = undefended[list(present)].rename(columns=present)
    for name in ("trigger parameters", "attack parameters"):
        if name in table:
            table[name] = table[name].map(_params_text)
    return table.round({"ACC": 2, "ASR": 2, "natural ASR": 2}).sort_values([c for c in ("dataset", "draw") if c in table])


def _params_text(params) -> str:
    """``{'size': 3, 'position': 'random'}`` (or its JSON text) -> ``size=3, position=random`` (lists
    joined with /)."""
    if isinstance(params, str) and params.startswith("{"):
        params = json.loads(params)
    if not isinstance(params, dict):
        return str(params)
    text = (f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in params.items())
    return ", ".join(text)


def cdf_plot(cells: pd.DataFrame, path: Path, colours: dict[str, object] | None = None) -> Path | None:
    """Empirical CDF of ASR over the biting draws, one line per defense, one panel per threat."""
    import matplotlib.pyplot as plt

    done = zoo_cells(cells)
    done = done[done["bites"]] if not done.empty else done
    if done.empty:
        return None
    threats = [t for t in ("fm", "classic") if (done["threat"] == t).any()]
    defenses = list(dict.fromkeys(done[DEFENSE_AXIS]))
    from benchmarks.plots import colours as palette

    colours = colours or palette(defenses)
    fig, axs = plt.subplots(1, len(threats), figsize=(5 * len(threats), 4), sharey=True, squeeze=False)
    for ax, threat in zip(axs[0], threats):
        part = done[done["threat"] == threat]
        for name in defenses:
            asr = part.loc[part[DEFENSE_AXIS] == name, "asr"].sort_values()
            if asr.empty:
                continue
            share = [100 * (i + 1) / len(asr) for i in range(len(asr))]
            ax.step([0, *asr], [0, *share], where="post", color=colours[name], label=f"{name} ({len(asr)})")
        ax.axvline(PASS_ASR, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{'compromised FM' if threat == 'fm' else 'classic (malicious clients)'}", fontsize=10)
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("ASR (%)")
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel("draws with ASR <= x (%)")
    handles, labels = axs[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle("ASR over the zoo's biting draws (further up-left is better; dashed: the pass line)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
