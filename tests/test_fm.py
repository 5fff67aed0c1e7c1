"""The suite's own generative FM: one command trains what a grid needs, sample sheets, cells run on it."""
import json

import pandas as pd
import pytest
from test_grid import _spec, _write

from benchmarks import fm
from benchmarks import grid as grid_mod

TINY_DDPM = {"base_channels": 8, "train_steps": 3, "train_batch": 8, "sample_steps": 2, "sample_batch": 8}


def test_train_then_samples_then_the_grid_runs_on_generated_data(tiny_root, tmp_path, monkeypatch):
    spec = _spec(tiny_root, tmp_path, {
        "synthetic": [{"label": "heldout", "provider": "heldout"}, {"label": "ddpm", "provider": "ddpm", "ddpm": TINY_DDPM}],
        "attack": [{"name": "none"}, {"name": "fm-generator", "params": {"poison_rate": 0.5, "finetune_steps": 2}}],
        "seed": [0, 1],
    }, exclude=[{"synthetic": "heldout", "attack.name": "fm-generator"}])
    path = _write(tmp_path, spec)
    with pytest.raises(SystemExit):  # nothing to train: a clear error, no compute
        fm.main(["prepare", "--config", str(path), "--only", "synthetic=heldout"])
    assert fm.main(["prepare", "--config", str(path), "--threads", "1"]) == 0
    [folder] = (tmp_path / "cache" / "ddpm").iterdir()  # one FM serves both seeds and both attacks
    assert [p.name.startswith("compromised-") for p in folder.iterdir() if p.is_dir() and "-" in p.name] == [True]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["threads"], manifest["device"]) == (1, "cpu")
    assert len(list((tmp_path / "cache" / "synthetic").glob("fm-generator-*"))) == 2  # the poisoned draws, per seed
    out = tmp_path / "sheets"
    written = fm.write_samples(fm.grid_configs(None, str(path), [], []), out, 3)
    assert len(written) == len(set(written)) == 4  # each sheet once, though two attacks share the ddpm set
    assert fm.main(["samples", "--config", str(path), "--out", str(out), "--per-class", "3"]) == 0
    assert {p.name for p in out.iterdir()} == {"samples-tiny-heldout.png", "samples-tiny-ddpm.png",
                                               "samples-tiny-ddpm-fm-generator.png", "samples-tiny-ddpm-fm-generator-clean.png"}
    assert fm.main(["quality", "--config", str(path), "--out", str(out)]) == 0
    scores = pd.read_csv(out / "quality.csv")  # one row per attack-free synthetic set: 2 providers x 2 seeds
    assert sorted(zip(scores.synthetic, scores.seed)) == [("ddpm", 0), ("ddpm", 1), ("heldout", 0), ("heldout", 1)]
    assert scores[["acc_real", "acc_at_fm_resolution"]].apply(lambda v: v.between(0, 100)).all().all()
    monkeypatch.setattr("fl_core.synthetic.train_ddpm", lambda *a, **k: pytest.fail("the grid never trains an FM"))
    monkeypatch.setattr("attacks.fm_generator.fit_ddpm", lambda *a, **k: pytest.fail("nor fine-tunes one"))
    for drawer in ("fl_core.synthetic.ddim_sample", "attacks.fm_generator.ddim_sample"):
        monkeypatch.setattr(drawer, lambda *a, **k: pytest.fail("nor draws: prepare drew every set"))
    assert grid_mod.main(["--config", str(path), "--out", str(tmp_path / "grid"), "--jobs", "1", "--no-report"]) == 0
    cells = [json.loads(p.read_text()) for p in (tmp_path / "grid" / "cells").glob("*/record.json")]
    assert len(cells) == 6  # a record.json is written only when a cell is done
    generated = [c for c in cells if c["config"]["attack"]["name"] == "fm-generator"]
    assert len(generated) == 2 and all(c["config"]["synthetic"]["provider"] == "ddpm" for c in generated)
