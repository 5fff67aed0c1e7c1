import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_OVERRIDES

import attacks
from benchmarks import grid as grid_mod
from benchmarks import gridspec
from benchmarks.cli import estimate_seconds
from benchmarks.grid import cell_status, main
from benchmarks.gridspec import GridSpec, expand, load_grid
from benchmarks.report import paper_tables, summary_table, write_report
from fl_core.configfile import deep_merge
from fl_core.hooks import Attack
from fl_core.schema import ConfigError


def _spec(tiny_root, tmp_path, axes, **extra) -> GridSpec:
    base = deep_merge(TINY_OVERRIDES, {"fl": {"rounds": 1}, "runtime": {
        "data_root": str(tiny_root), "cache_dir": str(tmp_path / "cache"), "progress": False}})
    return GridSpec("t", base=base, scales={"cpu": {}}, axes=axes, **extra)


def _write(tmp_path, spec: GridSpec) -> Path:
    path = tmp_path / f"{spec.name}.yaml"
    path.write_text(yaml.safe_dump({"base": spec.base, "scales": spec.scales, "axes": spec.axes,
                                    "exclude": spec.exclude, "include": spec.include}))
    return path


def test_expansion_exclude_include_labels_and_filters(tiny_root, tmp_path):
    spec = _spec(tiny_root, tmp_path, {
        "attack": [{"name": "none"}, {"name": "fm", "params": {"stages": "fusion"}}],
        "defense.name": ["none"],
        "seed": [0, 1],
    }, exclude=[{"attack": "none", "seed": 1}], include=[{"attack": {"name": "badnets"}, "seed": 5}])
    cells = expand(spec)
    labels = [c.labels for c in cells]
    assert len(cells) == 4
    assert {"attack": "fm(stages=fusion)", "defense.name": "none", "seed": "1"} in labels
    assert {"attack": "badnets", "seed": "5"} in labels
    assert len({c.key for c in cells}) == 4
    assert [c.labels["seed"] for c in expand(spec, only=("attack=fm(stages=fusion)",))] == ["0", "1"]
    assert len(expand(spec, only=("attack=fm(stages=fusion)|badnets", "seed=1|5"))) == 2
    with pytest.raises(ConfigError, match="matches no cell; axis values: .*attack=none"):
        expand(spec, only=("attack=nope",))
    with pytest.raises(ConfigError, match="'seed=5' matches no cell; axis values: .*seed=1"):
        expand(spec, only=("attack=fm(stages=fusion)", "seed=5"))  # seed 5 exists, but not with fm


def test_filters_apply_before_validation(tiny_root, tmp_path):
    """A dataset that is not on this machine does not stop the cells that do not use it."""
    spec = _spec(tiny_root, tmp_path, {"data.dataset": ["tiny", "not-here"], "seed": [0]})
    with pytest.raises(ConfigError, match="not-here"):
        expand(spec)
    assert [c.labels["data.dataset"] for c in expand(spec, only=("dataset=tiny",))] == ["tiny"]


def test_invalid_cells_fail_before_compute_naming_the_cell(tiny_root, tmp_path):
    spec = _spec(tiny_root, tmp_path, {"fl.rounds": [1, 0]})
    with pytest.raises(ConfigError, match=r"grid cell \{'fl.rounds': '0'\}: config.fl.rounds: Input should be greater than or equal to 1"):
        expand(spec)
    with pytest.raises(ConfigError, match="has no scale 'paper'; valid: cpu"):
        expand(_spec(tiny_root, tmp_path, {"seed": [0]}), scale="paper")
    with pytest.raises(SystemExit):
        main(["--preset", "no-such-preset"])


def test_presets_expand_at_both_scales():
    """Every preset at every scale; the development grids (``dev/``) at their cpu scale."""
    assert len(gridspec.presets()) <= 14  # the user's list stays short: selections go to dev/
    for folder, scales in ((gridspec.GRID_DIR, None), (gridspec.DEV_GRID_DIR, ["cpu"])):
        for name in gridspec.presets(folder):
            spec = load_grid(folder / f"{name}.yaml")
            for scale in scales or spec.scales:
                assert expand(spec, scale), (name, scale)


@attacks.ATTACKS.register("test-explodes")
class Explodes(Attack):
    def poison_synthetic(self, synthetic, stage, seed):
        raise RuntimeError("boom")


def test_resume_failed_capture_and_interrupt(tiny_root, tmp_path, monkeypatch):
    spec = _spec(tiny_root, tmp_path, {"attack.name": ["none", "fm", "test-explodes"]})
    path, out = _write(tmp_path, spec), tmp_path / "out"
    assert main(["--config", str(path), "--out", str(out), "--no-report", "--jobs", "1"]) == 1  # one failed cell
    cells = expand(load_grid(path), overrides=("runtime.progress=false",))
    status = {c.labels["attack.name"]: cell_status(out, c.key) for c in cells}
    assert status == {"none": "done", "fm": "done", "test-explodes": "failed"}
    failed = json.loads((out / "cells" / cells[2].key / "status.json").read_text())
    assert "RuntimeError: boom" in failed["error"] and "Traceback" in failed["traceback"]

    # only missing cells rerun: remove one record, interrupt on the next cell, resume
    (out / "cells" / cells[1].key / "record.json").unlink()
    first_record = (out / "cells" / cells[0].key / "record.json").stat().st_mtime_ns
    ran = []
    real = grid_mod.execute_cell

    def interrupting(cfg, out_dir, plugins=()):
        ran.append(cfg["attack"]["name"])
        if cfg["attack"]["name"] == "test-explodes":
            raise KeyboardInterrupt
        return real(cfg, out_dir, plugins)

    monkeypatch.setattr(grid_mod, "execute_cell", interrupting)
    assert main(["--config", str(path), "--out", str(out), "--no-report", "--jobs", "1"]) == 130
    assert ran == ["fm", "test-explodes"]
    assert cell_status(out, cells[1].key) == "done"
    assert (out / "cells" / cells[0].key / "record.json").stat().st_mtime_ns == first_record

    # a record or status cut short by a crash counts as missing (recomputed), never as done
    record = out / "cells" / cells[0].key / "record.json"
    record.write_text(record.read_text()[:40])
    (out / "cells" / cells[2].key / "status.json").write_text('{"status": "fai')
    assert cell_status(out, cells[0].key) == "pending" and cell_status(out, cells[2].key) == "pending"
    from benchmarks.results import load_results

    table = load_results(out)[0].set_index("key")["status"]
    assert table[cells[0].key] == "pending" and table[cells[1].key] == "done"


def test_not_applicable_cells_are_recorded(tiny_root, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "docs" / "examples"))
    spec = _spec(tiny_root, tmp_path, {"defense.name": ["clip-example"]})
    spec.base["model"] = {"prototypes": [{"name": "cnn", "width": 0.25}, {"name": "cnn", "width": 0.5}]}
    out = tmp_path / "out"
    assert main(["--config", str(_write(tmp_path, spec)), "--out", str(out), "--plugin", "clip_defense", "--jobs", "1"]) == 0
    table = (out / "tables.md").read_text()
    assert "n/a" in table and "cannot apply to heterogeneous prototypes" in table


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_parallel_executors(tiny_root, tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    spec = _spec(tiny_root, tmp_path, {"attack.name": ["none", "fm"]})
    out = tmp_path / "out"
    assert main(["--config", str(_write(tmp_path, spec)), "--out", str(out), "--executor", executor,
                 "--jobs", "2", "--no-report"]) == 0
    assert sum((p / "record.json").is_file() for p in (out / "cells").iterdir()) == 2
    if executor == "ray":
        import ray

        ray.shutdown()


def test_report_tables_from_fixture_rows():
    cells = pd.DataFrame([
        {"attack": a, "defense": d, "seed": s, "status": "done", "acc": acc, "asr": asr, "ra": 0.0,
         "acc_drop_vs_clean": 0.0, "acc_drop_vs_undefended": drop, "defense_name": d,
         "detection_tpr": 100.0 - 50 * s if d == "krum" and a == "fm" else float("nan"),
         "detection_fpr": 10.0 if d == "krum" else float("nan"), "flag_recall": float("nan"),
         "flag_precision": float("nan")}
        for a, d, s, acc, asr, drop in [
            ("none", "none", 0, 70, 5, 0), ("none", "none", 1, 72, 7, 0),
            ("fm", "none", 0, 69, 90, 0), ("fm", "none", 1, 71, 94, 0),
            ("fm", "krum", 0, 60, 80, 9), ("fm", "krum", 1, 62, 84, 9),
            ("none", "krum", 0, 65, 5, 5), ("none", "krum", 1, 67, 7, 5),
            ("fm", "multikrum", 0, 61, 81, 8),  # run against one attack only
        ]])
    summary = summary_table(cells, ["attack", "defense", "seed"])
    row = summary[(summary["attack"] == "fm") & (summary["defense"] == "none")].iloc[0]
    assert row["acc"] == "70.00 ± 1.41" and row["asr"] == "92.00 ± 2.83" and row["seeds"] == 2
    tables = paper_tables(cells, ["attack", "defense", "seed"])
    attack_table = next(t for name, t in tables.items() if name.startswith("Attack"))
    assert attack_table.iloc[0]["fm"] == "70.00 ± 1.41 / 92.00 ± 2.83"
    defense_table = next(t for name, t in tables.items() if name.startswith("Defense")).set_index("defense")
    assert defense_table.loc["krum", "fm"] == "9.00 ± 0.00 / 82.00 ± 2.83"
    assert defense_table.loc["multikrum", "none"] == "-"  # no cell ran: a dash, not nan
    detection = next(t for name, t in tables.items() if name.startswith("Client-level")).set_index("defense")
    assert detection.loc["krum", "fm"] == "75.00 ± 35.36 / 10.00 ± 0.00"
    assert not any(name.startswith("Sample-level") for name in tables)  # no defense flagged samples
    assert "detection_tpr" in summary and "flag_recall" not in summary


def test_smoke_preset_end_to_end(tmp_path):
    from fl_core.data import resolve_data_root

    if not (resolve_data_root() / "cifar10" / "train").is_dir():
        pytest.skip("CIFAR-10 not unpacked under the data root (scripts/setup.sh does it)")
    out = tmp_path / "smoke"
    assert main(["--preset", "smoke", "--out", str(out)]) == 0
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 3 and (cells["status"] == "done").all()
    assert {"acc", "asr", "ra", "acc_drop_vs_clean", "wall_seconds", "git_commit"} <= set(cells.columns)
    assert (out / "rounds.csv").is_file() and (out / "bars.png").is_file() and (out / "tables.md").is_file()
    assert write_report(out)  # regenerates without rerunning


def test_documented_example_defense_runs_through_a_two_round_grid(tiny_root, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "docs" / "examples"))
    spec = _spec(tiny_root, tmp_path, {"defense.name": ["none", "clip-example"]})
    spec.base["fl"]["rounds"] = 2
    out = tmp_path / "out"
    assert main(["--config", str(_write(tmp_path, spec)), "--out", str(out), "--plugin", "clip_defense", "--jobs", "1"]) == 0
    cells = pd.read_csv(out / "cells.csv")
    assert (cells["status"] == "done").all() and len(cells) == 2
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds.groupby("defense.name")["round"].max().to_dict() == {"clip-example": 2, "none": 2}


def test_only_subsets_accumulate_in_one_folder_with_their_commands(tiny_root, tmp_path):
    spec = _spec(tiny_root, tmp_path, {"attack.name": ["none", "fm"]})
    path, out = _write(tmp_path, spec), tmp_path / "out"
    for name in ("none", "fm", "none"):  # the repeated command is listed once
        assert main(["--config", str(path), "--out", str(out), "--only", f"attack.name={name}", "--no-report"]) == 0
    assert main(["--config", str(path), "--out", str(out), "--only", "attack.name=none|fm", "--no-report"]) == 0
    manifest = json.loads((out / "grid.json").read_text())
    assert sorted(c["labels"]["attack.name"] for c in manifest["cells"]) == ["fm", "none"]
    only = [shlex.split(c)[-2] for c in manifest["commands"]]  # recorded as a shell would read them back
    assert only == ["attack.name=fm", "attack.name=none", "attack.name=none|fm"]
    write_report(out)
    tables = (out / "tables.md").read_text()
    assert "Commands (" in tables and tables.count("attack.name=") >= 2
    assert len(pd.read_csv(out / "cells.csv")) == 2


def test_an_unwritable_output_folder_is_refused_before_compute(tmp_path, capsys):
    from benchmarks import run as run_mod

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for tool, argv in ((main, ["--preset", "smoke", "--out", str(blocker / "out")]),
                       (run_mod.main, ["--out", str(blocker)])):
        with pytest.raises(SystemExit) as err:
            tool(argv)
        assert err.value.code == 2
        assert "not writable" in capsys.readouterr().err


def test_parallel_schedule_puts_one_cell_of_each_stage_group_first():
    cells = expand(load_grid(gridspec.GRID_DIR / "default.yaml"), "cpu")
    assert grid_mod.schedule(cells, 1) == cells
    order = grid_mod.schedule(cells, 2)
    assert sorted(c.key for c in order) == sorted(c.key for c in cells)
    groups = [grid_mod.stage_group(c.config) for c in order]
    distinct = len(set(groups))
    assert distinct == 4  # attack-free (FedDF and FedAvg share pre-training and round 1), BadNets, FM, replacement
    assert len(set(groups[:distinct])) == distinct  # every group's first cell before any group's second
    rest = [estimate_seconds(c.config) for c in order[distinct:]]
    assert rest == sorted(rest, reverse=True)


def test_pretrained_table_takes_round_0_once_per_seed_across_defenses():
    from benchmarks.report import pretrained_table

    rows = [{"attack": a, "defense": d, "seed": s, "round": r, "acc": 40.0 + s + 10 * r + (a == "fm"), "asr": 5.0 + 80 * (a == "fm")}
            for a in ("none", "fm") for d in ("none", "krum") for s in (0, 2) for r in (0, 1)]
    table = pretrained_table(pd.DataFrame(rows), ["attack", "defense", "seed"]).set_index("attack")
    assert table.loc["none", "acc"] == "41.00 ± 1.41" and table.loc["fm", "acc"] == "42.00 ± 1.41"
    assert table.loc["fm", "asr"] == "85.00 ± 0.00" and table["seeds"].tolist() == [2, 2]
    assert pretrained_table(pd.DataFrame(rows)[lambda f: f["round"] == 1], ["attack", "seed"]).empty
    single = pd.DataFrame(rows)[lambda f: (f["attack"] == "none") & (f["defense"] == "none") & (f["seed"] == 0)]
    assert pretrained_table(single.drop(columns=["attack", "defense", "seed"]), [])["seeds"].tolist() == [1]


def test_a_filtered_command_keeps_earlier_cells_the_preset_relabelled(tiny_root, tmp_path):
    """A preset that pins an old default under a new label and adds the new default under the old label:
    a command filtered to the new cells must keep (and relabel) the old ones, not drop them."""
    out, pinned = tmp_path / "out", {"name": "fm", "params": {"poison_rate": 0.5}}
    before = _spec(tiny_root, tmp_path, {"attack": [{"label": "fm", **pinned}, {"name": "none"}]})
    after = _spec(tiny_root, tmp_path, {"attack": [{"label": "fm-old", **pinned}, {"name": "fm"}, {"name": "none"}]})
    old, new = expand(before, only=("attack=fm",))[0], expand(after, only=("attack=fm",))[0]
    assert new.labels == old.labels and new.key != old.key
    for spec in (before, after):
        assert main(["--config", str(_write(tmp_path, spec)), "--out", str(out), "--only", "attack=fm", "--no-report"]) == 0
    labels = {c["key"]: c["labels"]["attack"] for c in json.loads((out / "grid.json").read_text())["cells"]}
    assert labels == {old.key: "fm-old", new.key: "fm"}


def test_plot_panels_survive_cells_that_lack_a_later_axis():
    from benchmarks.plots import panels

    frame = pd.DataFrame({"attack": ["fm", "fm"], "trigger": ["patch", float("nan")]})
    assert [title for title, _ in panels(frame, ["attack", "trigger"])] == ["fm | patch", "fm | -"]
