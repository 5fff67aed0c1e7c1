"""The side-by-side summary matches cells by attack and defense and computes ratios from the files."""
import json

from dev.side_by_side_summary import main


def _cell(folder, attack, defense, acc, asr, fusion=(2.0, 4.0), params=None):
    folder.mkdir(parents=True)
    rounds = [{"round": 0, "acc": 10.0}] + [{"round": i + 1, "fusion_seconds": s} for i, s in enumerate(fusion)]
    config = {"attack": {"name": attack, "params": {}}, "defense": {"name": defense, "params": params or {}}}
    (folder / "record.json").write_text(json.dumps({"config": config, "rounds": rounds,
                                                    "metrics": {"acc": acc, "asr": asr, "ra": 0.0}}))


def test_summary_ratios_and_metric_differences(tmp_path):
    for grid in ("grid", "defense"):
        _cell(tmp_path / f"{grid}_ref/cells/a", "fm", "none", 60.0, 80.0)
        _cell(tmp_path / f"{grid}_ref/cells/b", "fm", "krum", 55.0, 70.0, params={"multi": -1})
        _cell(tmp_path / f"{grid}_new/cells/c", "fm", "none", 60.0, 80.5)
        _cell(tmp_path / f"{grid}_new/cells/d", "fm", "krum", 55.0, 70.0, params={"multi": -1})
        _cell(tmp_path / f"{grid}_new/cells/e", "fm", "krum", 50.0, 10.0)  # plain Krum: not in REF
        (tmp_path / f"{grid}_ref.seconds").write_text("300")
        (tmp_path / f"{grid}_new.seconds").write_text("200")
    _cell(tmp_path / "fusion_ref", "none", "none", 0, 0, fusion=(9.0, 11.0))
    _cell(tmp_path / "fusion_new2", "none", "none", 0, 0, fusion=(2.0, 3.0))
    _cell(tmp_path / "fusion_new1", "none", "none", 0, 0, fusion=(4.0, 6.0))
    _cell(tmp_path / "fm_ref_threads1", "fm", "none", 60.0, 80.0)
    for name, s in (("cell_quiet", 100), ("cell_busy", 110), ("cell_busy_threads2", 250)):
        (tmp_path / f"{name}.seconds").write_text(str(s))
    summary = main(tmp_path, "abc")
    assert summary["fusion_seconds_per_round"] == {"fusion_ref": 10.0, "fusion_new2": 2.5, "fusion_new1": 5.0}
    grid = summary["default_grid"]
    assert grid["ratio"] == 1.5 and grid["cells"] == 2
    assert grid["max_metric_difference"] == {"fm/multikrum": 0.0, "fm/none": 0.5}
    assert summary["cell_seconds"]["cell_busy"] == 110
    assert summary["fm_cell_at_one_thread"]["new"]["asr"] == 80.5
    assert "4.00x" in (tmp_path / "summary.md").read_text()  # fusion 10 s against 2.5 s
