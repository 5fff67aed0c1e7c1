"""Bad input is refused before compute with a message naming the key or file; damaged files, killed
writers, a second runner and Ctrl-C lose nothing and compute nothing twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import grid as grid_mod
from fl_core import data as data_mod
from fl_core.config import load_config
from fl_core.configfile import deep_merge
from fl_core.schema import ConfigError
from fl_core.storage import Claim, atomic_write, load_tensors, remove_stale_temps
from tests.conftest import TINY_OVERRIDES

# (overrides, text the error must contain): the tiny dataset has 4 classes, 16x16 images, 160 train / 40 test
BAD_CELLS = [
    (["fl.rounds=0"], "fl.rounds"),
    (["synthetic.provider=ddpm", "synthetic.ddpm.image_size=18"], "synthetic.ddpm.image_size: the UNet halves"),
    (["synthetic.provider=ddpm", "synthetic.ddpm.guidance_scale=2", "synthetic.ddpm.train_uncond_prob=0"],
     "synthetic.ddpm.guidance_scale"),
    (["synthetic.ddpm.ema_decay=1"], "synthetic.ddpm.ema_decay"),
    (["attack.name=fm-generator"], "needs provider 'ddpm'"),
    (["synthetic.provider=ddpm", "attack.name=fm-generator", "attack.params={finetune_steps: 0}"], "finetune_steps"),
    (["fl.rounds=three"], "fl.rounds"),
    (["fl.rounds=1.5"], "fl.rounds"),
    (["fl.rounds=1000000000000"], "fl.rounds"),
    (["fl.local_epochs=0"], "fl.local_epochs"),
    (["fl.clients_per_round=4"], "fl.clients_per_round"),
    (["fl.num_clients=0"], "fl.num_clients"),
    (["fl.setting=mesh"], "fl.setting"),
    (["fl.fusion=fedprox"], "fl.fusion"),
    (["fl.client.lr=0"], "fl.client.lr"),
    (["fl.client.lr=.inf"], "fl.client.lr"),
    (["fl.client.lr=-1"], "fl.client.lr"),
    (["fl.client.lr=fast"], "fl.client.lr"),
    (["fl.client.momentum=1"], "fl.client.momentum"),
    (["fl.client.weight_decay=-0.1"], "fl.client.weight_decay"),
    (["fl.client.batch_size=0"], "fl.client.batch_size"),
    (["fl.client.optimizer=lion"], "fl.client.optimizer"),
    (["fl.client.schedule=step"], "fl.client.schedule"),
    (["pretrain.epochs=-1"], "pretrain.epochs"),
    (["pretrain.enabled=maybe"], "pretrain.enabled"),
    (["fusion.alpha=1.5"], "fusion.alpha"),
    (["fusion.temperature=0"], "fusion.temperature"),
    (["fusion.temperature=.inf"], "fusion.temperature"),
    (["fusion.steps=-1"], "fusion.steps"),
    (["data.beta=0"], "data.beta"),
    (["data.beta=.inf"], "data.beta"),
    (["data.beta=.nan"], "data.beta"),
    (["data.partition=zipf"], "data.partition"),
    (["data.public_size=-1"], "data.public_size"),
    (["data.public_size=160"], "data.public_size"),
    (["data.client_pool_size=100000"], "data.client_pool_size"),
    (["data.test_size=1000"], "data.test_size"),
    (["data.min_samples=100"], "data.min_samples"),
    (["data.partition=shards", "data.shards_per_client=1000"], "data.shards_per_client"),
    (["data.dataset=nope"], "data.dataset"),
    (["data.dataset=a/b"], "data.dataset"),
    (["model.name=vgg99"], "model.name"),
    (["model.width=0"], "model.width"),
    (["model.width=1e5"], "model.width"),
    (["model.width=.inf"], "model.width"),
    (["model.depth=0"], "model.depth"),
    (["model.options.bogus=1"], "model.options"),
    (["model.name=resnet8", "model.depth=3"], "model.depth"),
    (["synthetic.provider=dalle"], "synthetic.provider"),
    (["synthetic.size=0"], "synthetic.size"),
    (["synthetic.size=1000"], "synthetic.size"),
    (["synthetic.provider=diffusers"], "synthetic.diffusers.pipeline"),
    (["seed=-1"], "seed"),
    (["seed=abc"], "seed"),
    (["backdoor.target=4"], "backdoor.target"),
    (["backdoor.target=-1"], "backdoor.target"),
    (["backdoor.mapping=one-to-one"], "backdoor.source"),
    (["backdoor.mapping=one-to-one", "backdoor.source=4"], "backdoor.source"),
    (["backdoor.mapping=one-to-one", "backdoor.source=0"], "backdoor.source"),
    (["backdoor.mapping=one-to-one", "backdoor.source=-1"], "backdoor.source"),
    (["backdoor.mapping=sideways"], "backdoor.mapping"),
    (["backdoor.trigger.kind=laser"], "backdoor.trigger.kind"),
    (["backdoor.trigger.params.size=40"], "backdoor.trigger"),
    (["backdoor.trigger.params.size=2.5"], "backdoor.trigger.params.size"),
    (["backdoor.trigger.params.margin=-5"], "backdoor.trigger"),
    (["backdoor.trigger.params.bogus=1"], "backdoor.trigger"),
    (["backdoor.trigger.kind=object", "backdoor.trigger.params.size=20"], "backdoor.trigger"),
    (["attack.name=nope"], "attack.name"),
    (["attack.name=badnets", "attack.params.num_malicious=5"], "attack.params"),
    (["attack.name=badnets", "attack.params.num_malicious=1.5"], "attack.params.num_malicious"),
    (["attack.name=badnets", "attack.params.poison_rate=2"], "attack.params"),
    (["attack.name=badnets", "attack.params.bogus=1"], "attack.params"),
    (["attack.name=fm", "attack.params.poison_rate=abc"], "attack.params.poison_rate"),
    (["attack.name=dba", "attack.params.num_malicious=2"], "backdoor.trigger.kind"),
    (["defense.name=nope"], "defense.name"),
    (["defense.name=krum", "defense.params.num_byzantine=abc"], "defense.params.num_byzantine"),
    (["defense.name=krum", "defense.params.num_byzantine=1.5"], "defense.params.num_byzantine"),
    (["runtime.device=tpu"], "runtime.device"),
    (["runtime.threads=0"], "runtime.threads"),
    (["eval.every=0"], "eval.every"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["fl="], "config.fl"),
    (["fl.roundz=3"], "roundz"),
    (["bogus=1"], "bogus"),
    (["fl.rounds=[1"], "fl.rounds"),
    (["fl.rounds"], "fl.rounds"),
]
if not torch.cuda.is_available():
    BAD_CELLS.append((["runtime.device=cuda"], "runtime.device"))


@pytest.fixture
def no_compute(monkeypatch):
    """Decoding a dataset or starting a cell fails the test: a refusal must come before either."""
    import fl_core.fl  # imported first: it binds data.load_dataset at import, which must stay the real one

    def forbidden(*args, **kwargs):
        raise AssertionError("compute started")

    monkeypatch.setattr(data_mod, "_read_image_folder", forbidden)
    monkeypatch.setattr(data_mod, "load_dataset", forbidden)
    monkeypatch.setattr(fl_core.fl, "run_cell", forbidden)


def _tiny_base(tiny_root, tmp_path) -> dict:
    return deep_merge(TINY_OVERRIDES, {"runtime": {"data_root": str(tiny_root), "progress": False,
                                                   "cache_dir": str(tmp_path / "cache")}})


@pytest.mark.parametrize("overrides, key", BAD_CELLS, ids=[" ".join(o) for o, _ in BAD_CELLS])
def test_bad_cell_is_refused_before_compute_naming_the_key(overrides, key, tiny_root, tmp_path, no_compute):
    assert load_config(None, [], base=_tiny_base(tiny_root, tmp_path))  # the tiny base itself is fine
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides, base=_tiny_base(tiny_root, tmp_path))


def test_numeric_text_is_a_number(tiny_root, tmp_path):
    cfg = load_config(None, ["fl.client.lr=1e-3", "fusion.alpha=5e-1"], base=_tiny_base(tiny_root, tmp_path))
    assert cfg.fl.client.lr == 0.001 and cfg.fusion.alpha == 0.5


BAD_GRIDS = [
    ("axes: [a, b]", "axes"),
    ("axes: {seed: []}", "axes.seed"),
    ("axes: {seed: 0}", "axes.seed"),
    ("exclude: foo", "exclude"),
    ("include: {seed: 1}", "include"),
    ("scales: {cpu: 5}", "scales"),
    ("scales: nothere.yaml", "scales"),
    ("description: 5", "description"),
    ("bogus: 1", "bogus"),
    ("base: nothere.yaml", "base config"),
    ("axes: {seed: [0]}\nexclude: [{sed: 0}]", "'sed'"),
    ("axes: {seed: [0]}\ninclude: [{fl.roundz: 2}]", "'fl.roundz'"),
    ("axes: {seed: [0]\n", "not valid YAML"),
    ("axes: {fl.rounds: [0]}", "fl.rounds"),
    ("- a\n- b", "top level must be a mapping"),
]


@pytest.mark.parametrize("text, fragment", BAD_GRIDS, ids=[t for t, _ in BAD_GRIDS])
def test_bad_grid_file_is_refused_naming_the_file(text, fragment, tmp_path, capsys, no_compute):
    path = tmp_path / "bad.yaml"
    path.write_text(text if text.startswith(("-", "base:")) else "base: cell.yaml\n" + text)
    with pytest.raises(SystemExit) as stop:
        grid_mod.main(["--config", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert "config error" in err and fragment in err, err


@pytest.fixture
def tiny_grid(tiny_root, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"base": _tiny_base(tiny_root, tmp_path), "axes": {"seed": [0, 1, 2, 3]}}))
    return path


@pytest.mark.parametrize("args, fragment", [
    (["--jobs", "0"], "--jobs"),
    (["--scale", "paper"], "defines no scales"),
    (["--only", "seed=9"], "--only"),
    (["--only", "seed"], "--only"),
    (["--max-hours", "0"], "--max-hours"),
    (["--set", "fl.rounds=90000", "--max-hours", "1"], "--max-hours"),
    (["--set", "fl.roundz=2"], "roundz"),
    (["--plugin", "no_such_plugin_module"], "no_such_plugin_module"),
])
def test_bad_grid_arguments_are_refused(args, fragment, tiny_grid, tmp_path, capsys, no_compute):
    with pytest.raises(SystemExit) as stop:
        grid_mod.main(["--config", str(tiny_grid), "--out", str(tmp_path / "out"), *args])
    assert stop.value.code == 2
    assert fragment in capsys.readouterr().err


def test_unknown_preset_lists_the_valid_ones(capsys, no_compute):
    with pytest.raises(SystemExit):
        grid_mod.main(["--preset", "nope"])
    assert "valid: " in capsys.readouterr().err


def test_run_refuses_bad_output_and_budget_before_compute(tmp_path, capsys, no_compute):
    from benchmarks import run as run_mod

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, fragment in ((["--out", str(blocker / "sub")], "not writable"),
                           (["--set", "fl.rounds=90000", "--max-hours", "1"], "--max-hours")):
        with pytest.raises(SystemExit) as stop:
            run_mod.main(args)
        assert stop.value.code == 2 and fragment in capsys.readouterr().err


def test_schema_export_describes_the_fields(capsys):
    from benchmarks import run as run_mod

    assert run_mod.main(["--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    optim = schema["$defs"]["OptimConfig"]["properties"]
    assert optim["lr"]["exclusiveMinimum"] == 0 and set(optim["optimizer"]["enum"]) == {"sgd", "adam", "adamw"}
    assert schema["$defs"]["FLConfig"]["additionalProperties"] is False


def test_committed_results_keep_their_keys():
    """Every committed record's stored config re-validates to its stored key (hashes are stable), and every
    record of a development grid is trusted as it is read back (a retired parameter keeps its cells)."""
    from fl_core.config import validate
    from fl_core.records import problem
    from fl_core.schema import CellConfig, from_dict

    records = sorted(Path("results").glob("*/cells/*/record.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        assert validate(from_dict(CellConfig, record["config"])).key() == record["key"], path
    development = sorted(Path("results/dev").glob("*/cells/*/record.json"))
    assert development
    for path in development:
        assert problem(json.loads(path.read_text()), path.parent, path.parent.name) is None, path


# ---------------------------------------------------------------- damaged files, killed writers


def test_damaged_dataset_cache_is_rebuilt(tiny_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = data_mod.load_dataset("tiny", tiny_root, cache)
    cache_file = cache / "datasets" / "tiny.pt"
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # cut short
    again = data_mod.load_dataset("tiny", tiny_root, cache)
    assert torch.equal(first.train.images, again.train.images)
    assert "tiny.pt cannot be read" in capsys.readouterr().err
    blob = torch.load(cache_file, weights_only=True)  # complete again, but tampered: hash mismatch
    blob["train_images"][0] += 1
    torch.save(blob, cache_file)
    assert torch.equal(data_mod.load_dataset("tiny", tiny_root, cache).train.images, first.train.images)
    assert "does not match the content hash" in capsys.readouterr().err


def test_damaged_synthetic_set_is_made_again(tmp_path, capsys):
    from fl_core.data import ImageData
    from fl_core.synthetic import cached_images

    calls = []

    def make():
        calls.append(1)
        return ImageData(torch.arange(48, dtype=torch.uint8).view(3, 1, 4, 4), torch.tensor([0, 1, 2]), ["a", "b", "c"])

    folder = tmp_path / "syn"
    data, manifest = cached_images(folder, ["a", "b", "c"], make, {"provider": "test"})
    assert cached_images(folder, ["a", "b", "c"], make, {"provider": "test"})[1] == manifest and len(calls) == 1
    (folder / "data.pt").write_bytes(b"PK\x03\x04 broken")
    again, _ = cached_images(folder, ["a", "b", "c"], make, {"provider": "test"})
    assert len(calls) == 2 and torch.equal(again.images, data.images)
    torch.save({"images": data.images + 1, "labels": data.labels}, folder / "data.pt")  # content changed
    cached_images(folder, ["a", "b", "c"], make, {"provider": "test"})
    assert len(calls) == 3 and "content hash" in capsys.readouterr().err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_killed_writers_are_removed(tmp_path):
    dead, live = tmp_path / f"data.pt.tmp{_dead_pid()}", tmp_path / f"other.tmp{os.getppid()}"
    dead.write_text("half")
    live.write_text("being written")
    atomic_write(tmp_path / "record.json", lambda tmp: tmp.write_text("{}"))
    assert not dead.exists() and live.exists() and (tmp_path / "record.json").read_text() == "{}"
    assert remove_stale_temps(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, crash)
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    assert load_tensors(tmp_path / "missing.pt") is None


def test_claims_are_exclusive_and_stale_claims_are_taken_over(tmp_path):
    path = tmp_path / "claim.json"
    first, second = Claim(path), Claim(path)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    path.write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "time": 0}))  # killed owner
    assert Claim(path).acquire()


def test_two_runners_on_one_folder_compute_each_cell_once(tiny_grid, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.grid", "--config", str(tiny_grid), "--out", str(out), "--no-report", "--jobs", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    runners = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for _ in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runners]
    assert all(r.returncode == 0 for r in runners), outputs
    logs = sorted(out.glob("cells/*/log.txt"))
    assert len(logs) == 4 and all((log.parent / "record.json").is_file() for log in logs)
    assert [log.read_text().count("start ") for log in logs] == [1, 1, 1, 1], outputs
    assert not list(out.glob("cells/*/claim.json"))


SLEEPY_DEFENSE = '''
import os, signal, time
from defenses import DEFENSES, Defense

@DEFENSES.register("test-sleepy")
class Sleepy(Defense):
    consumes = frozenset({"updates"})

    def aggregate(self, agg, global_model, ctx):
        signal.signal(signal.SIGTERM, lambda *_: None)  # as Lightning's Trainer does during training
        open(os.environ["SLEEPY_MARKER"] + str(os.getpid()), "w").close()
        time.sleep(600)
        return agg
'''


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_process_grid_stops_its_workers_and_keeps_nothing_half_done(stop, tiny_grid, tmp_path):
    """Four cells, two workers, one more call queued; each cell ignores SIGTERM, as Lightning's Trainer does."""
    (tmp_path / "sleepy_defense.py").write_text(SLEEPY_DEFENSE)
    marker = tmp_path / "sleeping-"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.grid", "--config", str(tiny_grid), "--out", str(out), "--no-report",
           "--jobs", "2", "--executor", "process", "--plugin", "sleepy_defense", "--set", "defense.name=test-sleepy"]
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path.cwd()}", "SLEEPY_MARKER": str(marker)}
    grid = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    while not list(tmp_path.glob("sleeping-*")) and time.time() < deadline and grid.poll() is None:
        time.sleep(0.5)
    assert list(tmp_path.glob("sleeping-*")), grid.communicate()[0]  # a worker is inside a cell
    workers = _children(grid.pid)
    grid.send_signal(stop)  # to the runner only, not its process group
    output = grid.communicate(timeout=60)[0]
    if stop == signal.SIGTERM:
        assert grid.returncode == 130 and "rerun the same command to resume" in output, output
    deadline = time.time() + 30
    while any(_running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.5)
    assert workers and not any(_running(w) for w in workers)  # no cell goes on with the code it started on
    assert not list(out.glob("cells/*/record.json"))


# ---------------------------------------------------------------- interrupts and the report


def test_ctrl_c_inside_lightning_stays_an_interrupt():
    import lightning as L

    from fl_core.modules import fit

    class Interrupting(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            raise KeyboardInterrupt

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        fit(Interrupting(), loader, "cpu")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again


def test_ctrl_c_in_a_grid_exits_130_saying_how_to_resume(tiny_grid, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid_mod, "execute_cell", interrupted)
    assert grid_mod.main(["--config", str(tiny_grid), "--out", str(tmp_path / "out"), "--jobs", "1"]) == 130
    assert "interrupted: 0 cell(s) done" in capsys.readouterr().err


def test_report_shows_failure_reasons_and_handles_empty_grids(tmp_path):
    from benchmarks.report import write_report

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "grid.json").write_text(json.dumps({"grid": "g", "scale": "cpu", "axes": ["seed"], "cells": []}))
    write_report(empty)
    failed = tmp_path / "failed"
    config = load_config(None, []).to_dict(with_runtime=False)
    (failed / "cells" / "abc").mkdir(parents=True)
    (failed / "cells" / "abc" / "status.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    (failed / "grid.json").write_text(json.dumps({"grid": "g", "scale": "cpu", "axes": ["seed"],
                                                  "cells": [{"key": "abc", "labels": {"seed": "0"}, "config": config}]}))
    write_report(failed)
    text = (failed / "tables.md").read_text()
    assert "failed: boom" in text and "nan" not in text.split("failed:")[1]
