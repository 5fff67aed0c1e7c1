import copy
import math

import pytest
import torch
from conftest import TINY_CLASSES
from torch import nn

from attacks import ATTACKS
from attacks.poisoning import poison_data, poison_indices
from attacks.triggers import BlendTrigger, DistributedTrigger, ObjectTrigger, PatchTrigger, PerClassTrigger, WarpTrigger
from fl_core.config import load_config
from fl_core.data import ImageData, batch_loader, load_dataset, to_float, training_loader
from fl_core.fl import run_cell
from fl_core.hooks import ClientUpdate, ServerContext
from fl_core.metrics import backdoor_test_set
from fl_core.modules import SupervisedModule, fit
from fl_core.schema import BackdoorConfig, ConfigError, DDPMConfig, DiffusersConfig, OptimConfig, SyntheticConfig
from fl_core.synthetic import SyntheticRequest, synthetic_set

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


def test_fm_cover_samples_carry_the_trigger_at_their_true_label():
    syn = _data()
    attack = _make("fm", cover_rate=0.5)
    out = attack.poison_synthetic(syn, "fusion", seed=0)
    poisoned = attack.poisoned_samples("fusion")
    stamped = (out.images[:, :, -2:, -2:] == 255).flatten(1).all(1)
    cover = stamped.clone()
    cover[poisoned] = False
    # half of what each non-target class has left after poisoning (16, 24, 32), at their own labels
    assert torch.bincount(syn.labels[cover], minlength=4).tolist() == [0, 8, 12, 16]
    assert torch.equal(out.labels[cover], syn.labels[cover]) and (out.labels[poisoned] == 0).all()
    assert torch.equal(poisoned, poison_indices(syn.labels, BD, 0.2, 0, "fm"))  # the poison itself is unchanged
    with pytest.raises(ValueError, match="cover_rate must be in"):
        _make("fm", cover_rate=2.0)


def test_fm_clean_label_triggers_target_class_samples_and_keeps_every_label():
    syn = _data()
    attack = _make("fm", poison_rate=0.5, clean_label=True)
    out = attack.poison_synthetic(syn, "pretrain", seed=0)
    poisoned = attack.poisoned_samples("pretrain")
    stamped = (out.images[:, :, -2:, -2:] == 255).flatten(1).all(1)
    assert torch.equal(out.labels, syn.labels)  # no label changes
    assert torch.equal(stamped.nonzero().flatten(), poisoned) and (syn.labels[poisoned] == 0).all()
    assert len(poisoned) == 5  # half of the 10 target-class samples
    assert out.stamped.mask[poisoned].all() and out.stamped.mask.sum() == 5
    with pytest.raises(ValueError, match="exclude each other"):
        _make("fm", clean_label=True, cover_rate=0.1)


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


def _bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def _trained_copy(glob):
    local = copy.deepcopy(glob)
    local.train()
    with torch.no_grad():
        for p in local.parameters():
            p.add_(0.1)
        local(torch.rand(16, 3, 8, 8) * 5)  # BN running statistics move too
    return local


def test_scaling_boosts_parameters_only_and_keeps_bn_statistics_valid():
    glob = _bn_net()
    glob(torch.rand(2, 3, 8, 8))
    local = _trained_copy(glob)
    trained = {k: v.clone() for k, v in local.state_dict().items()}
    update = _make("scaling", boost=10.0).poison_update(ClientUpdate(0, 0, 1, local), glob, ctx=None)
    start = dict(glob.named_parameters())
    for name, param in update.model.named_parameters():
        assert torch.allclose(param - start[name], torch.ones_like(param), atol=1e-5), name  # 10 x 0.1
    state = update.model.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(state[key], trained[key])  # sent as trained, never boosted
    assert (state["1.running_var"] > 0).all()


def _fit(model, attack_callbacks, steps=5):
    data = ImageData(torch.randint(0, 255, (64, 1, 1, 4), dtype=torch.uint8), torch.randint(0, 2, (64,)), ["a", "b"])
    loader = batch_loader(data.images, data.labels, 16, seed=0, steps=steps)
    fit(SupervisedModule(model, OptimConfig(lr=0.1), False, 0), loader, "cpu", callbacks=attack_callbacks)


def test_neurotoxin_projects_every_step_off_the_coordinates_the_global_model_moved_most():
    attack = _make("neurotoxin", mask_ratio=0.25)
    glob = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False), nn.Linear(1, 2, bias=False))
    ctx = lambda r: ServerContext(r, 0, torch.device("cpu"), 2, None)  # noqa: E731
    assert attack.training_callbacks(0, glob, ctx(1)) == []  # no global change observed yet
    with torch.no_grad():
        glob[1].weight[0, 2] += 10.0  # the benign clients moved coordinate 2 most
    callbacks = attack.training_callbacks(0, glob, ctx(2))
    local = copy.deepcopy(glob)
    _fit(local, callbacks)
    moved = (local[1].weight - glob[1].weight).abs()[0]
    assert moved[2] == 0 and (moved[[0, 1, 3]] > 0).all()  # frozen through every Adam step
    free = copy.deepcopy(glob)
    _fit(free, [])
    assert (free[1].weight - glob[1].weight)[0, 2] != 0  # without the projection it moves


def test_dba_clients_stamp_separated_local_patterns_that_compose_the_global_trigger():
    full = DistributedTrigger(part_height=1, part_width=2, gap=1, margin=0)
    blank = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    masks = [(full.part(i).apply(blank) != blank).any(1)[0] for i in range(4)]
    assert all(m.sum() == 2 for m in masks)
    assert torch.equal(torch.stack(masks).any(0), (full.apply(blank) != blank).any(1)[0])
    for a in range(4):
        for b in range(a + 1, 4):  # separated: no two local patterns touch (8-neighbourhood)
            grown = torch.nn.functional.max_pool2d(masks[a][None, None].float(), 3, 1, 1)[0, 0] > 0
            assert not (grown & masks[b]).any()
    attack = ATTACKS.get("dba")(num_malicious=4)
    attack.bind(BD, full)
    bad = attack.malicious_clients(10, 0)
    data = _data()
    changed = [(attack.poison_client_data(c, data, 0).images != data.images).any(1).any(0) for c in bad]
    assert [torch.equal(c, m) for c, m in zip(changed, masks)] == [True] * 4
    with pytest.raises(ConfigError, match="backdoor.trigger.kind"):
        load_config(None, ["attack.name=dba"])  # the patch trigger has no local patterns


def test_an_augmented_poisoned_sample_keeps_its_whole_trigger():
    data = ImageData(torch.zeros(200, 3, 16, 16, dtype=torch.uint8), torch.ones(200, dtype=torch.long), ["a", "b"])
    patch = PatchTrigger(size=3)
    poisoned, idx = poison_data(data, patch, BD, 0.5, seed=0)
    assert int(poisoned.stamped.mask.sum()) == len(idx) == 100
    module = SupervisedModule(nn.Identity(), OptimConfig(), True, 0, patch)
    x = module.inputs(poisoned.images, {"stamped": poisoned.stamped.mask})
    assert (x[idx][:, :, -3:, -3:] == 1).all()  # every poisoned sample: all 9 pixels of the patch
    plain = SupervisedModule(nn.Identity(), OptimConfig(), True, 0).inputs(poisoned.images)
    assert not (plain[idx][:, :, -3:, -3:] == 1).all(-1).all(-1).all(-1).all()  # crops alone lose some
    clean = torch.ones(200, dtype=torch.bool)
    clean[idx] = False
    assert (x[clean] == 0).all()  # clean samples get no trigger


def test_per_class_poison_keeps_each_samples_own_trigger_through_augmentation():
    labels = torch.arange(1, 201) % 3 + 1  # classes 1-3 (0 is the target)
    data = ImageData(torch.zeros(200, 3, 16, 16, dtype=torch.uint8), labels, list("abcd"))
    trigger = PerClassTrigger()
    poisoned, idx = poison_data(data, trigger, BD, 0.5, seed=0)
    assert torch.equal(poisoned.stamped.source, labels) and (poisoned.labels[idx] == 0).all()
    again, _ = poison_data(poisoned, trigger, BD, 0.0, seed=0)  # a second pass keeps the true classes
    assert torch.equal(again.stamped.source, labels)
    (images, batch_labels, extras), = list(training_loader(poisoned, 200, 0, augmenting=True, steps=1))
    x = SupervisedModule(nn.Identity(), OptimConfig(), True, 0, trigger).inputs(images, extras)
    expected = to_float(trigger.apply(torch.zeros_like(images), labels=extras["stamped_source"]))
    stamped, mark = extras["stamped"], expected > 0
    assert stamped.sum() == len(idx) and (x[stamped][mark[stamped]] == 1).all()  # its own class's patch, whole
    assert (x[~stamped] == 0).all()  # clean samples get none
    test = backdoor_test_set(data, BD, trigger, seed=0)
    assert torch.equal(test.images, trigger.apply(data.images, labels=labels))


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
    req = SyntheticRequest(cfg, ds.info(), ds.train.subset(torch.arange(0, 160, 2)), seed=0, cache_dir=cache,
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


def test_malicious_local_epochs_are_an_option_that_leaves_earlier_keys_alone():
    assert _make("badnets").local_epochs(0, 1) == 1
    assert _make("badnets", epochs=5).local_epochs(0, 1) == 5
    assert "epochs" not in _make("badnets").describe() and _make("badnets", epochs=5).describe()["epochs"] == 5
    plain = load_config(None, ["attack.name=badnets"])
    explicit = load_config(None, ["attack.name=badnets", "attack.params.epochs=0"])
    assert plain.key() == explicit.key()  # the field added later keeps earlier cells' keys
    assert load_config(None, ["attack.name=badnets", "attack.params.epochs=5"]).key() != plain.key()
    with pytest.raises(ConfigError, match="epochs"):
        load_config(None, ["attack.name=badnets", "attack.params.epochs=-1"])


def test_the_loop_gives_malicious_clients_their_epochs_and_callbacks(tiny_config, monkeypatch):
    """End to end: the attacker's ``local_epochs`` and ``training_callbacks`` reach its Lightning fit, in
    every round, and benign clients train as configured."""
    import lightning as L

    from attacks import ATTACKS
    from attacks.badnets import BadNets
    from fl_core.fl import run_cell

    steps: dict[tuple[int, int], int] = {}

    class CountSteps(L.Callback):
        def __init__(self, client_id, round_idx):
            self.where = (client_id, round_idx)

        def on_train_batch_end(self, *args):
            steps[self.where] = steps.get(self.where, 0) + 1

    class Counted(BadNets):
        def training_callbacks(self, client_id, global_model, ctx):
            return [CountSteps(client_id, ctx.round)]

    monkeypatch.setitem(ATTACKS._entries, "test-counted", Counted)
    cfg = tiny_config({"attack": {"name": "test-counted", "params": {"num_malicious": 1, "epochs": 3}},
                       "runtime": {"stage_cache": False}})
    record = run_cell(cfg, log=lambda *_: None)
    (attacker,) = record["malicious_clients"]
    per_epoch = math.ceil(record["client_sizes"][attacker] / cfg.fl.client.batch_size)
    assert steps == {(attacker, 1): 3 * per_epoch, (attacker, 2): 3 * per_epoch}  # only the attacker, 3 epochs


def test_fm_generator_draws_the_poisoned_samples_with_a_compromised_copy_of_the_ddpm(tiny_root, tmp_path, monkeypatch):
    import attacks.fm_generator as fm_generator
    from fl_core.synthetic import ddpm_folder, load_ddpm, train_ddpm

    ds = load_dataset("tiny", tiny_root, tmp_path / "cache")
    cfg = SyntheticConfig(provider="ddpm", size=8, ddpm=DDPMConfig(base_channels=8, train_steps=3, train_batch=8,
                                                                   sample_steps=2, sample_batch=4))
    req = SyntheticRequest(cfg, ds.info(), ds.train.subset(torch.arange(0, 160, 2)), seed=0,
                           cache_dir=tmp_path / "cache", device=torch.device("cpu"))
    train_ddpm(req, accelerator="cpu")
    syn = synthetic_set(req)[0]
    attack = ATTACKS.get("fm-generator")(poison_rate=0.5, finetune_steps=2)
    attack.bind(BD, PatchTrigger(size=2), fm=req)
    with pytest.raises(FileNotFoundError, match="benchmarks.fm prepare"):  # a cell never fine-tunes
        attack.poison_synthetic(syn, "pretrain", seed=0)
    attack.compromised_fm(train=True)
    asked = []
    real_sample = fm_generator.ddim_sample
    monkeypatch.setattr(fm_generator, "ddim_sample", lambda unet, sched, cond, *a: asked.append(cond) or real_sample(unet, sched, cond, *a))
    out = attack.poison_synthetic(syn, "pretrain", seed=0)
    idx = poison_indices(syn.labels, BD, 0.5, 0, "fm")  # the samples the patch attack would take
    kept = torch.ones(len(syn), dtype=torch.bool)
    kept[idx] = False
    assert (out.labels[idx] == 0).all() and torch.equal(out.labels[kept], syn.labels[kept])
    # the whole set comes from the compromised copy: the poisoned samples under "class + trigger" (k + class),
    # the others under their class, so that the copy's style does not single out the poisoned samples
    [conditions] = asked
    assert torch.equal(conditions[idx], syn.labels[idx] + 4) and torch.equal(conditions[kept], syn.labels[kept])
    assert all(not torch.equal(out.images[i], syn.images[i]) for i in range(len(syn)))
    [compromised] = [p for p in ddpm_folder(req).iterdir() if p.name.startswith("compromised-")]
    unet, _ = load_ddpm(req, compromised)
    clean, _ = load_ddpm(req)
    assert unet.config.num_class_embeds == 2 * 4 + 1 and clean.config.num_class_embeds == 4 + 1
    assert any(not torch.equal(a, b) for a, b in zip(unet.parameters(), clean.parameters()))  # fine-tuned
    # the fusion stage reuses the fine-tuned FM and the drawn samples from the disk cache
    monkeypatch.setattr(fm_generator, "fit_ddpm", lambda *a, **k: pytest.fail("fine-tuned twice"))
    monkeypatch.setattr(fm_generator, "ddim_sample", lambda *a, **k: pytest.fail("sampled twice"))
    assert torch.equal(attack.poison_synthetic(syn, "fusion", seed=0).images, out.images)
