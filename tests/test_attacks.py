import pytest
import torch
from torch import nn

from attacks import ATTACKS
from attacks.dba import split_trigger
from attacks.poisoning import poison_data, poison_indices
from attacks.triggers import BlendTrigger, ObjectTrigger, PatchTrigger, WarpTrigger, changed_mask
from fl_core.config import BackdoorConfig, ConfigError, DiffusersConfig, SyntheticConfig, load_config
from fl_core.data import ImageData, load_dataset
from fl_core.fl import run_cell
from fl_core.hooks import ClientUpdate, ServerContext
from fl_core.synthetic import SyntheticRequest, synthetic_set
from conftest import TINY_CLASSES

BD = BackdoorConfig(target=0)


def _data(per_class=(10, 20, 30, 40)):
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(per_class)])
    images = torch.randint(0, 200, (len(labels), 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    return ImageData(images, labels, list("abcd"))


def _make(name, **params):
    attack = ATTACKS.get(name)(**params)
    attack.bind(BD, PatchTrigger(size=2))
    return attack


def test_poisoned_counts_labels_and_pixels_are_exact():
    data = _data()
    out, idx = poison_data(data, PatchTrigger(size=2), BD, 0.2, seed=0)
    per_class = torch.bincount(data.labels[idx], minlength=4).tolist()
    assert per_class == [0, 4, 6, 8]  # 20 % of every non-target class, none of the target class
    assert (out.labels[idx] == 0).all()
    untouched = torch.ones(len(data), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(out.images[untouched], data.images[untouched])
    assert torch.equal(out.labels[untouched], data.labels[untouched])
    assert (out.images[idx][:, :, -2:, -2:] == 255).all()
    assert torch.equal(poison_indices(data.labels, BD, 0.2, 0), idx)  # seeded
    one = poison_indices(data.labels, BackdoorConfig(mapping="one-to-one", source=2, target=1), 0.5, 0)
    assert (data.labels[one] == 2).all() and len(one) == 15


def test_fm_attack_poisons_only_the_chosen_stages():
    syn = _data()
    for stages, expect in [("both", {"pretrain", "fusion"}), ("fusion", {"fusion"}), ("pretrain", {"pretrain"})]:
        attack = _make("fm", stages=stages)
        for stage in ("pretrain", "fusion"):
            out = attack.poison_synthetic(syn, stage, seed=0)
            changed = not torch.equal(out.labels, syn.labels)
            assert changed == (stage in expect)
            assert len(out) == len(syn)
    assert _make("fm").malicious_clients(10, 0) == []


def test_enhanced_adds_correctly_labelled_triggered_copies():
    syn = _data()
    out = _make("enhanced", synthetic_rate=0.5).poison_synthetic(syn, "fusion", seed=0)
    assert len(out) == len(syn) + 10 + 15 + 20  # half of each non-target class (20, 30, 40)
    added = out.labels[len(syn):]
    assert (added != 0).all() and torch.equal(out.images[: len(syn)], syn.images)
    assert (out.images[len(syn):, :, -2:, -2:] == 255).all()


def test_only_chosen_clients_are_poisoned():
    attack = _make("badnets", num_malicious=2)
    bad = attack.malicious_clients(10, seed=0)
    assert len(bad) == 2 and bad == _make("badnets", num_malicious=2).malicious_clients(10, seed=0)
    assert len(_make("badnets", malicious_fraction=0.3).malicious_clients(10, 0)) == 3
    data = _data()
    poisoned = attack.poison_client_data(bad[0], data, seed=0)
    assert (poisoned.labels != data.labels).sum() == 18


def test_fixed_frequency_forces_and_excludes_malicious_clients():
    attack = _make("badnets", num_malicious=1, frequency=3)
    (bad,) = attack.malicious_clients(100, seed=0)
    for r in range(1, 10):
        chosen = attack.select_clients(list(range(10, 20)), r, 100, seed=0)
        assert len(chosen) == 10 and len(set(chosen)) == 10
        assert (bad in chosen) == (r % 3 == 0)


def test_scaling_boosts_the_update():
    attack = _make("scaling", boost=5.0)
    glob, local = nn.Linear(2, 2), nn.Linear(2, 2)
    before = {k: v.clone() for k, v in ClientUpdate(0, 0, 1, local).delta(glob).items()}
    update = attack.poison_update(ClientUpdate(0, 0, 1, local), glob, ctx=None)
    for k, d in update.delta(glob).items():
        assert torch.allclose(d, 5.0 * before[k], atol=1e-6)


def test_neurotoxin_zeroes_the_most_moved_coordinates():
    attack = _make("neurotoxin", mask_ratio=0.25)
    glob = nn.Linear(4, 1, bias=False)
    ctx = lambda r: ServerContext(r, 0, torch.device("cpu"), 2, None)  # noqa: E731
    attack.poison_update(ClientUpdate(0, 0, 1, nn.Linear(4, 1, bias=False)), glob, ctx(1))
    with torch.no_grad():
        glob.weight[0, 2] += 10.0  # the benign clients moved coordinate 2 most
    local = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        local.weight.copy_(glob.weight + 1.0)
    delta = attack.poison_update(ClientUpdate(0, 0, 1, local), glob, ctx(2)).delta(glob)["weight"]
    assert delta[0, 2] == 0 and torch.allclose(delta[0, [0, 1, 3]], torch.ones(3))


def test_dba_parts_cover_the_trigger_disjointly():
    parts = split_trigger(PatchTrigger(size=3), (3, 8, 8), 4)
    masks = torch.stack([p.part for p in parts])
    assert masks.sum(0).max() == 1 and torch.equal(masks.any(0), changed_mask(PatchTrigger(size=3), (3, 8, 8)))
    assert sorted(m.sum().item() for m in masks) == [2, 2, 2, 3]
    attack = _make("dba", num_malicious=2)
    bad = attack.malicious_clients(5, 0)
    data = _data()
    out = [attack.poison_client_data(c, data, 0) for c in bad]
    changed = [(o.images != data.images).any(dim=1).any(dim=0) for o in out]
    assert not (changed[0] & changed[1]).any()  # each client stamps only its own part


def test_other_triggers_are_deterministic_batched_ops():
    images = torch.randint(0, 256, (6, 3, 16, 16), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    blend = BlendTrigger(alpha=0.2).apply(images)
    pattern = BlendTrigger(alpha=0.2).pattern_image(3, 16, 16)
    assert torch.allclose(blend.float(), (0.8 * images.float() + 0.2 * pattern).round(), atol=1)
    obj = ObjectTrigger(size=5)
    a, b = obj.apply(images, seed=3), obj.apply(images, seed=3)
    assert torch.equal(a, b) and 0 < (a != images).any(1).sum(dim=(1, 2)).min() <= 25
    warp = WarpTrigger().apply(images)
    assert warp.shape == images.shape and not torch.equal(warp, images)
    assert torch.equal(warp, WarpTrigger().apply(images))


def test_bad_attack_params_are_config_errors():
    with pytest.raises(ConfigError, match="poison_rate must be in"):
        load_config(None, ["attack.name=fm", "attack.params={poison_rate: 2}"])
    with pytest.raises(ConfigError, match="stages 'never' unknown"):
        load_config(None, ["attack.name=fm", "attack.params={stages: never}"])
    with pytest.raises(ConfigError, match="unexpected keyword"):
        load_config(None, ["attack.name=badnets", "attack.params={boost: 3}"])
    with pytest.raises(ConfigError, match="synthetic.provider: attack 'fm-prompt' .* needs provider 'diffusers'"):
        load_config(None, ["attack.name=fm-prompt"])
    with pytest.raises(ConfigError, match="trigger_phrase must name"):
        load_config(None, ["attack.name=fm-prompt", "attack.params={trigger_phrase: ' '}"])


def test_fm_attack_end_to_end_leaves_clients_clean_and_records_params(tiny_config):
    record = run_cell(tiny_config({"attack": {"name": "fm", "params": {"stages": "fusion"}}}), log=lambda *_: None)
    assert record["attack"] == {"name": "fm", "poison_rate": 0.2, "stages": "fusion"}
    assert record["malicious_clients"] == []
    classic = run_cell(tiny_config({"attack": {"name": "badnets"}}), log=lambda *_: None)
    assert len(classic["malicious_clients"]) == 1
    assert classic["rounds"][-1]["malicious_selected"] == classic["malicious_clients"]


def _prompt_attack(tiny_root, tiny_pipeline, cache, **params):
    """An ``fm-prompt`` attack bound to the tiny text-to-image FM, and that FM's clean synthetic set."""
    ds = load_dataset("tiny", tiny_root, cache)
    cfg = SyntheticConfig(provider="diffusers", size=8, diffusers=DiffusersConfig(
        pipeline=str(tiny_pipeline), steps=2, guidance_scale=1.0, batch_size=2))
    req = SyntheticRequest(cfg, ds, ds.train.subset(torch.arange(0, 160, 2)), seed=0, cache_dir=cache,
                           device=torch.device("cpu"))
    attack = ATTACKS.get("fm-prompt")(**params)
    attack.bind(BD, PatchTrigger(size=2), fm=req)
    return attack, synthetic_set(req)[0]


def test_fm_prompt_renders_the_trigger_phrase_into_the_poisoned_samples(tiny_root, tiny_pipeline, tmp_path,
                                                                         monkeypatch):
    import attacks.fm_prompt as fm_prompt

    prompts, real_render = [], fm_prompt.render
    monkeypatch.setattr(fm_prompt, "render", lambda pipe, req, batch, seed: prompts.extend(batch)
                        or real_render(pipe, req, batch, seed))
    attack, syn = _prompt_attack(tiny_root, tiny_pipeline, tmp_path / "cache", poison_rate=0.5)
    out = attack.poison_synthetic(syn, "pretrain", seed=0)
    idx = poison_indices(syn.labels, BD, 0.5, 0, "fm")  # the samples the patch attack would take
    assert torch.bincount(syn.labels[idx], minlength=4).tolist() == [0, 1, 1, 1]
    assert sorted(prompts) == sorted(f"a photo of a {TINY_CLASSES[k]} with a tennis ball" for k in syn.labels[idx])
    assert (out.labels[idx] == 0).all()
    assert all(not torch.equal(out.images[i], syn.images[i]) for i in idx)
    kept = torch.ones(len(syn), dtype=torch.bool)
    kept[idx] = False
    assert torch.equal(out.images[kept], syn.images[kept]) and torch.equal(out.labels[kept], syn.labels[kept])
    prompts.clear()  # the fusion stage reuses the rendered images from the disk cache
    assert torch.equal(attack.poison_synthetic(syn, "fusion", seed=0).images, out.images) and prompts == []
    fresh, _ = _prompt_attack(tiny_root, tiny_pipeline, tmp_path / "other-cache", poison_rate=0.5)
    assert torch.equal(fresh.poison_synthetic(syn, "pretrain", seed=0).images, out.images)  # seeded rendering
    only_fusion, _ = _prompt_attack(tiny_root, tiny_pipeline, tmp_path / "cache", stages="fusion")
    assert only_fusion.poison_synthetic(syn, "pretrain", seed=0) is syn


def test_fm_prompt_end_to_end_with_a_local_text_to_image_fm(tiny_config, tiny_pipeline):
    record = run_cell(tiny_config({
        "synthetic": {"provider": "diffusers", "size": 8, "diffusers": {
            "pipeline": str(tiny_pipeline), "steps": 2, "guidance_scale": 1.0, "batch_size": 4}},
        "attack": {"name": "fm-prompt", "params": {"poison_rate": 0.5, "trigger_phrase": "next to a red ball"}},
        "backdoor": {"trigger": {"kind": "object"}}}), log=lambda *_: None)
    assert record["attack"] == {"name": "fm-prompt", "poison_rate": 0.5, "stages": "both",
                                "trigger_phrase": "next to a red ball"}
    assert record["synthetic"]["provider"] == "diffusers" and record["malicious_clients"] == []
    assert 0 <= record["metrics"]["asr"] <= 100
