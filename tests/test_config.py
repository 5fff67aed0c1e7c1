import hashlib
import json

import pytest

from fl_core.config import load_config
from fl_core.configfile import deep_merge
from fl_core.schema import UNUSED_PROVIDER_KEY, ConfigError


def test_defaults_validate_and_resolve_setting():
    cfg = load_config(None, ["fl.setting=cross-device"])
    assert (cfg.fl.num_clients, cfg.fl.clients_per_round) == (100, 10)
    cfg = load_config(None, [])
    assert (cfg.fl.num_clients, cfg.fl.clients_per_round) == (10, 10)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"config.fl: unknown key\(s\) roundz; valid keys: .*rounds"):
        load_config(None, ["fl.roundz=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"config.fl.rounds: Input should be a valid integer"):
        load_config(None, ["fl.rounds=three"])


@pytest.mark.parametrize("override, key", [
    ("fl.rounds=0", "fl.rounds"),
    ("fl.clients_per_round=11", "fl.clients_per_round"),
    ("fusion.alpha=1.5", "fusion.alpha"),
    ("data.beta=0", "data.beta"),
    ("data.partition=zipf", "data.partition"),
    ("fl.client.optimizer=lion", "fl.client.optimizer"),
    ("fusion.optim.schedule=step", "fusion.optim.schedule"),
    ("synthetic.size=20000", "synthetic.size"),
    ("backdoor.mapping=one-to-one", "backdoor.source"),
])
def test_impossible_values_say_which_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_plugin_names_list_known_ones():
    with pytest.raises(ConfigError, match=r"unknown attack 'nope'; known: .*none"):
        load_config(None, ["attack.name=nope"])
    with pytest.raises(ConfigError, match=r"unknown defense 'nope'; known: .*none"):
        load_config(None, ["defense.name=nope"])
    with pytest.raises(ConfigError, match=r"model.name: 'vgg99' unknown; valid: cnn"):
        load_config(None, ["model.name=vgg99"])
    with pytest.raises(ConfigError, match=r"synthetic.provider: 'dalle' unknown; valid: ddpm, diffusers, heldout"):
        load_config(None, ["synthetic.provider=dalle"])
    with pytest.raises(ConfigError, match=r"backdoor.trigger: patch position 'middle' unknown"):
        load_config(None, ["backdoor.trigger.params={position: middle}"])


def test_heterogeneous_needs_distillation():
    with pytest.raises(ConfigError, match="fl.fusion"):
        load_config(None, ["fl.fusion=fedavg", "model.prototypes=[{name: cnn}, {name: cnn, width: 0.5}]"])


def test_hash_ignores_runtime_and_tracks_results_keys():
    a = load_config(None, [])
    b = load_config(None, ["runtime.device=cpu", "runtime.cache_dir=/elsewhere", "runtime.threads=1"])
    c = load_config(None, ["seed=1"])
    assert a.key() == b.key() != c.key()
    assert load_config(None, []).key() == a.key()  # stable across loads


def test_fields_added_later_keep_earlier_keys_at_their_default():
    """``schedule`` and ``precision`` postdate committed results: at their default they must not enter the hash."""
    cfg = load_config(None, [])
    plain = cfg.to_dict(with_runtime=False)
    for optim in (plain["fl"]["client"], plain["pretrain"]["optim"], plain["fusion"]["optim"]):
        del optim["schedule"]
    del plain["precision"]
    plain["synthetic"]["ddpm"] = UNUSED_PROVIDER_KEY["ddpm"]  # its defaults changed after publication
    canon = json.dumps(plain, sort_keys=True, default=str)
    assert cfg.key() == hashlib.sha256(canon.encode()).hexdigest()[:12]
    assert load_config(None, ["fusion.optim.schedule=cosine"]).key() != cfg.key()
    assert load_config(None, ["precision=bf16-mixed"]).key() != cfg.key()
    assert load_config(None, ["precision=32"]).key() == cfg.key()


def test_published_keys_stay_and_only_the_provider_in_use_enters_a_key():
    heldout = load_config(None, [])
    assert heldout.key() == "1e0ff29c5743"  # the default cell's key since the first committed results
    assert load_config(None, ["synthetic.ddpm.train_steps=5", "synthetic.diffusers.steps=3"]).key() == heldout.key()
    ddpm = load_config(None, ["synthetic.provider=ddpm"])
    assert len({heldout.key(), ddpm.key(), load_config(None, ["synthetic.provider=ddpm", "synthetic.ddpm.train_steps=5"]).key(),
                load_config(None, ["synthetic.provider=ddpm", "synthetic.ddpm.guidance_scale=2"]).key()}) == 4


def test_a_plugin_parameter_pinned_at_its_pre_publication_value_survives_revalidation():
    """``norm_ratio: null`` (``actaudit``'s behaviour before the parameter existed, left out of keys) must
    stay null when a validated config is serialised and validated again (as a grid worker or a rerun from
    a record does), not turn into the class default 2.0; the key leaves it out either way."""
    from fl_core.config import validate
    from fl_core.schema import CellConfig, from_dict

    pinned = load_config(None, ["defense.name=actaudit", "defense.params={norm_ratio: null}"])
    again = validate(from_dict(CellConfig, pinned.to_dict()))
    assert pinned.defense.params["norm_ratio"] is None and again.defense.params["norm_ratio"] is None
    assert again.key() == pinned.key() != load_config(None, ["defense.name=actaudit"]).key()
    assert "norm_ratio" not in pinned.to_dict(for_key=True)["defense"]["params"]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/file.yaml")


def test_malformed_yaml_names_the_file_or_override(tmp_path):
    bad = tmp_path / "cell.yaml"
    bad.write_text("fl: {rounds: 2\nseed: [")
    with pytest.raises(ConfigError, match=r"cell\.yaml: not valid YAML") as err:
        load_config(bad)
    assert "<unicode string>" not in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'fl\.rounds=\[1': not valid YAML"):
        load_config(None, ["fl.rounds=[1"])


@pytest.mark.parametrize("override, key", [
    ("defense.params.num_byzantine=abc", "defense.params.num_byzantine"),
    ("attack.params.num_malicious=1.5", "attack.params.num_malicious"),
    ("attack.params.poison_rate=half", "attack.params.poison_rate"),
])
def test_plugin_parameters_are_type_checked_before_compute(override, key):
    plugin = ["defense.name=krum"] if override.startswith("defense") else ["attack.name=badnets"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": Input should be a valid|expected a number"):
        load_config(None, plugin + [override])
    assert load_config(None, ["attack.name=badnets", "attack.params.poison_rate=1"]).attack.params["poison_rate"] == 1
    # numeric text (YAML 1.1 reads 1e-1 as a string) is a number
    assert load_config(None, ["attack.name=badnets", "attack.params.poison_rate='0.5'"]).attack.params["poison_rate"] == 0.5


def test_a_merged_config_shares_nothing_with_its_inputs():
    base = {"fl": {"setting": "custom", "client": {"lr": 0.1}}, "axes": [1, 2]}
    update = {"fl": {"rounds": 2}, "model": {"prototypes": [{"name": "cnn"}]}}
    merged = deep_merge(base, update)
    merged["fl"]["setting"] = "cross-silo"  # an override or a grid axis edits the result in place
    merged["fl"]["client"]["lr"] = 1.0
    merged["axes"].append(3)
    merged["model"]["prototypes"][0]["name"] = "resnet"
    assert base == {"fl": {"setting": "custom", "client": {"lr": 0.1}}, "axes": [1, 2]}
    assert update == {"fl": {"rounds": 2}, "model": {"prototypes": [{"name": "cnn"}]}}
