"""The report's summary, plots, LaTeX and the leaderboard, on grid folders written here (no training)."""
import json
import shutil
import subprocess

import pytest
from PIL import Image

from benchmarks.plots import DPI, PANEL_SIZE
from benchmarks.report import cost_table, headline, main, write_report
from benchmarks.results import load_results
from fl_core.schema import CellConfig, from_dict


def fake_grid(folder, attacks, defenses, seeds, rounds=3, name="fake", dataset="cifar10"):
    """A grid folder of finished cells whose ASR falls with the defense's index and whose ACC drops a little."""
    cells = []
    for a, attack in enumerate(attacks):
        for d, defense in enumerate(defenses):
            for seed in seeds:
                config = CellConfig().to_dict(with_runtime=False)
                config["attack"] = {"name": attack, "params": {}}
                config["defense"] = {"name": defense, "params": {}}
                config["data"]["dataset"] = dataset
                config["seed"] = seed
                key = from_dict(CellConfig, config).key()
                asr = 5.0 if attack == "none" else max(2.0, 90.0 - 9 * d) + seed
                acc = 60.0 - 0.5 * d + 0.1 * seed
                curve = [{"round": r, "acc": acc - (rounds - r), "asr": asr * r / rounds, "ra": 100 - asr}
                         for r in range(rounds + 1)]
                record = {"key": key, "config": config, "metrics": {"acc": acc, "asr": asr, "ra": 100 - asr},
                          "rounds": curve, "wall_seconds": 1.0, "defense_seconds": 0.1,
                          "versions": {"torch": "x", "lightning": "x", "git_commit": "x"}}
                (folder / "cells" / key).mkdir(parents=True)
                (folder / "cells" / key / "record.json").write_text(json.dumps(record))
                cells.append({"key": key, "labels": {"attack": attack, "defense.name": defense, "seed": str(seed)},
                              "config": config})
    manifest = {"grid": name, "scale": "cpu", "description": "A grid with 50% under_scores & odd ~ text",
                "axes": ["attack", "defense.name", "seed"], "cells": cells, "commands": ["python -m x"]}
    (folder / "grid.json").write_text(json.dumps(manifest))
    return folder


DEFENSES = ["none", "normclip", "krum", "median", "flame", "bulyan", "rlr", "actbound", "actaudit", "my_def"]


@pytest.fixture(scope="module")
def big_grid(tmp_path_factory):
    """200 cells: 4 attacks x 10 defenses x 5 seeds, reported once."""
    folder = fake_grid(tmp_path_factory.mktemp("big"), ["none", "badnets", "fm", "fm_blend"], DEFENSES, range(5))
    write_report(folder)
    return folder


def test_a_200_cell_grid_gives_plots_of_bounded_size(big_grid):
    for name in ("bars.png", "curves.png", "tradeoff.png"):
        width, height = Image.open(big_grid / name).size
        assert width <= 2600 and height <= 2000, (name, width, height)


def test_tables_md_opens_with_a_short_summary(big_grid):
    text = (big_grid / "tables.md").read_text()
    summary = [line for line in text.split("## In short")[1].split("\n## ")[0].splitlines() if line.startswith("- ")]
    assert 1 <= len(summary) <= 5
    assert summary[0].startswith("- **badnets**: undefended ACC 60.2 / ASR 92.0")
    assert "actbound" in summary[0] and "actaudit" in summary[0] and "_all" not in text


def test_headline_skips_attacks_that_do_not_bite(tmp_path):
    folder = fake_grid(tmp_path, ["none"], ["none", "krum"], [0])
    cells, _, grid = load_results(folder)
    assert headline(cells, grid["axes"]) == ["- No attack reaches 20 % ASR undefended in the finished cells."]


def test_tables_tex_is_escaped_and_compiles(big_grid, tmp_path):
    tex = (big_grid / "tables.tex").read_text()
    assert "±" not in tex and r"\toprule" in tex and r"\caption{" in tex and r"\label{tab:fake-" in tex
    assert r"my\_def" in tex and "my_def" not in tex.replace(r"my\_def", "")
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex here (scripts/setup.sh installs it)")
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
                   "\\begin{document}\n\\input{" + str(big_grid / "tables.tex") + "}\n\\end{document}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]


def test_leaderboard_pools_grids_per_threat(tmp_path, capsys):
    fake_grid(tmp_path / "one", ["none", "fm", "badnets"], ["none", "krum", "actbound"], [0, 1], name="one")
    fake_grid(tmp_path / "two", ["none", "fm"], ["none", "actbound"], [0], name="two", dataset="fashion_mnist")
    assert main(["--leaderboard", str(tmp_path)]) == 0
    board = (tmp_path / "LEADERBOARD.md").read_text()
    fm = board.split("## compromised FM")[1].split("## classic")[0]
    assert "| actbound  |       3 |" in fm and "| krum      |       2 |" in fm and "| none" not in fm
    assert "badnets: median ASR" in board.split("## classic")[1]
    with pytest.raises(SystemExit):
        main(["--leaderboard", str(tmp_path / "one" / "cells")])


def test_many_settings_wrap_into_rows_of_at_most_six_panels(tmp_path):
    folder = fake_grid(tmp_path, ["none"] + [f"fm{i}" for i in range(19)], DEFENSES, [0], rounds=2)
    write_report(folder)  # 200 cells in 20 settings: 4 rows of panels
    for name in ("bars.png", "curves.png", "tradeoff.png"):
        width, height = Image.open(folder / name).size
        assert width <= 2600 and height <= 2600, (name, width, height)
    assert Image.open(folder / "tradeoff.png").size[1] >= 3.5 * PANEL_SIZE[1] * DPI  # wrapped, not one strip


def test_cost_table_sets_defense_time_against_local_training(tmp_path):
    folder = fake_grid(tmp_path, ["fm"], ["none", "slow", "cheap"], [0], rounds=2)
    timings = {"none": [(0.0, 10.0), (0.0, 10.0)], "slow": [(15.0, 0.0), (1.0, 10.0)],  # round 1 cached: 0 s local
               "cheap": [(2.0, 10.0), (0.0, 10.0)]}
    for record_file in folder.glob("cells/*/record.json"):
        record = json.loads(record_file.read_text())
        for r, (defense_s, local_s) in zip(record["rounds"][1:], timings[record["config"]["defense"]["name"]]):
            r.update(defense_seconds=defense_s, local_seconds=local_s)
        record_file.write_text(json.dumps(record))
    cells, rounds, grid = load_results(folder)
    table = cost_table(cells, rounds, grid["axes"]).set_index("defense.name")
    assert "none" not in table.index
    assert table.loc["slow", "busiest round: median"] == "1.50 (max 1.50; 1 above 1)"  # 15 s / the undefended 10 s
    assert table.loc["slow", "all rounds: median"] == "0.80 (max 0.80; 0 above 1)"  # 16 s / 20 s
    assert table.loc["cheap", "busiest round: median"] == "0.20 (max 0.20; 0 above 1)"
    write_report(folder)
    assert "## Defense cost" in (folder / "tables.md").read_text()
