"""The attack zoo: deterministic draws, disjoint development and test ranges, the protocol, the report."""
import json

import pandas as pd
import pytest
from conftest import TINY_OVERRIDES, write_tiny_imagefolder

from benchmarks import zoo
from benchmarks.gridspec import GridSpec, expand, load_grid, resolve_grid_path
from benchmarks.zoo_report import cdf_plot, zoo_cells, zoo_tables
from fl_core.configfile import deep_merge
from fl_core.schema import ConfigError


def test_a_draw_is_a_function_of_its_index_alone():
    for i in (0, 5, 17, zoo.TEST_START + 3):
        for threat in zoo.THREATS:
            assert zoo.draw(i, threat) == zoo.draw(i, threat)
    fm, classic = zoo.draw(7, "fm"), zoo.draw(7, "classic")
    assert fm.overrides["backdoor"] == classic.overrides["backdoor"]  # one trigger, two threats
    assert fm.overrides["attack"]["name"] == "fm" and classic.overrides["attack"]["name"] == "scaling"
    assert zoo.draw(7, "fm").overrides != zoo.draw(8, "fm").overrides


def test_development_and_test_ranges_are_disjoint_and_cover_every_family():
    dev = zoo.expand_spec({"zoo": "all", "draws": "dev", "n": 90, "threat": "fm"})
    test = zoo.expand_spec({"zoo": "all", "draws": "test", "n": 90, "threat": "fm"})
    assert {d.index for d in dev}.isdisjoint({d.index for d in test})
    assert all(d.split == "dev" for d in dev) and all(d.split == "test" for d in test)
    def attack(d):  # everything a draw fixes but the seed
        return json.dumps({k: v for k, v in d.overrides.items() if k != "seed"}, sort_keys=True)

    assert not {attack(d) for d in dev} & {attack(d) for d in test}
    assert {d.family for d in test[:9]} == set(zoo.FAMILIES)
    assert {d.overrides["seed"] for d in test} == {0, 1, 2}
    assert {d.overrides["seed"] for d in dev} == {100, 101, 102}
    only_sig = zoo.expand_spec({"zoo": "sig", "draws": "test", "n": 4, "threat": "classic"})
    assert [d.family for d in only_sig] == ["sig"] * 4
    assert {d.index for d in only_sig} <= {d.index for d in zoo.expand_spec(
        {"zoo": "all", "draws": "test", "n": 40, "threat": "classic"})}  # a filter over the same stream


@pytest.mark.parametrize("spec, message", [
    ({"zoo": "all", "draws": "val", "n": 3, "threat": "fm"}, "draws 'val' unknown"),
    ({"zoo": "lasers", "draws": "dev", "n": 3, "threat": "fm"}, "zoo 'lasers' unknown"),
    ({"zoo": "all", "draws": "dev", "n": 0, "threat": "fm"}, "n must be"),
    ({"zoo": "all", "draws": "dev", "n": 3, "threat": "both"}, "threat 'both' unknown"),
    ({"zoo": "all", "draws": "dev", "n": 3, "threat": "fm", "size": 1}, "unknown key"),
])
def test_bad_zoo_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        zoo.expand_spec(spec)


@pytest.fixture(scope="module")
def ten_class_root(tmp_path_factory):
    return write_tiny_imagefolder(tmp_path_factory.mktemp("ten"), name="ten", per_class=(12, 4),
                                  classes=[f"c{k}" for k in range(10)])


def test_the_zoo_axis_expands_into_valid_cells_and_keeps_test_only_families_undefended(ten_class_root, tmp_path):
    base = deep_merge(TINY_OVERRIDES, {"data": {"dataset": "ten", "public_size": 60}, "runtime": {
        "data_root": str(ten_class_root), "cache_dir": str(tmp_path / "cache")}})
    base["fl"].update(setting="cross-silo", num_clients=None, clients_per_round=None)
    base["data"]["min_samples"] = 1
    spec = GridSpec("z", base=base, scales={"cpu": {}}, axes={
        "zoo": [{"zoo": "all", "draws": "dev", "n": 9, "threat": "fm"},
                {"zoo": "all", "draws": "dev", "n": 9, "threat": "classic"},
                {"zoo": "all", "draws": "dev", "n": 9, "threat": "clean"}],
        "defense": [{"name": "none"}, {"name": "median"}]})
    cells = expand(spec)
    undefended = [c for c in cells if c.config.defense.name == "none"]
    defended = [c for c in cells if c.config.defense.name != "none"]
    assert len(undefended) == 27 and len(defended) == 12  # test-only families and clean draws run undefended only
    assert not {c.config.backdoor.trigger.kind for c in defended} & set(zoo.TEST_ONLY)
    assert {c.config.backdoor.trigger.kind for c in undefended} == set(zoo.FAMILIES)
    assert all(c.config.seed >= 100 for c in cells)
    assert {c.labels["zoo"].rsplit("-", 1)[1] for c in cells} == {"fm", "classic", "clean"}
    with pytest.raises(ConfigError, match="seed"):
        from benchmarks.gridspec import check_rules
        check_rules(GridSpec("z", axes={"zoo": [], "seed": [0]}), "z.yaml")


def test_zoo_test_preset_has_enough_disjoint_test_draws_per_defense():
    spec = load_grid(resolve_grid_path("zoo_test", None))
    draws = [d for v in spec.axes["zoo"] for d in zoo.expand_spec(v)]
    attacks = [d for d in draws if d.threat != "clean"]
    per_defense = len(spec.axes["data.dataset"]) * len(attacks)
    assert per_defense >= 96 and all(d.split == "test" for d in draws)
    for threat in zoo.THREATS:
        assert {d.family for d in draws if d.threat == threat} == set(zoo.FAMILIES)
    assert {d.index for d in draws if d.threat == "clean"} == {d.index for d in draws if d.threat == "fm"}
    dev = load_grid(resolve_grid_path("zoo_dev", None))
    dev_draws = [d for v in dev.axes["zoo"] for d in zoo.expand_spec(v)]
    assert all(d.split == "dev" for d in dev_draws)
    assert not {d.index for d in dev_draws} & {d.index for d in draws}


def _cell(key, defense, asr, acc, undefended_key, family="sig", attack="fm"):
    return {"key": key, "status": "done", "defense": defense, "defense_name": defense, "asr": asr, "acc": acc,
            "undefended_key": undefended_key, "cfg.attack.name": attack, "cfg.backdoor.trigger.kind": family,
            "cfg.data.dataset": "cifar10"}


def test_pass_rate_counts_biting_draws_only_and_needs_both_asr_and_acc(tmp_path):
    rows = [_cell("u1", "none", 90, 60, "u1"), _cell("d1", "x", 5, 58, "u1"),  # passes
            _cell("u2", "none", 95, 60, "u2"), _cell("d2", "x", 5, 55, "u2"),  # ASR fine, ACC drop 5: fails
            _cell("u3", "none", 80, 60, "u3", attack="scaling"), _cell("d3", "x", 40, 60, "u3", attack="scaling"),
            _cell("u4", "none", 20, 60, "u4"), _cell("d4", "x", 3, 60, "u4")]  # no bite: counted apart
    cells = pd.DataFrame(rows)
    cells["acc_drop_vs_undefended"] = cells["undefended_key"].map(cells.set_index("key")["acc"]) - cells["acc"]
    done = zoo_cells(cells)
    assert done.set_index("key")["passes"].to_dict() == {
        "u1": False, "d1": True, "u2": False, "d2": False, "u3": False, "d3": False, "u4": False, "d4": False}
    table = next(iter(zoo_tables(cells).values())).set_index(["defense", "threat"])
    assert table.loc[("x", "fm"), "pass rate (%)"] == 50.0 and table.loc[("x", "fm"), "bite"] == 2
    assert table.loc[("x", "fm"), "draws"] == 3 and table.loc[("x", "classic"), "pass rate (%)"] == 0.0
    assert cdf_plot(cells, tmp_path / "cdf.png").stat().st_size > 1000


def test_draw_table_lists_each_undefended_draw_with_its_parameters():
    rows = [{**_cell("u1", "none", 90, 60, "u1"), "zoo": "dev000-patch-fm", "cfg.backdoor.trigger.params":
             {"size": 3, "color": [255, 0, 0]}}, {**_cell("d1", "x", 5, 58, "u1"), "zoo": "dev000-patch-fm"}]
    cells = pd.DataFrame(rows)
    cells["acc_drop_vs_undefended"] = 0.0
    table = zoo_tables(cells)["Zoo: every undefended draw, its parameters and its ASR"]
    assert table["draw"].tolist() == ["dev000-patch-fm"] and bool(table["bites"].iloc[0])
    assert table["trigger parameters"].iloc[0] == "size=3, color=255/0/0"


def test_a_clean_draw_keeps_the_trigger_and_drops_the_attack():
    fm, clean = zoo.draw(7, "fm"), zoo.draw(7, "clean")
    assert clean.overrides["backdoor"] == fm.overrides["backdoor"] and clean.overrides["seed"] == fm.overrides["seed"]
    assert clean.overrides["attack"] == {"name": "none", "params": {}} and clean.label == f"dev007-{fm.family}-clean"


def test_natural_asr_comes_from_the_draws_clean_cell_and_marks_unreachable_draws():
    rows = [{**_cell("u1", "none", 90, 60, "u1"), "zoo": "dev000-patch-fm"},
            {**_cell("d1", "x", 5, 59, "u1"), "zoo": "dev000-patch-fm"},
            {**_cell("c1", "none", 2, 61, "c1", attack="none"), "zoo": "dev000-patch-clean"},
            {**_cell("u2", "none", 95, 60, "u2"), "zoo": "dev001-blend-fm"},
            {**_cell("d2", "x", 25, 60, "u2"), "zoo": "dev001-blend-fm"},
            {**_cell("c2", "none", 30, 61, "c2", attack="none"), "zoo": "dev001-blend-clean"},
            {**_cell("u3", "none", 80, 60, "u3", attack="scaling"), "zoo": "dev002-warp-classic"},  # no clean cell
            {**_cell("d3", "x", 5, 60, "u3", attack="scaling"), "zoo": "dev002-warp-classic"}]
    cells = pd.DataFrame(rows)
    cells["acc_drop_vs_undefended"] = cells["undefended_key"].map(cells.set_index("key")["acc"]) - cells["acc"]
    done = zoo_cells(cells).set_index("key")
    assert "c1" not in done.index and "c2" not in done.index  # a clean cell is no attack of the zoo
    assert done["natural_asr"].dropna().to_dict() == {"u1": 2, "d1": 2, "u2": 30, "d2": 30}
    assert done.loc["d1", "reachable"] and not done.loc["d2", "reachable"] and not done.loc["d2", "passes"]
    table = next(iter(zoo_tables(cells).values())).set_index(["defense", "threat"])
    assert table.loc[("x", "fm"), "reachable"] == 1 and table.loc[("x", "fm"), "pass rate, reachable (%)"] == 100.0
    assert table.loc[("x", "fm"), "pass rate (%)"] == 50.0 and table.loc[("x", "fm"), "natural ASR measured"] == 2
    assert table.loc[("x", "classic"), "natural ASR measured"] == 0 and table.loc[("x", "classic"), "reachable"] == 0
    draws = zoo_tables(cells)["Zoo: every undefended draw, its parameters and its ASR"]
    assert draws.set_index("draw")["natural ASR"].dropna().to_dict() == {"dev000-patch-fm": 2, "dev001-blend-fm": 30}


@pytest.mark.parametrize("script", ["dev.round_trace", "dev.vouch_diagnostic"])
def test_the_development_diagnostics_refuse_a_test_draw(script, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main(["--draw", "test000-blend-fm"])
    assert stop.value.code == 2 and "development draws only" in capsys.readouterr().err


def test_the_vouch_diagnostic_refuses_a_round_before_the_first(capsys):
    from dev import vouch_diagnostic

    with pytest.raises(SystemExit) as stop:
        vouch_diagnostic.main(["--draw", "dev000-patch-fm", "--round", "0"])
    assert stop.value.code == 2 and "--round must be >= 1" in capsys.readouterr().err
