"""The paper's defense on a toy model with a planted large-activation backdoor neuron."""
import copy

import pytest
import torch
from torch import nn

from defenses import DEFENSES
from fl_core.data import ImageData
from fl_core.hooks import FusionPlan, ServerContext, describe
from fl_core.metrics import predict
from fl_core.models import ActivationSite, Classifier


def toy_backdoored_model() -> Classifier:
    """Channels 0-2 copy the colour channels; channel 3 fires only on white pixels and votes hard for class 0."""
    conv, head = _colour_copying_layers(1)
    with torch.no_grad():
        conv.weight[3] = 1.0
        conv.bias[3] = -2.5
        head.weight[0, 3] = 3000.0
    net = nn.Sequential(conv, ActivationSite(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return Classifier(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ["net.1"])


def _colour_copying_layers(kernel: int) -> tuple[nn.Conv2d, nn.Linear]:
    """A conv whose channels 0-2 copy the colour channels (channel 3 left at zero) and a head voting for
    the dominant colour: the clean part of the toy models."""
    conv, head = nn.Conv2d(3, 4, kernel, padding=kernel // 2), nn.Linear(4, 3)
    with torch.no_grad():
        for layer in (conv, head):
            layer.weight.zero_()
            layer.bias.zero_()
        for k in range(3):
            conv.weight[k, k, kernel // 2, kernel // 2] = 1.0
            head.weight[k, k] = 10.0
    return conv, head


def toy_data(n=300, seed=0, trigger=False):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = torch.randint(0, 120, (n, 3, 8, 8), generator=gen)
    brightness = torch.randint(40, 121, (n, 1, 1), generator=gen)
    images[torch.arange(n), labels] += brightness  # the label's colour dominates; no pixel is white
    if trigger:
        images[:, :, -2:, -2:] = 255
    return ImageData(images.to(torch.uint8), labels, ["r", "g", "b"])


def _ctx(syn, round_idx=1):
    return ServerContext(round_idx, 0, torch.device("cpu"), 3, syn, rounds=3)


def _asr(model):
    triggered = toy_data(200, seed=5, trigger=True)
    keep = triggered.labels != 0
    return float((predict(model, triggered.images[keep], 100, torch.device("cpu")) == 0).float().mean())


def _agreement(model, reference, data):
    return float((predict(model, data.images, 100, torch.device("cpu"))
                  == predict(reference, data.images, 100, torch.device("cpu"))).float().mean())


def test_bounds_remove_the_planted_backdoor_without_touching_weights():
    model, syn = toy_backdoored_model(), toy_data()
    reference = copy.deepcopy(model)
    assert _asr(model) == 1.0
    defense = DEFENSES.get("actbound")(steps=200, lr=0.1, target_agreement=0.95, trim=0.0)
    defense.after_round(model, 0, _ctx(syn))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert _asr(model) < 0.1
    assert _agreement(model, reference, toy_data(300, seed=9)) >= 0.9
    fit = defense._log[-1]
    assert fit["agreement"] >= 0.95 and fit["penalty"] < 1.0  # bounds shrank while outputs were kept
    defense.detach()
    assert _asr(model) == 1.0 and not model.net[1]._forward_hooks  # removed cleanly


def test_clamps_sit_where_configured_and_state_carries_across_rounds():
    model, syn = toy_backdoored_model(), toy_data()
    defense = DEFENSES.get("actbound")(steps=20, refine_steps=5, sites=["net.1"], shape="element")
    defense.after_round(model, 0, _ctx(syn, 1))
    state = defense._states[0]
    assert list(state.owners) == ["net.1"] and len(model.net[1]._forward_hooks) == 1
    assert state.theta["net.1"].shape == (4, 8, 8)  # per element
    after_first = state.theta["net.1"].clone()
    defense.before_round(model, 0, _ctx(syn, 2))
    assert not state.enabled  # clients receive the unbounded model unless broadcast
    defense.after_round(model, 0, _ctx(syn, 2))
    assert defense._states[0] is state and len(model.net[1]._forward_hooks) == 1
    assert defense._log[-1]["steps"] == 5 and not torch.equal(after_first, state.theta["net.1"])
    assert state.enabled


def test_broadcast_bounds_reach_client_copies_only_when_asked():
    for broadcast in (False, True):
        model, syn = toy_backdoored_model(), toy_data()
        defense = DEFENSES.get("actbound")(steps=100, lr=0.1, broadcast=broadcast)
        defense.after_round(model, 0, _ctx(syn))
        defense.before_round(model, 0, _ctx(syn, 2))
        client = copy.deepcopy(model)
        assert (_asr(client) < 0.1) == broadcast


def test_activation_filter_flags_triggered_synthetic_samples():
    model = toy_backdoored_model()
    clean, poisoned = toy_data(270), toy_data(30, seed=3, trigger=True)
    syn = ImageData(torch.cat([clean.images, poisoned.images]), torch.cat([clean.labels, torch.zeros(30).long()]),
                    clean.classes)
    defense = DEFENSES.get("actbound")(filter="activation", steps=5)
    ctx = _ctx(syn)
    plan = defense.on_fusion(FusionPlan(0, [], torch.ones(0), torch.ones(300, dtype=torch.bool)), model, ctx)
    flagged = defense._flagged[0]
    assert flagged[270:].all() and flagged[:270].float().mean() < 0.1
    assert torch.equal(plan.keep, ~flagged)  # left out of fusion
    assert ctx.decisions["flagged_synthetic"] == flagged.nonzero().flatten().tolist()


def test_fits_are_deterministic():
    bounds = []
    for _ in range(2):
        model = toy_backdoored_model()
        defense = DEFENSES.get("actbound")(steps=30)
        defense.after_round(model, 0, _ctx(toy_data()))
        bounds.append(defense.state_dict()["0/net.1/upper"])
    assert torch.equal(bounds[0], bounds[1])


def test_runs_in_the_fl_loop_with_fusion_and_broadcast_options(tiny_config):
    from fl_core.fl import run_cell

    params = {"steps": 5, "refine_steps": 2, "during_fusion": True, "broadcast": True, "filter": "activation"}
    record = run_cell(tiny_config({"defense": {"name": "actbound", "params": params}}), log=lambda *_: None)
    fits = record["defense"]["fits"]
    assert [f["round"] for f in fits] == [1, 2] and fits[1]["steps"] == 2


def test_activation_evidence_plot_from_a_saved_cell(tiny_config, tiny_root, tmp_path, capsys):
    from dev.activations import main
    from fl_core.fl import run_cell

    cfg = tiny_config({"defense": {"name": "actbound", "params": {"steps": 5}}, "fl": {"rounds": 1},
                       "data": {"test_size": 24}})  # scored on 24 of the 40 test images
    record = run_cell(cfg, tmp_path / "cell", log=lambda *_: None)
    saved = torch.load(tmp_path / "cell" / "models" / "defense.pt", weights_only=True)
    assert any(k.endswith("/upper") for k in saved)
    assert main([str(tmp_path / "cell"), "--data-root", str(tiny_root), "--samples", "20"]) == 0
    bounded_metrics = capsys.readouterr().out.split("with them ")[1].split()[0:5:2]
    assert bounded_metrics == [f"{record['metrics'][k]:.2f}" for k in ("acc", "asr", "ra")]  # as the run scored it
    assert (tmp_path / "cell" / "activations.png").stat().st_size > 0


def test_robust_init_ignores_a_triggered_minority():
    model = toy_backdoored_model()
    clean, poisoned = toy_data(240), toy_data(60, seed=3, trigger=True)
    images = torch.cat([clean.images, poisoned.images])
    robust = DEFENSES.get("actbound")(init="robust").initial_bounds(model, images)[0]["net.1"]
    quantile = DEFENSES.get("actbound")().initial_bounds(model, images)[0]["net.1"]
    assert robust[3] < 0.01 < quantile[3]  # the trigger channel: silent for the clean majority
    assert (robust[:3] > 0.5).all()  # colour channels keep their clean range


def test_per_element_robust_init_bounds_each_position_by_its_clean_majority():
    model = toy_backdoored_model()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 240, (300, 3, 8, 8), generator=gen).to(torch.uint8)
    images[:, :, -2:, -2:] = torch.randint(0, 50, (300, 3, 2, 2), generator=gen).to(torch.uint8)  # a dark corner
    images[:60, :, -2:, -2:] = 255  # a triggered minority
    bounds = DEFENSES.get("actbound")(init="robust", shape="element").initial_bounds(model, images)[0]["net.1"]
    assert bounds.shape == (4, 8, 8)
    assert (bounds[:3, -2:, -2:] < 0.6).all() and (bounds[:3, :2, :2] > 1.0).all()  # the trigger (1.0) is above


def test_a_fit_that_never_meets_the_target_falls_back_to_fresh_bounds():
    model, syn = toy_backdoored_model(), toy_data()
    reference = copy.deepcopy(model)
    defense = DEFENSES.get("actbound")(steps=50, refine_steps=1, lr=0.1, trim=0.0)
    defense.after_round(model, 0, _ctx(syn))
    state = defense._states[0]
    for theta in state.theta.values():
        theta.fill_(-20.0)  # a warm start far too tight (as for a global model that changed a lot)
    info = defense.fit(model, state, syn.images, 1, (0, 2))
    assert info["fallback"] == 1.0 and info["agreement"] >= 0.95
    fresh = defense.initial_bounds(reference, syn.images)[0]["net.1"]
    assert torch.allclose(state.upper("net.1"), fresh)
    defense.detach()


def test_a_failed_warm_start_with_retry_fresh_fits_again_from_fresh_bounds():
    model, syn = toy_backdoored_model(), toy_data()
    defense = DEFENSES.get("actbound")(steps=50, refine_steps=1, lr=0.1, trim=0.0, retry_fresh=True)
    defense.after_round(model, 0, _ctx(syn))
    state = defense._states[0]
    for theta in state.theta.values():
        theta.fill_(-20.0)
    fresh = defense.initial_bounds(copy.deepcopy(model), syn.images)[0]["net.1"]
    info = defense.fit(model, state, syn.images, 1, (0, 2))
    assert info["fallback"] == 1.0 and info["fresh_fallback"] == 0.0 and info["agreement"] >= 0.95
    assert (state.upper("net.1") < fresh).any()  # fitted down from the fresh bounds, not left at them
    defense.detach()


def test_class_margins_and_the_margin_term_suppress_the_backdoor_signature():
    from defenses.actbound import class_margins, max_margin_inputs
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert torch.allclose(class_margins(logits, torch.tensor([0, 0])), torch.tensor([1.0, -5.0]))

    def reachable_target_margin(model):
        probes = torch.rand((8, 3, 8, 8), generator=torch.Generator().manual_seed(3))
        classes = torch.zeros(8, dtype=torch.long)
        climbed = max_margin_inputs(model, probes, classes, 30, 0.05)
        assert climbed.min() >= 0 and climbed.max() <= 1
        with torch.no_grad():
            return (float(class_margins(model(probes), classes).mean()),
                    float(class_margins(model(climbed), classes).mean()))

    model = toy_backdoored_model()
    reference = copy.deepcopy(model)
    start, before = reachable_target_margin(model)
    assert before > 40 > start  # noise climbs to a large class-0 margin through the planted neuron
    defense = DEFENSES.get("actbound")(steps=100, lr=0.1, trim=0.0, margin_weight=1.0)
    defense.after_round(model, 0, _ctx(toy_data()))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert reachable_target_margin(model)[1] < 0.1 * before
    assert defense._log[-1]["agreement"] >= 0.95 and _asr(model) < 0.1


def _poisoned_toy_set():
    clean, poisoned = toy_data(270), toy_data(30, seed=3, trigger=True)
    return clean, ImageData(torch.cat([clean.images, poisoned.images]),
                            torch.cat([clean.labels, torch.zeros(30).long()]), clean.classes)


def test_audit_flags_poisoned_samples_and_corrects_their_targets():
    from fl_core.hooks import ClientUpdate

    model, (_, syn) = toy_backdoored_model(), _poisoned_toy_set()
    forgot = copy.deepcopy(model)  # clean local training erased the trigger neuron's vote
    with torch.no_grad():
        forgot.net[4].weight[0, 3] = 0.0
    teachers = [ClientUpdate(i, 0, 10, copy.deepcopy(forgot)) for i in range(2)] + [ClientUpdate(2, 0, 10, copy.deepcopy(model))]
    defense = DEFENSES.get("actaudit")(steps=200, lr=0.1, constrain_teachers=True, target_agreement=0.95)
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    plan = defense.on_fusion(FusionPlan(0, teachers, torch.ones(3), torch.ones(300, dtype=torch.bool)), model, ctx)
    flagged = defense._flagged[0]
    assert flagged[270:].float().mean() >= 0.9 and flagged[:270].float().mean() < 0.05
    assert torch.equal(plan.label_weight, (~flagged).float())
    assert plan.target_mask[270:, 0][flagged[270:]].all() and not plan.target_mask[~flagged].any()
    assert ctx.decisions["flagged_synthetic"] == flagged.nonzero().flatten().tolist()
    # teachers are clamped while the server distils (the backdoored one loses its trigger), released afterwards
    assert _asr(teachers[2].model) < 0.1 and len(defense._teacher_handles) == 3
    assert ctx.decisions["student_bounded"] == 1.0  # the student too, though bounded_student defaults to false
    defense.after_round(model, 0, ctx)
    assert not defense._teacher_handles and _asr(teachers[2].model) > 0.9


def test_constrained_aggregation_rejects_a_client_with_an_abnormal_bound_divergence():
    from fl_core.hooks import Aggregation, ClientUpdate

    model, syn = toy_backdoored_model(), toy_data()
    with torch.no_grad():
        model.net[4].weight[0, 3] = 0.0  # a clean global model
    defense = DEFENSES.get("actaudit")(steps=100, lr=0.1)
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)  # the first bounds, fitted on the model the clients receive
    updates = []
    for i in range(5):
        local = copy.deepcopy(model)
        with torch.no_grad():
            local.net[0].bias.add_(0.05 * (i - 2))  # small benign drifts
        updates.append(ClientUpdate(i, 0, 10, local))
    with torch.no_grad():  # a replacement-style update: saturated, confidently the target whatever the bounds do
        updates[4].model.net[4].bias[0] = 1000.0
    agg = defense.aggregate(Aggregation(updates, torch.ones(5)), model, ctx)
    assert [u.client_id for u in agg.updates] == [0, 1, 2, 3]
    divergence = ctx.decisions["bound_divergence"]
    assert divergence[4] < 1e-3 < min(divergence[i] for i in range(4))


@pytest.mark.parametrize("norm_ratio", [None, 2.0])
def test_norm_rule_refuses_a_boosted_update_whose_bound_divergence_looks_benign(norm_ratio):
    from fl_core.hooks import Aggregation, ClientUpdate

    model, syn = toy_backdoored_model(), toy_data()
    defense = DEFENSES.get("actaudit")(steps=100, lr=0.1, norm_ratio=norm_ratio, client_z=1e6)  # divergence rule off
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    generator = torch.Generator().manual_seed(0)
    updates = []
    for i in range(6):
        local = copy.deepcopy(model)
        with torch.no_grad():
            for param in local.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
            if i == 5:  # model replacement: the trained-minus-global parameters boosted by 3.33
                for param, start in zip(local.parameters(), model.parameters()):
                    param.copy_(start + 3.33 * (param - start))
        updates.append(ClientUpdate(i, 0, 10, local))
    agg = defense.aggregate(Aggregation(updates, torch.ones(6)), model, ctx)
    admitted = [u.client_id for u in agg.updates]
    if norm_ratio is None:
        assert admitted == list(range(6)) and "update_norm_ratio" not in ctx.decisions
    else:
        assert admitted == list(range(5))
        ratios = ctx.decisions["update_norm_ratio"]
        assert ratios[5] > 3 and max(ratios[i] for i in range(5)) < 1.1  # the boost against benign drifts


def _audited_round(model, syn, **params):
    from fl_core.hooks import ClientUpdate

    defense = DEFENSES.get("actaudit")(steps=200, lr=0.1, target_agreement=0.95, **params)
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    teachers = [ClientUpdate(i, 0, 10, copy.deepcopy(model)) for i in range(3)]
    defense.on_fusion(FusionPlan(0, teachers, torch.ones(3), torch.ones(len(syn), dtype=torch.bool)), model, ctx)
    flagged = defense._flagged[0].clone()
    defense.after_round(model, 0, ctx)
    return defense, flagged


def test_kept_bounds_fitted_untrimmed_on_the_audited_set_keep_clean_predictions():
    clean, syn = _poisoned_toy_set()
    trimmed, untrimmed = toy_backdoored_model(), toy_backdoored_model()
    _audited_round(trimmed, syn, deploy_bounds=True)  # kept bounds trimmed like the audit's: free to break a quarter of a batch
    _, flagged = _audited_round(untrimmed, syn, kept_trim=0.0, deploy_bounds=True)
    assert flagged[270:].all() and not flagged[:270].any()
    assert _agreement(trimmed, toy_backdoored_model(), clean) < 0.9
    assert _agreement(untrimmed, toy_backdoored_model(), clean) >= 0.95 and _asr(untrimmed) < 0.1


def test_later_audit_passes_add_to_the_first_pass_flags():
    _, syn = _poisoned_toy_set()
    _, once = _audited_round(toy_backdoored_model(), syn)
    _, thrice = _audited_round(toy_backdoored_model(), syn, audit_passes=3)
    assert once[270:].all() and torch.equal(thrice & once, once) and thrice.sum() > once.sum()


@pytest.mark.parametrize("bounded_student, clean_set, expected", [
    (None, False, True),  # the second default: clamped in a round whose audit flagged and refitted
    (None, True, False),  # nothing flagged, no refit: the student distils unclamped
    ("default", False, False),  # the fourth selection's default: never clamped
    (False, False, False), (True, True, True)])
def test_the_student_distils_under_its_bounds_as_bounded_student_says(bounded_student, clean_set, expected):
    from fl_core.hooks import ClientUpdate

    model, (clean, poisoned) = toy_backdoored_model(), _poisoned_toy_set()
    syn = clean if clean_set else poisoned
    chosen = {} if bounded_student == "default" else {"bounded_student": bounded_student}
    defense = DEFENSES.get("actaudit")(steps=200, lr=0.1, target_agreement=0.95, audit_z=3.0 if not clean_set else 1e6,
                                       **chosen)
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    teachers = [ClientUpdate(i, 0, 10, copy.deepcopy(model)) for i in range(3)]
    defense.on_fusion(FusionPlan(0, teachers, torch.ones(3), torch.ones(len(syn), dtype=torch.bool)), model, ctx)
    assert defense._states[0].enabled is expected and ctx.decisions["student_bounded"] == float(expected)
    assert (_asr(model) < 0.5) is expected  # the clamps act on its forward passes just then (free: > 0.9)


def test_weights_alone_are_deployed_with_the_same_bounds_kept_for_the_audit():
    _, syn = _poisoned_toy_set()
    deployed, alone = toy_backdoored_model(), toy_backdoored_model()
    with_bounds, _ = _audited_round(deployed, syn, deploy_bounds=True)
    without, _ = _audited_round(alone, syn)  # the fifth selection's default
    assert _asr(deployed) < 0.1 and _asr(alone) > 0.9  # the toy backdoor lives in the weights
    kept, fitted = with_bounds.state_dict(), without.state_dict()
    assert kept.keys() == fitted.keys() and all(torch.equal(kept[k], fitted[k]) for k in kept)
    assert "deploy_bounds" not in describe(with_bounds) and describe(without)["deploy_bounds"] is False


def test_a_flip_only_audit_keeps_samples_whose_bounded_prediction_keeps_the_label():
    model, (_, syn) = toy_backdoored_model(), _poisoned_toy_set()
    defense = DEFENSES.get("actaudit")(steps=200, lr=0.1, target_agreement=0.95, blur_sigma=None)  # bounds alone
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    flags, _ = defense.audit(model, 0, [], ctx)
    defense.require_flip = True
    flipped, _ = defense.audit(model, 0, [], ctx)
    state = defense._states[0]
    state.enabled = True
    keeps_label = predict(model, syn.images, 100, torch.device("cpu")) == syn.labels
    state.enabled = False
    assert flags.sum() >= 30 and torch.equal(flipped, flags & ~keeps_label)


def test_a_margin_cut_keeps_flags_whose_label_margin_the_bounds_cut_by_that_share():
    from defenses.actbound import class_margins
    from fl_core.metrics import logits

    model, (_, syn) = toy_backdoored_model(), _poisoned_toy_set()
    defense = DEFENSES.get("actaudit")(steps=200, lr=0.1, target_agreement=0.95, audit_z=1.0, margin_cut=0.0,
                                       blur_sigma=None)  # the bounds' signal alone
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    flags, _ = defense.audit(model, 0, [], ctx)  # the robust z alone
    defense.margin_cut = 1.0  # the toy's bounds cut nearly every margin to ~0: keep only those cut through
    cut, _ = defense.audit(model, 0, [], ctx)
    state, cpu = defense._states[0], torch.device("cpu")
    free = class_margins(logits(model, syn.images, 100, cpu), syn.labels)
    state.enabled = True
    bounded = class_margins(logits(model, syn.images, 100, cpu), syn.labels)
    state.enabled = False
    assert 0 < cut.sum() < flags.sum() and torch.equal(cut, flags & (free - bounded >= free.abs()))
    with pytest.raises(ValueError, match="margin_cut"):
        DEFENSES.get("actaudit")(margin_cut=1.5)


def toy_blend_model() -> Classifier:
    """Channels 0-2 copy the colour channels; channel 3 fires on a pixel-level checkerboard (a global,
    high-frequency trigger, as blend's noise) and votes hard for class 0."""
    conv, head = _colour_copying_layers(3)
    checker = (torch.arange(3)[:, None] + torch.arange(3)[None, :]) % 2 * 2.0 - 1.0
    with torch.no_grad():
        conv.weight[3] = checker / 27
        conv.bias[3] = -0.08
        head.weight[0, 3] = 1000.0
    net = nn.Sequential(conv, nn.ReLU(), ActivationSite(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return Classifier(net, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ["net.2"])


def _blended_toy_set():
    clean, poisoned = toy_data(270), toy_data(30, seed=3)
    h, w = poisoned.images.shape[-2:]
    checker = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2 - 1) * 40
    triggered = (poisoned.images.int() + checker).clamp(0, 255).to(torch.uint8)
    return ImageData(torch.cat([clean.images, triggered]), torch.cat([clean.labels, torch.zeros(30).long()]),
                     clean.classes)


@pytest.mark.parametrize("blur_sigma", [None, 0.5])
def test_a_blur_audit_flags_samples_whose_label_a_slight_blur_removes(blur_sigma):
    model, syn = toy_blend_model(), _blended_toy_set()
    assert (predict(model, syn.images[270:], 100, torch.device("cpu")) == 0).all()  # the trigger works
    # the belief signal without teachers scores nothing: the blur is the only signal here
    defense = DEFENSES.get("actaudit")(steps=50, lr=0.1, signals="belief", blur_sigma=blur_sigma)
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    flags, summary = defense.audit(model, 0, [], ctx)
    if blur_sigma is None:
        assert not flags.any() and "blur_flags" not in summary
    else:
        assert flags[270:].float().mean() >= 0.9 and flags[:270].float().mean() <= 0.02
        assert summary["blur_flags"] == int(flags.sum())
    with pytest.raises(ValueError, match="blur_sigma"):
        DEFENSES.get("actaudit")(blur_sigma=0.0)


@pytest.mark.parametrize("occlusion_share, known, expect_spread", [
    (0.9, 60, True), (None, 60, False), (0.9, 40, False)])  # off; or too few flags to estimate a trigger from
def test_an_occlusion_audit_spreads_earlier_flags_to_the_rest_of_a_stamped_trigger_poison(
        occlusion_share, known, expect_spread):
    clean, poisoned = toy_data(200), toy_data(100, seed=3, trigger=True)
    syn = ImageData(torch.cat([clean.images, poisoned.images]), torch.cat([clean.labels, torch.zeros(100).long()]),
                    clean.classes)
    # the belief signal without teachers scores nothing and the blur is off: earlier flags and the occlusion only
    defense = DEFENSES.get("actaudit")(steps=50, lr=0.1, signals="belief", blur_sigma=None,
                                       occlusion_share=occlusion_share)
    ctx = _ctx(syn)
    defense.before_round(toy_backdoored_model(), 0, ctx)
    defense._flagged[0] = torch.zeros(300, dtype=torch.bool)
    defense._flagged[0][200:200 + known] = True  # an earlier round's flags: part of the poison
    flags, summary = defense.audit(toy_backdoored_model(), 0, [], ctx)
    if expect_spread:
        assert summary["occluded_pixels"] == 12  # the 2x2 white patch, 3 channels
        assert flags[200:].float().mean() >= 0.95 and flags[:200].float().mean() <= 0.02
        assert summary["occlusion_flags"] == int(flags.sum())
    else:
        assert not flags.any() and "occlusion_flags" not in summary
    with pytest.raises(ValueError, match="occlusion_share"):
        DEFENSES.get("actaudit")(occlusion_share=0.3)


@pytest.mark.parametrize("label_rejection, teachers_forget, expect", [
    (0.5, True, [0]), (None, True, None), (0.5, False, []), (0.7, True, [])])  # off; nothing forgotten; share < 0.7
def test_a_label_whose_samples_the_clients_stop_believing_has_those_samples_flagged(
        label_rejection, teachers_forget, expect):
    from defenses.actaudit import label_probability

    clean, triggered = toy_data(200), toy_data(200, seed=3, trigger=True)
    poisoned = triggered.images[triggered.labels != 0][:100]  # other classes' images, relabelled to 0
    syn = ImageData(torch.cat([clean.images, poisoned]), torch.cat([clean.labels, torch.zeros(100).long()]),
                    clean.classes)  # label 0: ~67 clean samples and the 100 poisoned ones (60 %)
    model, local = toy_backdoored_model(), toy_backdoored_model()
    if teachers_forget:  # clean local training erased the trigger's vote
        with torch.no_grad():
            local.net[4].weight[0, 3] = 0.0
    defense = DEFENSES.get("actaudit")(steps=50, lr=0.1, blur_sigma=None, occlusion_share=None,
                                       label_rejection=label_rejection)
    ctx = _ctx(syn)
    defense.before_round(model, 0, ctx)
    _, summary = defense.audit(model, 0, [local, copy.deepcopy(local)], ctx)
    if expect is None:
        assert "rejected_labels" not in summary
        return
    assert summary["rejected_labels"] == expect
    assert summary.get("rejection_flags", 0) == (100 if expect else 0)
    after = label_probability([local], syn.images, syn.labels, torch.device("cpu"))
    flags, _ = defense.rejection_audit(defense._broadcast[0], after, syn.labels, 3)
    assert not flags[:200].any() and (flags[200:].all() if expect else not flags.any())  # the poison, nothing else
    with pytest.raises(ValueError, match="label_rejection"):
        DEFENSES.get("actaudit")(label_rejection=0.0)


def test_rejection_needs_a_majority_of_a_label_and_an_outlier_among_labels():
    defense = DEFENSES.get("actaudit")(label_rejection=0.5)
    labels = torch.arange(10).repeat_interleave(20)  # 10 labels x 20 samples
    belief = torch.full((200,), 0.8)
    after = belief.clone()
    after[:14] = 0.4  # label 0: 70 % of its samples keep at most half the belief (0.4 <= 0.5 * 0.8)
    after[20:28] = 0.39  # label 1: 40 %, an outlier among the labels but no majority
    after[40:42] = 0.41  # label 2: 10 %, just above half the belief: not rejected
    flags, rejected = defense.rejection_audit(belief, after, labels, 10)
    assert rejected == [0] and flags.nonzero().flatten().tolist() == list(range(14))
    after[60:80] = 0.1  # label 3 rejected entirely, as label 0: each still an outlier among ten labels
    assert defense.rejection_audit(belief, after, labels, 10)[1] == [0, 3]
    after[:] = 0.3  # every label rejected: none stands out among the labels, nothing flagged
    flags, rejected = defense.rejection_audit(belief, after, labels, 10)
    assert rejected == [] and not flags.any()


def test_shared_pixels_are_the_flagged_images_common_value_that_the_set_lacks():
    from defenses.actaudit import shared_pixels

    images = torch.zeros(100, 1, 4, 4, dtype=torch.uint8)  # a background every image shares
    images[:, 0, 0] = (torch.arange(100) * 2).to(torch.uint8)[:, None]  # a row that varies
    images[:40, 0, 3, 3] = 250  # a stamp on the first 40, 3 of them flagged ones off by more than the tolerance
    images[:3, 0, 3, 3] = 200
    flags = torch.zeros(100, dtype=torch.bool)
    flags[:40] = True
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 3, 3] = True
    assert torch.equal(shared_pixels(images, flags, 0.9), expected)
    assert not shared_pixels(images, flags, 0.95).any()  # 37 of 40 hold it: below that share


def test_filter_diagnostic_scores_the_filter_against_the_attack_ground_truth(tiny_root, tmp_path, capsys):
    import yaml

    from dev.filter_diagnostic import main
    from fl_core.configfile import deep_merge
    from tests.conftest import TINY_OVERRIDES

    cfg = deep_merge(TINY_OVERRIDES, {"runtime": {"data_root": str(tiny_root), "cache_dir": str(tmp_path / "cache"),
                                                  "progress": False}, "synthetic": {"size": 40}})
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "cell.yaml"), "--z", "3"]) == 0
    out = capsys.readouterr().out
    assert "of 40 synthetic samples poisoned" in out and "| channel 3.0 |" in out and "| element 3.0 |" in out
    assert "| 0.5 |" in out and "| 0.7 |" in out  # the blur signal's rows, one per default sigma
    assert "| 15% of the poison |" in out and "| 50% of the poison |" in out and "| 100 clean samples |" in out
    with pytest.raises(SystemExit):  # an impossible sigma is refused before any compute
        main(["--config", str(tmp_path / "cell.yaml"), "--sigma", "0"])
    assert "--sigma: blur_sigma must be in (0, 5]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "cell.yaml"), "--given", "0"])
    assert "--given: each share must be in (0, 1]" in capsys.readouterr().err
