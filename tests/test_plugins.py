"""The documented example defense, the --plugin option and lazy entry-point plugins."""
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import defenses
from benchmarks import run as run_cli
from fl_core import registry
from fl_core.config import load_config
from fl_core.hooks import Aggregation, ClientUpdate, ServerContext
from fl_core.registry import import_plugins
from fl_core.schema import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield
    sys.modules.pop("clip_defense", None)
    defenses.DEFENSES._entries.pop("clip-example", None)


def test_example_defense_bounds_update_norms(examples_on_path):
    import_plugins(["clip_defense"])
    clip = defenses.DEFENSES.get("clip-example")(max_norm=1.0)
    glob = torch.nn.Linear(4, 2)
    local = torch.nn.Linear(4, 2)
    with torch.no_grad():
        for p in local.parameters():
            p.add_(10.0)
    ctx = ServerContext(1, 0, torch.device("cpu"), 2, None)
    agg = clip.aggregate(Aggregation([ClientUpdate(0, 0, 10, local)], torch.ones(1)), glob, ctx)
    norm = torch.sqrt(sum((d ** 2).sum() for d in agg.updates[0].delta(glob).values()))
    assert norm == pytest.approx(1.0, rel=1e-4) and ctx.decisions == {"clipped": [0]}
    with pytest.raises(ConfigError, match="max_norm must be > 0"):
        load_config(None, ["defense.name=clip-example", "defense.params={max_norm: -1}"])


def test_example_defense_runs_through_the_cli_with_plugin(examples_on_path, tiny_root, tmp_path, capsys):
    out = tmp_path / "cell"
    code = run_cli.main(["--plugin", "clip_defense", "--data-root", str(tiny_root),
                         "--set", "defense.name=clip-example", "--set", "defense.params.max_norm=0.5",
                         *[f"--set={k}" for k in TINY_SETS], f"--set=runtime.cache_dir={tmp_path / 'cache'}",
                         "--out", str(out)])
    assert code == 0 and (out / "record.json").is_file()
    assert "ACC" in capsys.readouterr().out


TINY_SETS = ["data.dataset=tiny", "data.public_size=40", "data.min_samples=2", "model.width=0.25",
             "synthetic.size=20", "fl.setting=custom", "fl.num_clients=3", "fl.clients_per_round=3",
             "fl.rounds=2", "pretrain.epochs=1", "fusion.steps=2", "runtime.progress=false"]


def test_cli_rejects_bad_config_before_compute(capsys):
    with pytest.raises(SystemExit) as err:
        run_cli.main(["--set", "defense.name=nope"])
    assert err.value.code == 2
    assert "unknown defense 'nope'; known:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli.main(["--plugin", "no_such_module_xyz"])
    assert "could not be imported" in capsys.readouterr().err


def test_entry_point_plugins_load_only_when_named(monkeypatch, examples_on_path, request):
    ep = EntryPoint(name="clip-ep", value="clip_defense:ClipUpdates", group="fmfl.defenses")
    monkeypatch.setattr(registry, "entry_points", lambda group, name=None: [
        e for e in [ep] if e.group == group and (name is None or e.name == name)])
    registry.plugin_entry_points.cache_clear()  # read once per process: read the patched ones
    request.addfinalizer(registry.plugin_entry_points.cache_clear)
    sys.modules.pop("clip_defense", None)
    assert "clip-ep" in defenses.DEFENSES.names()
    assert "clip_defense" not in sys.modules  # listing names imports nothing
    cls = defenses.DEFENSES.get("clip-ep")
    assert cls.__name__ == "ClipUpdates" and "clip_defense" in sys.modules
    defenses.DEFENSES._entries.pop("clip-ep", None)
