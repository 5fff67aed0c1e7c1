"""Issue 42's rules: strict config text, one key per --set, checked command-line options, records trusted
only whole, a SIGTERM'd cell exiting 130 with nothing kept."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import grid as grid_mod
from benchmarks import run as run_mod
from fl_core.config import load_config
from fl_core.configfile import apply_override, load_yaml, parse_yaml
from fl_core.records import read_record
from fl_core.registry import Registry, import_plugins
from fl_core.schema import ConfigError


@pytest.mark.parametrize("text, value", [
    ("a: 010", 10), ("a: 0o10", 8), ("a: 0x1f", 31), ("a: 1e-3", 1e-3), ("a: 1_000", "1_000"), ("a: yes", "yes"),
    ("a: on", "on"), ("a: true", True), ("a: 1:30", "1:30"), ("a: .5", 0.5), ("a: -2", -2), ("a: NO", "NO"),
])
def test_yaml_reads_scalars_as_yaml_1_2(text, value):
    assert parse_yaml(text, "t")["a"] == value


@pytest.mark.parametrize("text, fragment", [
    ("a: 1\na: 2", "key 'a' is given twice"),
    ("fl:\n  rounds: 2\nfl:\n  rounds: 3", "key 'fl' is given twice"),
    ("a: {b: 1, b: 2}", "key 'b' is given twice"),
    ("a: [1", "not valid YAML"),
])
def test_bad_yaml_text_is_refused(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_yaml(text, "t")


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"), (b"# only a comment\n", "is empty"), (b"\xff\xfe\x00binary", "not a text file"),
    (b"- a\n- b\n", "top level must be a mapping"), (b"fl: {rounds: 2}\nfl: {rounds: 3}\n", "given twice"),
])
def test_bad_config_files_are_refused(content, fragment, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        load_yaml(path)


def test_a_folder_or_a_missing_file_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "none.yaml")


@pytest.mark.parametrize("overrides", [
    ["fl.rounds=2", "fl.rounds=3"], ["fl={rounds: 2}", "fl.rounds=3"], ["fl.rounds=2", "fl={rounds: 3}"],
    ["seed=1", "seed=1"],
])
def test_a_key_set_twice_is_refused(overrides):
    with pytest.raises(ConfigError, match="given twice"):
        load_config(None, overrides)


def test_a_mapping_override_merges_into_its_section():
    data = {"fl": {"num_clients": 3, "rounds": 1}}
    apply_override(data, "fl={rounds: 2}")
    assert data == {"fl": {"num_clients": 3, "rounds": 2}}
    assert load_config(None, ["seed=010"]).seed == 10


@pytest.mark.parametrize("argv, fragment", [
    (["--max-hours", "nan"], "--max-hours"), (["--max-hours", "inf"], "--max-hours"), (["--max-hours", "0"], "--max-hours"),
    (["--data-root", "/no/such/root"], "--data-root"), (["--out", ""], "--out is empty"),
    (["--set", "fl.rounds=2", "--set", "fl.rounds=3"], "given twice"), (["--set", "seed=1", "--set", "seed=2"], "given twice"),
    (["--set", "defense.name=krum"], "grid axis 'defense.name'"), (["--set", "attack={name: fm}"], "grid axis 'attack'"),
    (["--set", "seed=3"], "grid axis 'seed'"), (["--set", "defense.name.x=1"], "grid axis"),
    (["--plugin", "json.no_such_module"], "could not be imported"),
])
def test_grid_options_are_checked_before_compute(argv, fragment, capsys):
    with pytest.raises(SystemExit) as stop:
        grid_mod.main(["--dry-run", *argv])
    assert stop.value.code == 2 and fragment in capsys.readouterr().err


def test_zoo_keys_cannot_be_set_beside_a_zoo_axis(capsys):
    for key in ("attack.params.poison_rate=0.1", "backdoor.target=1", "fl.fusion=fedavg"):
        with pytest.raises(SystemExit):
            grid_mod.main(["--preset", "zoo_test", "--dry-run", "--set", key])
        assert "grid axis 'zoo'" in capsys.readouterr().err


def test_preset_and_config_are_exclusive(capsys):
    with pytest.raises(SystemExit) as stop:
        grid_mod.main(["--preset", "default", "--config", "x.yaml", "--dry-run"])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["--max-hours", "nan"], "--max-hours"), (["--data-root", "/no/such/root"], "--data-root"),
    (["--out", ""], "--out is empty"), (["--set", "fl.rounds=2", "--set", "fl.rounds=3"], "given twice"),
    (["--config", "/"], "is a folder"), (["--set", "runtime.logger=wandb"], "runtime.logger"),
])
def test_cell_options_are_checked_before_compute(argv, fragment, capsys):
    with pytest.raises(SystemExit) as stop:
        run_mod.main(argv)
    assert stop.value.code == 2 and fragment in capsys.readouterr().err


def test_plugins_that_fail_or_break_the_hooks_are_refused(tmp_path, monkeypatch):
    (tmp_path / "raising_plugin.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="RuntimeError: boom"):
        import_plugins(["raising_plugin"])
    from fl_core.hooks import Defense

    registry = Registry("defense", base="Defense")
    with pytest.raises(TypeError, match="not a subclass"):
        registry.register("fn")(lambda: None)

    class WrongHook(Defense):
        def aggregate(self, agg):
            return agg

    with pytest.raises(TypeError, match=r"aggregate\(self, agg\) does not take"):
        registry.register("wrong")(WrongHook)


TINY_SETS = ["data.dataset=tiny", "data.public_size=40", "data.min_samples=2", "model.width=0.25", "synthetic.size=20",
             "fl.setting=custom", "fl.num_clients=3", "fl.clients_per_round=3", "pretrain.epochs=1", "fusion.steps=3",
             "runtime.progress=false"]


def _whole_cell(tiny_config, folder):
    from fl_core import run_cell

    cfg = tiny_config({"fl": {"rounds": 1}, "runtime": {"logger": "none"}})
    run_cell(cfg, out_dir=folder, log=lambda *_: None)
    return cfg.key()


def test_a_record_counts_only_when_whole(tiny_config, tmp_path, capsys):
    folder = tmp_path / "cell"
    key = _whole_cell(tiny_config, folder)
    assert read_record(folder, key) is not None
    record = json.loads((folder / "record.json").read_text())
    assert read_record(folder, "0" * 12) is None  # another cell's record
    for broken in ({}, {**record, "metrics": {"acc": 99.99}}, {**record, "key": "f" * 12},
                   {**record, "config": {**record["config"], "seed": 7}}, {**record, "rounds": []}):
        (folder / "record.json").write_text(json.dumps(broken))
        assert read_record(folder, key) is None
    (folder / "record.json").write_text(json.dumps(record))
    (folder / "models" / "prototype0.pt").write_bytes(b"garbage")
    assert read_record(folder, key) is None and "prototype0.pt does not load" in capsys.readouterr().err
    torch.save({}, folder / "models" / "prototype0.pt")
    assert read_record(folder, key) is None


def test_a_cell_refuses_a_folder_holding_another_cells_record(tiny_config, tmp_path, tiny_root, capsys):
    folder = tmp_path / "cell"
    _whole_cell(tiny_config, folder)
    with pytest.raises(SystemExit) as stop:
        run_mod.main(["--data-root", str(tiny_root), *[f"--set={s}" for s in TINY_SETS], "--set=seed=5",
                      f"--set=runtime.cache_dir={tmp_path / 'cache'}", "--out", str(folder)])
    assert stop.value.code == 2 and "holds the record of another cell" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="signals as on Linux")
def test_sigterm_to_a_cell_exits_130_and_keeps_nothing(tiny_root, tmp_path):
    out = tmp_path / "cell"
    sets = [*TINY_SETS, "fl.rounds=500", f"runtime.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, "-m", "benchmarks.run", "--data-root", str(tiny_root), *[f"--set={s}" for s in sets],
           "--out", str(out)]
    cell = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    deadline = time.time() + 300
    while not (out / "logs" / "metrics.csv").is_file() and time.time() < deadline and cell.poll() is None:
        time.sleep(0.3)
    cell.send_signal(signal.SIGTERM)
    output = cell.communicate(timeout=120)[0]
    assert cell.returncode == 130 and "interrupted" in output, output
    assert not (out / "record.json").exists()


def test_a_misspelt_rule_key_under_a_known_section_is_refused(tmp_path):
    from benchmarks.gridspec import load_grid

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"base": "cell.yaml", "axes": {"seed": [0]}, "exclude": [{"fl.roundz": 2}]}))
    with pytest.raises(ConfigError, match="'fl.roundz'"):
        load_grid(path)
    path.write_text(yaml.safe_dump({"base": "cell.yaml", "axes": {"seed": [0]},
                                    "exclude": [{"defense.params.anything": 2}]}))
    assert load_grid(path)  # a plugin's parameters are its own


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_dies_with_its_grid_even_on_sigkill(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import os\nimport time\nfrom concurrent.futures import ProcessPoolExecutor\nimport multiprocessing\n"
        "from benchmarks.grid import die_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'), initializer=die_with_parent,\n"
        "                               initargs=(os.getpid(),))\n"
        "    pool.submit(time.sleep, 600)\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    deadline = time.time() + 60
    workers = []
    while not workers and time.time() < deadline:
        time.sleep(0.5)
        workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                   if p.read_text().rsplit(")", 1)[1].split()[1] == str(parent.pid)] if parent.poll() is None else []
    alive = lambda pid: Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # noqa: E731
    time.sleep(3)
    assert workers and all(alive(w) for w in workers)  # the worker started and sleeps
    parent.kill()
    parent.wait()
    deadline = time.time() + 60  # a worker still importing when its grid died exits once it gets to run
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert not any(alive(w) for w in workers)


def test_a_worker_whose_grid_died_before_it_started_exits():
    code = "from benchmarks.grid import die_with_parent\ndie_with_parent(1)\nprint('computing')"  # 1: not its parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert done.returncode == 1 and "computing" not in done.stdout


def test_an_edited_dataset_sidecar_is_not_believed(tiny_config, tiny_root, tmp_path, capsys):
    from fl_core.data import dataset_facts, load_dataset

    cache = tmp_path / "cache"
    load_dataset("tiny", tiny_root, cache)
    sidecar = cache / "datasets" / "tiny.json"
    meta = json.loads(sidecar.read_text())
    real = meta["facts"]["classes"]
    sidecar.write_text(json.dumps({**meta, "facts": {**meta["facts"], "classes": 100}}))
    assert dataset_facts("tiny", tiny_root, cache).classes == real
    assert "do not match their seal" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="backdoor.target: 50 is not a class"):
        tiny_config({"backdoor": {"target": 50}})
    assert load_dataset("tiny", tiny_root, cache).num_classes == real  # the sidecar is written again, sealed
    assert json.loads(sidecar.read_text())["facts"]["classes"] == real


@pytest.mark.parametrize("extra, fragment", [
    ({"synthetic": {"provider": "diffusers", "diffusers": {"pipeline": "no-such-pipeline"}}},
     "synthetic.diffusers.pipeline: 'no-such-pipeline' is neither"),
    ({"synthetic": {"provider": "diffusers", "diffusers": {"pipeline": "/no/such/folder"}}},
     "synthetic.diffusers.pipeline: /no/such/folder is not a diffusers pipeline folder"),
])
def test_late_inputs_are_refused_at_validation(tiny_config, extra, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        tiny_config(extra)


def test_a_single_run_refuses_a_defense_that_cannot_apply(tiny_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_mod.main(["--data-root", str(tiny_root), *[f"--set={s}" for s in TINY_SETS], "--set=defense.name=krum",
                      "--set=model.prototypes=[{name: cnn, width: 0.25}, {name: cnn, width: 0.5}]",
                      f"--set=runtime.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "cell")])
    assert stop.value.code == 2 and "'krum' compares parameters" in capsys.readouterr().err


def test_a_cache_dir_that_is_a_file_is_refused(tiny_config, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="runtime.cache_dir: .* is not a folder"):
        tiny_config({"runtime": {"cache_dir": str(tmp_path / "afile")}})


def test_a_ddpm_cell_without_its_trained_model_stops_before_compute(tiny_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_mod.main(["--data-root", str(tiny_root), *[f"--set={s}" for s in TINY_SETS], "--set=synthetic.provider=ddpm",
                      f"--set=runtime.cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "cell")])
    assert stop.value.code == 2 and "no trained DDPM at" in capsys.readouterr().err
    assert not (tmp_path / "cell" / "record.json").exists()


def test_a_damaged_grid_manifest_keeps_finished_cells(tiny_root, tmp_path):
    from test_grid import _spec, _write

    spec = _spec(tiny_root, tmp_path, {"seed": [0, 1]})
    path, out = _write(tmp_path, spec), tmp_path / "grid"
    assert grid_mod.main(["--config", str(path), "--out", str(out), "--jobs", "1", "--only", "seed=0", "--no-report"]) == 0
    (out / "grid.json").write_text((out / "grid.json").read_text()[:40])  # cut short by a crash
    assert grid_mod.main(["--config", str(path), "--out", str(out), "--jobs", "1", "--only", "seed=1", "--no-report"]) == 0
    cells = json.loads((out / "grid.json").read_text())["cells"]
    assert sorted(c["labels"]["seed"] for c in cells) == ["0", "1"]
