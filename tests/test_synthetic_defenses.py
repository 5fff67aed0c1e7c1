"""The synthetic-set baselines (spectral signatures, activation clustering, ABL, label-free fusion) on a
hand-made poisoned set, and each one through a tiny FL run under FedDF and FedAvg."""
import copy

import pytest
import torch
from torch import nn

from defenses import DEFENSES
from defenses._synthetic import features_and_logits, retrain
from fl_core import run_cell
from fl_core.data import ImageData
from fl_core.hooks import ClientTraining, FusionPlan, ServerContext
from fl_core.schema import OptimConfig


def poisoned_set(n=200, poisoned=20, seed=0):
    """Label-0 images of low noise; the first ``poisoned`` carry a bright 4x4 corner patch."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 60, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    images[:poisoned, :, :4, :4] = 255
    truth = torch.zeros(n, dtype=torch.bool)
    truth[:poisoned] = True
    return ImageData(images, torch.zeros(n, dtype=torch.long), ["a", "b"]), truth


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 2))


def ctx_for(data, round_idx=1):
    recipe = ClientTraining(OptimConfig(lr=1e-3, batch_size=16), 1, False)
    return ServerContext(round_idx, 0, torch.device("cpu"), 2, data, client_training=recipe, pretraining=recipe)


@pytest.mark.parametrize("name", ["spectral", "actclust"])
def test_feature_space_detectors_find_a_pasted_patch_cluster(name):
    data, truth = poisoned_set()
    flagged = DEFENSES.get(name)().flag(toy_model(), ctx_for(data))
    assert flagged[truth].float().mean() >= 0.9  # recall
    assert flagged.sum() <= 0.15 * len(truth) + 1  # spectral removes 15 %; the cluster is 10 %


def test_activation_clustering_flags_a_cluster_only_up_to_its_relative_size():
    data, _ = poisoned_set()  # the patch cluster is 10 % of the label
    assert not DEFENSES.get("actclust")(max_share=0.05).flag(toy_model(), ctx_for(data)).any()


def test_abl_isolates_the_lowest_loss_samples(monkeypatch):
    data, truth = poisoned_set()
    logits = torch.zeros(len(truth), 2)
    logits[truth, 0] = 9.0  # the fitted backdoor: near-zero loss
    logits[~truth, 0] = torch.linspace(0, 2, int((~truth).sum()))
    monkeypatch.setattr("defenses.abl.features_and_logits", lambda *a, **k: (None, logits))
    flagged = DEFENSES.get("abl")(isolation_rate=0.05).flag(toy_model(), ctx_for(data))
    assert flagged.sum() == 10 and flagged[truth].sum() == 10


def test_abl_unlearning_raises_the_isolated_samples_loss():
    data, truth = poisoned_set()
    model, ctx = toy_model(), ctx_for(data)
    before = nn.functional.cross_entropy(features_and_logits(model, data.images[truth], ctx.device)[1], data.labels[truth])
    DEFENSES.get("abl")(unlearn_epochs=5, lr=0.05).remedy(model, ~truth, ctx)
    after = nn.functional.cross_entropy(features_and_logits(model, data.images[truth], ctx.device)[1], data.labels[truth])
    assert after > before + 0.5


def test_retraining_starts_afresh_and_is_seeded():
    data, truth = poisoned_set()
    a, b, ctx = toy_model(1), toy_model(2), ctx_for(data)
    for model in (a, b):
        retrain(model, data.images[~truth], data.labels[~truth], ctx.pretraining, seed=5, accelerator="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_filter_then_retrain_keeps_flagged_samples_out_of_fusion():
    data, truth = poisoned_set()
    defense, model, ctx = DEFENSES.get("spectral")(), toy_model(), ctx_for(data)
    untouched = copy.deepcopy(model)
    defense.before_round(model, 0, ctx)
    assert defense.changes_broadcast(1) and not defense.changes_broadcast(2)
    assert not torch.equal(model[1].weight, untouched[1].weight)  # re-trained before the broadcast
    plan = defense.on_fusion(FusionPlan(0, [], torch.ones(0), torch.ones(len(truth), dtype=torch.bool)), model, ctx)
    assert (~plan.keep).sum() == len(ctx.decisions["flagged_synthetic"]) > 0


def test_label_free_fusion_drops_every_label_and_the_pre_training():
    data, _ = poisoned_set()
    defense, model = DEFENSES.get("labelfree")(), toy_model()
    untouched = copy.deepcopy(model)
    defense.before_round(model, 0, ctx_for(data, round_idx=2))
    assert torch.equal(model[1].weight, untouched[1].weight)  # only before round 1
    defense.before_round(model, 0, ctx_for(data))
    assert not torch.equal(model[1].weight, untouched[1].weight)
    plan = defense.on_fusion(FusionPlan(0, [], torch.ones(0), torch.ones(len(data), dtype=torch.bool)), model,
                             ctx_for(data))
    assert plan.label_weight.eq(0).all()
    assert not DEFENSES.get("labelfree")(pretrain="keep").changes_broadcast(1)
    with pytest.raises(ValueError, match="pretrain 'never' unknown"):
        DEFENSES.get("labelfree")(pretrain="never")


@pytest.mark.parametrize("name", ["spectral", "actclust", "abl", "labelfree", "consensus", "vouch", "clientvouch"])
@pytest.mark.parametrize("fusion", ["feddf", "fedavg"])
def test_each_baseline_runs_a_cell(name, fusion, tiny_config, tmp_path):
    cfg = tiny_config({"attack": {"name": "fm"}, "defense": {"name": name}, "fl": {"fusion": fusion, "rounds": 1},
                       "runtime": {"logger": "none"}})
    record = run_cell(cfg, log=lambda *_: None)
    assert 0 <= record["metrics"]["asr"] <= 100 and record["defense"]["name"] == name


class PatchReader(nn.Module):
    """Logits from whether the corner patch is there: ``patched`` for patched images, ``clean`` otherwise."""

    def __init__(self, clean, patched):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("clean", torch.tensor(clean, dtype=torch.float))
        self.register_buffer("patched", torch.tensor(patched, dtype=torch.float))

    def forward(self, x):
        bright = (x[:, :, :4, :4].mean((1, 2, 3)) > 0.9)[:, None]
        return self.scale * torch.where(bright, self.patched, self.clean)


def test_consensus_flags_labels_the_clients_do_not_support_and_corrects_them():
    from fl_core.hooks import Aggregation, ClientUpdate

    data, truth = poisoned_set()
    received = PatchReader([5.0, 0.0], [5.0, 0.0])  # learned the poisoned label from the synthetic set
    clients = [ClientUpdate(i, 0, 10, PatchReader([5.0, 0.0], [0.0, 5.0])) for i in range(3)]  # clean training
    defense, ctx = DEFENSES.get("consensus")(), ctx_for(data)
    defense.aggregate(Aggregation(clients, torch.ones(3)), received, ctx)
    assert torch.equal(torch.tensor(ctx.decisions["flagged_synthetic"]), truth.nonzero().flatten())
    plan = defense.on_fusion(FusionPlan(0, clients, torch.ones(3), torch.ones(len(truth), dtype=torch.bool)),
                             received, ctx)
    assert plan.label_weight[truth].eq(0).all() and plan.label_weight[~truth].eq(1).all()
    assert plan.target_mask[truth, 0].all() and not plan.target_mask[~truth].any() and plan.keep.all()
    assert defense.after_round(received, 0, ctx) is received  # fusion ran this round: nothing more


def test_consensus_flags_nothing_where_clients_agree_and_corrects_under_fedavg():
    from fl_core.hooks import Aggregation, ClientUpdate

    data, truth = poisoned_set()
    model = PatchReader([5.0, 0.0], [5.0, 0.0])
    defense, ctx = DEFENSES.get("consensus")(fedavg_steps=3), ctx_for(data)
    defense.aggregate(Aggregation([ClientUpdate(0, 0, 10, copy.deepcopy(model))], torch.ones(1)), model, ctx)
    assert ctx.decisions["flagged_synthetic"] == []
    defense._flagged = truth.clone()  # as a FedAvg round would have it
    before = model.scale.item()
    defense.after_round(model, 0, ctx_for(data, round_idx=2))  # no fusion this round: corrective fine-tuning
    assert model.scale.item() != before


def test_vouch_keeps_labels_out_until_clean_start_clients_vouch_for_them():
    from fl_core.hooks import Aggregation, ClientUpdate

    data, truth = poisoned_set()
    received = PatchReader([5.0, 0.0], [5.0, 0.0])
    clients = [ClientUpdate(i, 0, 10, PatchReader([5.0, 0.0], [0.0, 5.0])) for i in range(3)]
    defense, ctx = DEFENSES.get("vouch")(clip=False, retrain=False), ctx_for(data)
    keep = torch.ones(len(truth), dtype=torch.bool)
    plan = defense.on_fusion(FusionPlan(0, clients, torch.ones(3), keep), received, ctx)
    assert plan.label_weight.eq(0).all()  # nothing vouched yet: pure distillation
    defense.aggregate(Aggregation(clients, torch.ones(3)), received, ctx)
    plan = defense.on_fusion(FusionPlan(0, clients, torch.ones(3), keep.clone()), received, ctx)
    assert torch.equal(torch.tensor(ctx.decisions["flagged_synthetic"]), truth.nonzero().flatten())
    assert plan.label_weight[truth].eq(0).all() and plan.label_weight[~truth].eq(1).all()
    assert DEFENSES.get("vouch")(top_k=2).top_k == 2
    with pytest.raises(ValueError, match="restart"):
        DEFENSES.get("vouch")(restart="half")


def test_vouch_judges_with_every_client_of_the_round_whatever_its_prototype():
    from fl_core.hooks import Aggregation, ClientUpdate

    data, truth = poisoned_set()
    received = PatchReader([5.0, 0.0], [5.0, 0.0])
    fooled = [ClientUpdate(0, 0, 10, PatchReader([5.0, 0.0], [5.0, 0.0]))]  # alone, it vouches for every label
    clean = [ClientUpdate(i, 1, 10, PatchReader([5.0, 0.0], [0.0, 5.0])) for i in (1, 2, 3)]
    defense, ctx = DEFENSES.get("vouch")(clip=False, retrain=False), ctx_for(data)
    defense.aggregate(Aggregation(fooled, torch.ones(1)), received, ctx)
    defense.aggregate(Aggregation(clean, torch.ones(3)), received, ctx)
    for p in (0, 1):  # one judgement, by the four clients' ensemble, for both prototypes
        plan = defense.on_fusion(FusionPlan(p, fooled + clean, torch.ones(4), torch.ones(len(truth), dtype=torch.bool)),
                                 received, ctx)
        assert plan.label_weight[truth].eq(0).all() and plan.label_weight[~truth].eq(1).all()


@pytest.mark.parametrize("params", [{}, {"clip": False, "trust": True},
                                    {"clip": False, "trust": True, "scope": "surplus", "exclude": True,
                                     "fusion_labels": True}])
def test_vouch_runs_on_heterogeneous_prototypes(tiny_config, params):
    # with exclude, half the set poisoned: enough for the tiny judge to suspect the target
    attack = {"name": "fm", "params": {"poison_rate": 0.5}} if params.get("exclude") else {"name": "fm"}
    cfg = tiny_config({"attack": attack, "defense": {"name": "vouch", "params": params}, "fl": {"rounds": 1},
                       "model": {"prototypes": [{"name": "cnn", "width": 0.25}, {"name": "cnn", "width": 0.5}]},
                       "runtime": {"logger": "none"}})
    record = run_cell(cfg, log=lambda *_: None)
    decisions = record["rounds"][-1]["decisions"]
    assert all(0 < decisions[f"prototype{p}"]["vouched"] <= 20 for p in (0, 1))  # each prototype vouches itself
    assert all(("trust" in decisions[f"prototype{p}"]) == bool(params) for p in (0, 1))  # trust weighed per prototype
    if params.get("exclude"):  # one judgement: both prototypes suspect the same classes
        assert decisions["prototype0"]["suspect_classes"] == decisions["prototype1"]["suspect_classes"] == [
            cfg.backdoor.target]


def test_vouch_outlier_classes_flags_the_class_that_collects_rejected_labels():
    from defenses.vouch import outlier_classes

    labels = torch.arange(10).repeat_interleave(300)
    rejected = torch.zeros(3000, dtype=torch.bool)
    for c in range(10):  # a judge that rejects 140-175 labels of every class ...
        rejected[c * 300: c * 300 + 140 + 4 * c] = True
    assert not outlier_classes(labels, rejected, 10).any()
    rejected[7 * 300: 7 * 300 + 280] = True  # ... and 280 of the class a backdoor relabels into
    assert outlier_classes(labels, rejected, 10).nonzero().flatten().tolist() == [7]
    rejected[7 * 300 + 140 + 28: 8 * 300] = False  # back to normal rejections, and a surplus of labels in class 3
    surplus = torch.cat([labels, torch.full((40,), 3)])
    rejected = torch.cat([rejected, torch.zeros(40, dtype=torch.bool)])
    assert not outlier_classes(surplus, rejected, 10).any()
    assert outlier_classes(surplus, rejected, 10, surplus=True).nonzero().flatten().tolist() == [3]


def test_vouch_pairs_flag_the_class_one_source_class_was_relabelled_into():
    from defenses.vouch import outlier_classes

    labels = torch.arange(10).repeat_interleave(300)
    judged = labels.clone()
    for c in range(10):  # a judge that spreads 150-177 rejections of every class over the other classes
        wrong = torch.arange(150 + 3 * c)
        judged[c * 300 + wrong] = (c + 1 + wrong % 9) % 10
    rejected = judged != labels
    assert not outlier_classes(labels, rejected, 10, judged=judged).any()
    judged[4 * 300: 4 * 300 + 60] = 2  # 60 of class 2's images relabelled 4 (one-to-one): per class, no outlier
    rejected = judged != labels
    assert not outlier_classes(labels, rejected, 10).any()
    assert outlier_classes(labels, rejected, 10, judged=judged).nonzero().flatten().tolist() == [4]


def _vouch_retraining_targets(tiny_config, monkeypatch, params: dict, models: list | None = None):
    """A one-round fm cell (half of the set poisoned) defended by ``vouch(**params)``, its retraining stubbed
    out: the config, the vouching round's decisions and the targets the retraining was given (the model it
    trains is appended to ``models``)."""
    import defenses.vouch as vouch

    trained = []
    monkeypatch.setattr(vouch, "batch_loader", lambda images, labels, *a, **k: trained.append(labels) or [])
    monkeypatch.setattr(vouch, "fit", lambda module, *a, **k: None if models is None else models.append(module.model))
    cfg = tiny_config({"attack": {"name": "fm", "params": {"poison_rate": 0.5}}, "fl": {"rounds": 1},
                       "defense": {"name": "vouch", "params": params}, "runtime": {"logger": "none"}})
    record = run_cell(cfg, log=lambda *_: None)
    return cfg, record["rounds"][-1]["decisions"], trained[0]


@pytest.mark.parametrize("name", ["correct", "distil", "exclude"])
def test_vouch_suspect_class_treatments_need_suspect_classes_and_exclude_each_other(name):
    with pytest.raises(ValueError, match=f"{name} needs scope"):
        DEFENSES.get("vouch")(**{name: True})
    other = "correct" if name != "correct" else "distil"
    with pytest.raises(ValueError, match="choose one"):
        DEFENSES.get("vouch")(scope="outliers", **{name: True, other: True})


def test_vouch_distil_gives_the_suspect_class_the_clients_probabilities(tiny_config, monkeypatch):
    cfg, decisions, targets = _vouch_retraining_targets(tiny_config, monkeypatch, {"scope": "surplus", "distil": True})
    assert decisions["suspect_classes"] == [cfg.backdoor.target]
    assert len(targets) == cfg.synthetic.size and torch.allclose(targets.sum(1), torch.ones(len(targets)))
    soft = targets.max(1).values < 1  # every sample of the suspect class, and only those, gets probabilities
    assert soft.sum() == cfg.synthetic.size - decisions["vouched"]


def test_vouch_corrects_the_suspect_class_with_the_clients_labels(tiny_config, monkeypatch):
    cfg, decisions, targets = _vouch_retraining_targets(tiny_config, monkeypatch, {"scope": "surplus", "correct": True})
    assert decisions["suspect_classes"] == [cfg.backdoor.target]  # the relabelled class holds a surplus
    assert decisions["vouched"] < cfg.synthetic.size == len(targets)  # the rejected samples relabelled, not dropped


def test_vouch_asymmetric_pairs_discount_two_way_confusions_and_flag_a_one_way_relabelling():
    from defenses.vouch import outlier_classes

    labels = torch.arange(10).repeat_interleave(300)
    judged = labels.clone()
    for c in range(10):  # a judge that spreads 150-177 rejections of every class over the other classes ...
        wrong = torch.arange(150 + 3 * c)
        judged[c * 300 + wrong] = (c + 1 + wrong % 9) % 10
    for a, b in ((3, 5), (5, 3)):  # ... and confuses classes 3 and 5 both ways (60 of their rejections)
        judged[a * 300: a * 300 + 60] = b
    rejected = judged != labels
    assert outlier_classes(labels, rejected, 10, judged=judged).nonzero().flatten().tolist() == [3, 5]
    assert not outlier_classes(labels, rejected, 10, judged=judged, asymmetric=True).any()
    judged[4 * 300: 4 * 300 + 60] = 2  # 60 of class 2's images relabelled 4 (one-to-one): one way only
    rejected = judged != labels
    assert outlier_classes(labels, rejected, 10, judged=judged, asymmetric=True).nonzero().flatten().tolist() == [4]


def test_vouch_trust_roots_on_the_vouched_samples_once_judged(monkeypatch):
    from fl_core.hooks import Aggregation, ClientUpdate
    import defenses.vouch as vouch

    data, truth = poisoned_set()
    received = PatchReader([5.0, 0.0], [5.0, 0.0])
    clients = [ClientUpdate(i, 0, 10, PatchReader([5.0, 0.0], [0.0, 5.0])) for i in range(3)]
    roots = []
    monkeypatch.setattr(vouch, "root_update", lambda model, ctx, sizes, images, labels: roots.append(images) or 0)
    monkeypatch.setattr(vouch, "trust_aggregate", lambda agg, *a: agg)
    with pytest.raises(ValueError, match="clip: false"):
        DEFENSES.get("vouch")(trust=True)
    defense = DEFENSES.get("vouch")(clip=False, trust=True, retrain=False)
    defense.aggregate(Aggregation(clients, torch.ones(3)), received, ctx_for(data))  # before the judgement
    defense.on_fusion(FusionPlan(0, clients, torch.ones(3), torch.ones(len(truth), dtype=torch.bool)), received,
                      ctx_for(data))  # the vouching round's judgement: the patched samples are rejected
    defense.aggregate(Aggregation(clients, torch.ones(3)), received, ctx_for(data, round_idx=2))
    assert len(roots[0]) == len(truth) and torch.equal(roots[1], data.images[~truth])


@pytest.mark.parametrize("fusion", ["feddf", "fedavg"])
def test_vouch_trust_weighs_a_classic_attack_round_by_round(tiny_config, fusion):
    cfg = tiny_config({"attack": {"name": "scaling", "params": {"num_malicious": 1, "boost": 3.0}},
                       "defense": {"name": "vouch", "params": {"clip": False, "trust": True}},
                       "fl": {"rounds": 2, "fusion": fusion}, "runtime": {"logger": "none"}})
    rounds = run_cell(cfg, log=lambda *_: None)["rounds"]
    for row in rounds[1:]:
        trust = row["decisions"]["trust"]
        assert len(trust) == cfg.fl.clients_per_round and all(0 <= t <= 1 for t in trust.values())


@pytest.mark.parametrize("fresh", [False, True])
def test_vouch_fresh_drops_what_the_vouching_round_taught(tiny_config, monkeypatch, fresh):
    """With ``fresh`` the retraining (stubbed out) starts from a seeded new initialisation, whatever the
    vouching round's clients sent, and no trust is weighed in that round; without it, from the fused model."""
    import defenses.vouch as vouch
    from defenses._synthetic import reinitialise
    from fl_core.seeding import derive_seed

    with pytest.raises(ValueError, match="retrain: true"):
        DEFENSES.get("vouch")(fresh=True, retrain=False)
    starts = []
    monkeypatch.setattr(vouch, "fit", lambda module, *a, **k: starts.append(copy.deepcopy(module.model)))
    cfg = tiny_config({"attack": {"name": "fm"}, "fl": {"rounds": 1}, "runtime": {"logger": "none"},
                       "defense": {"name": "vouch", "params": {"clip": False, "trust": True, "fresh": fresh}}})
    record = run_cell(cfg, log=lambda *_: None)
    assert ("trust" in record["rounds"][-1]["decisions"]) != fresh
    new = copy.deepcopy(starts[-1])
    reinitialise(new, derive_seed(cfg.seed, "vouch-fresh", 0))
    same = all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), starts[-1].state_dict().values()))
    assert same == fresh


@pytest.mark.parametrize("fusion_labels", [False, True])
def test_vouch_exclude_retrains_on_no_label_of_a_suspect_class_and_leaves_its_output_untrained(
        tiny_config, monkeypatch, fusion_labels):
    """No label of the suspect class reaches the retraining, not even a vouched one; with ``fusion_labels``
    its vouched labels still count in fusion (the vouched count holds them)."""
    from defenses.vouch import WithoutClasses

    with pytest.raises(ValueError, match="fusion_labels"):
        DEFENSES.get("vouch")(scope="outliers", fusion_labels=True)
    params = {"scope": "surplus", "exclude": True, "fusion_labels": fusion_labels}
    retrained = []
    cfg, decisions, labels = _vouch_retraining_targets(tiny_config, monkeypatch, params, retrained)
    target = cfg.backdoor.target
    assert decisions["suspect_classes"] == [target] and target not in labels.tolist()
    (model,) = retrained  # the retraining trains the model with the suspect class's output left out
    assert isinstance(model, WithoutClasses) and model.mask.nonzero().flatten().tolist() == [target]
    assert (len(labels) < decisions["vouched"]) == fusion_labels
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    wrapped = WithoutClasses(model, torch.tensor([False, True, False]))
    x = torch.rand(4, 3, 8, 8)
    out = wrapped(x)
    assert (out[:, 1] < -1e3).all() and torch.equal(out[:, [0, 2]], model(x)[:, [0, 2]])
    torch.nn.functional.cross_entropy(out, torch.zeros(4, dtype=torch.long)).backward()
    grad = model[1].weight.grad  # the left-out class's row of the head gets no gradient; the others do
    assert grad[1].abs().max() == 0 and grad[2].abs().max() > 0


def test_clientvouch_computes_what_vouch_computes_with_the_frozen_choices(tiny_config):
    """``clientvouch`` is ``vouch`` with its development choices frozen: the same cell gives the same rounds
    (figures and decisions); only the record's name and parameters differ."""
    frozen = {"scope": "surplus", "aggregation": "trust", "suspect_labels": "fusion"}
    same = {"scope": "surplus", "clip": False, "trust": True, "exclude": True, "fusion_labels": True}
    runs = []
    for name, params in (("clientvouch", frozen), ("vouch", same)):
        cfg = tiny_config({"attack": {"name": "fm", "params": {"poison_rate": 0.5}}, "fl": {"rounds": 2},
                           "defense": {"name": name, "params": params}, "runtime": {"logger": "none"}})
        runs.append(run_cell(cfg, log=lambda *_: None))
    strip = [[{k: v for k, v in r.items() if "seconds" not in k} for r in run["rounds"]]
             for run in runs]
    assert strip[0] == strip[1] and strip[0][1]["decisions"]["suspect_classes"]
    assert runs[0]["config"]["defense"]["name"] == "clientvouch"


@pytest.mark.parametrize("params, message", [({"aggregation": "krum"}, "aggregation 'krum' unknown"),
                                             ({"suspect_labels": "drop"}, "suspect_labels 'drop' unknown"),
                                             ({"scope": "all"}, "scope 'all' has none")])
def test_clientvouch_refuses_bad_choices_by_name(params, message):
    with pytest.raises(ValueError, match=message):
        DEFENSES.get("clientvouch")(**params)


@pytest.mark.parametrize("aggregation, suspect_labels, same", [
    ("clip", "keep", {"clip": True, "trust": False, "exclude": False, "fusion_labels": False}),
    ("mean", "exclude", {"clip": False, "trust": False, "exclude": True, "fusion_labels": False}),
    ("trust", "fusion", {"clip": False, "trust": True, "exclude": True, "fusion_labels": True})])
def test_clientvouch_maps_each_choice_onto_vouch(aggregation, suspect_labels, same):
    """Every value of ``aggregation`` and ``suspect_labels`` builds the ``vouch`` variant it names."""
    frozen = DEFENSES.get("clientvouch")(aggregation=aggregation, suspect_labels=suspect_labels)
    assert frozen._vouch.describe() == DEFENSES.get("vouch")(scope="outliers", **same).describe()
