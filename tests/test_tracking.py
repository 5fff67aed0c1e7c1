"""Per-round metrics through Lightning's loggers (runtime.logger)."""
import csv

import pytest

from fl_core import run_cell
from fl_core.config import load_config
from fl_core.schema import ConfigError
from fl_core.tracking import missing_module


def test_a_cell_writes_its_rounds_through_the_csv_logger(tiny_config, tmp_path):
    cfg = tiny_config({"fl": {"rounds": 2}, "attack": {"name": "fm"}})
    record = run_cell(cfg, out_dir=tmp_path / "cell", log=lambda *_: None)
    with open(tmp_path / "cell" / "logs" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["acc"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert [float(r["asr"]) for r in rows] == pytest.approx([r["asr"] for r in record["rounds"]])
    assert (tmp_path / "cell" / "logs" / "hparams.yaml").read_text().count("attack.name: fm") == 1


def test_the_logger_switches_and_turns_off(tiny_config, tmp_path):
    run_cell(tiny_config({"runtime": {"logger": "none"}}), out_dir=tmp_path / "none", log=lambda *_: None)
    assert not (tmp_path / "none" / "logs").exists()
    if missing_module("tensorboard") is None:
        run_cell(tiny_config({"runtime": {"logger": "tensorboard"}}), out_dir=tmp_path / "tb", log=lambda *_: None)
        assert list((tmp_path / "tb" / "logs").glob("events.out.tfevents.*"))


def test_an_unknown_or_missing_logger_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="runtime.logger"):
        load_config(None, ["runtime.logger=wandb"])
    monkeypatch.setattr("fl_core.tracking.NEEDS", {"mlflow": "no_such_module_xyz"})
    with pytest.raises(ConfigError, match=r"runtime.logger: mlflow needs the 'no_such_module_xyz' package"):
        load_config(None, ["runtime.logger=mlflow"])
