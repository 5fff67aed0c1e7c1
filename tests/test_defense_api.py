"""Defense API v2: aggregation decisions reach fusion, the decision channel and its scores, defense
chains, reputation, enforced ``consumes`` and the seams between fl_core and the plugin packages."""
import subprocess
import sys

import pytest
import torch

import defenses
from fl_core.fl import run_cell
from fl_core.hooks import Defense
from fl_core.schema import ConfigError
from fl_core.updates import deltas


def _quiet(*_):
    return None


@defenses.DEFENSES.register("test-teachers")
class TeacherSpy(Defense):
    """Records the teachers, their weights and parameter-update norms that reach fusion."""

    consumes = frozenset({"updates"})
    seen: list = []

    def on_fusion(self, plan, global_model, ctx):
        norms = deltas(plan.teachers, global_model).norm(dim=1).tolist()
        self.seen.append(([u.client_id for u in plan.teachers], plan.teacher_weights.tolist(), norms))
        return plan


def _run(tiny_config, defense, **extra):
    TeacherSpy.seen.clear()
    cfg = tiny_config({"defense": defense, "fl": {"rounds": 1}, **extra})
    return run_cell(cfg, log=_quiet)


def test_a_client_rejected_by_krum_never_teaches(tiny_config):
    record = _run(tiny_config, [{"name": "krum"}, {"name": "test-teachers"}])
    (teachers, weights, _), = TeacherSpy.seen
    row = record["rounds"][-1]
    assert len(teachers) == 1 and weights == [1.0]  # Krum keeps one update: it alone teaches
    assert row["admitted"] == teachers and sorted(row["rejected"] + teachers) == [0, 1, 2]
    assert record["defense"] == {"name": "krum+test-teachers", "chain": record["defense"]["chain"]}


def test_clipping_and_noise_apply_to_the_teachers(tiny_config):
    _run(tiny_config, [{"name": "normclip", "params": {"max_norm": 0.01}}, {"name": "test-teachers"}])
    (_, _, norms), = TeacherSpy.seen
    assert max(norms) <= 0.01 + 1e-5
    _run(tiny_config, [{"name": "weakdp", "params": {"max_norm": 0.01, "sigma": 0.01}}, {"name": "test-teachers"}])
    (_, _, noisy), = TeacherSpy.seen
    assert min(noisy) > 0.1  # the round's DP noise (sigma 0.01 on every parameter) is in every teacher


def test_decisions_and_client_detection_land_in_the_round_row(tiny_config):
    record = _run(tiny_config, {"name": "krum"}, attack={"name": "badnets", "params": {"num_malicious": 1}})
    row, (bad,) = record["rounds"][-1], record["malicious_clients"]
    assert row["malicious_selected"] == [bad]
    assert set(row["decisions"]["krum_scores"]) == {0, 1, 2}
    assert row["detection_tpr"] == (100.0 if bad in row["rejected"] else 0.0)
    assert row["detection_fpr"] == pytest.approx(100.0 * len([c for c in row["rejected"] if c != bad]) / 2, abs=0.01)


@defenses.DEFENSES.register("test-flag-first")
class FlagFirst(Defense):
    """Leaves the first ``count`` synthetic samples out of fusion (flags them)."""

    def __init__(self, count: int = 5):
        self.count = count

    def on_fusion(self, plan, global_model, ctx):
        plan.keep[: self.count] = False
        return plan


def test_flagged_synthetic_samples_are_scored_against_the_poisoned_ones(tiny_config):
    record = _run(tiny_config, {"name": "test-flag-first", "params": {"count": 10}},
                  attack={"name": "fm", "params": {"poison_rate": 0.5}})
    row = record["rounds"][-1]
    # the runner knows the poisoned indices (the fm attack's seeded choice); the defense never saw them
    from fl_core.fl import FederatedRun, prepare
    from fl_core.plugins import build_plugins

    cfg = tiny_config({"defense": {"name": "test-flag-first", "params": {"count": 10}}, "fl": {"rounds": 1},
                       "attack": {"name": "fm", "params": {"poison_rate": 0.5}}})
    run = FederatedRun(cfg, prepare(cfg), build_plugins(cfg), _quiet)
    truth = set(run.attack.poisoned_samples("fusion").tolist())
    assert not hasattr(run.server_synthetic, "stamped") or run.server_synthetic.stamped is None
    hits = len(truth & set(range(10)))
    assert row["flagged"] == 10 and truth
    assert row["flag_precision"] == pytest.approx(100 * hits / 10, abs=0.01)
    assert row["flag_recall"] == pytest.approx(100 * hits / len(truth), abs=0.01)


@defenses.DEFENSES.register("test-ban")
class BanClient(Defense):
    """A reputation defense: ``client`` may never be sampled."""

    def __init__(self, client: int = 0):
        self.client = client

    def eligible_clients(self, clients, ctx):
        return [c for c in clients if c != self.client]


def test_reputation_excludes_clients_before_sampling(tiny_config):
    attack = {"name": "badnets", "params": {"num_malicious": 1}}
    bad, = _run(tiny_config, {"name": "none"}, attack=attack)["malicious_clients"]
    record = _run(tiny_config, {"name": "test-ban", "params": {"client": bad}}, attack=attack)
    row = record["rounds"][-1]
    assert row["malicious_selected"] == [] and bad not in row["admitted"] and row["detection_tpr"] is None
    assert len(row["admitted"]) == 2


@defenses.DEFENSES.register("test-sneaky")
class Sneaky(Defense):
    """Reads the synthetic set without declaring it."""

    def after_round(self, global_model, prototype, ctx):
        len(ctx.synthetic.images)
        return global_model


@defenses.DEFENSES.register("test-undeclared-updates")
class Undeclared(Defense):
    def aggregate(self, agg, global_model, ctx):
        return agg


def test_consumes_is_enforced(tiny_config):
    with pytest.raises(PermissionError, match="does not declare 'synthetic' in consumes"):
        _run(tiny_config, {"name": "test-sneaky"})
    with pytest.raises(ConfigError, match=r"defense\.name: .*'updates'"):
        tiny_config({"defense": {"name": "test-undeclared-updates"}})


@defenses.DEFENSES.register("test-peek-teachers")
class PeekTeachers(Defense):
    consumes = frozenset({"synthetic"})

    def on_fusion(self, plan, global_model, ctx):
        plan.teachers[0]
        return plan


def test_teachers_are_withheld_from_a_defense_without_updates(tiny_config):
    with pytest.raises(PermissionError, match="plan.teachers"):
        _run(tiny_config, {"name": "test-peek-teachers"})


def test_defense_lists_validate_each_member_and_hash_in_order(tiny_config):
    a = tiny_config({"defense": [{"name": "krum"}, {"name": "median"}]})
    b = tiny_config({"defense": [{"name": "median"}, {"name": "krum"}]})
    assert a.key() != b.key() and [d.name for d in a.defenses()] == ["krum", "median"]
    assert a.defense[0].params == {"num_byzantine": 1, "multi": 1}  # defaults filled in, as for one defense
    with pytest.raises(ConfigError, match=r"defense\[1\]\.name: unknown defense 'nope'; known: .*krum"):
        tiny_config({"defense": [{"name": "krum"}, {"name": "nope"}]})
    with pytest.raises(ConfigError, match="defense: an empty list"):
        tiny_config({"defense": []})
    single = tiny_config({"defense": {"name": "krum"}})
    assert single.defenses()[0].name == "krum"


def test_providers_get_metadata_not_the_dataset(tiny_config):
    from fl_core.fl import prepare

    request = prepare(tiny_config()).synthetic_request()
    assert not hasattr(request.dataset, "test") and not hasattr(request.dataset, "train")
    assert request.dataset.num_classes == 4


def test_fl_core_does_not_import_the_plugin_packages():
    code = ("import sys, fl_core.fl, fl_core.config, fl_core.hooks, fl_core.updates; "
            "assert 'attacks' not in sys.modules and 'defenses' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_chain_of_one_is_the_defense_itself(tiny_config):
    one = run_cell(tiny_config({"defense": {"name": "median"}, "fl": {"rounds": 1}}), log=_quiet)
    chain = run_cell(tiny_config({"defense": [{"name": "median"}], "fl": {"rounds": 1}}), log=_quiet)
    assert one["metrics"] == chain["metrics"] and chain["defense"]["name"] == "median"
    assert torch.isfinite(torch.tensor(one["metrics"]["acc"]))


def test_fusion_honours_label_weights_and_masked_targets():
    from fl_core.data import ImageData, training_loader
    from fl_core.modules import FusionModule, distillation_loss, ensemble_outputs, fit
    from fl_core.schema import FusionConfig, OptimConfig

    gen = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (64, 3, 4, 4), generator=gen).to(torch.uint8), torch.zeros(64).long(),
                     list("abc"))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    with torch.no_grad():
        teacher[1].weight.zero_()
        teacher[1].bias.copy_(torch.tensor([8.0, 0.0, 1.0]))  # the teacher says class 0, then 2
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    cfg = FusionConfig(steps=60, alpha=0.5, temperature=1.0,
                       optim=OptimConfig(optimizer="adam", lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=16))
    mask = torch.zeros(64, 3, dtype=torch.bool)
    mask[:, 0] = True  # class 0 (the label too) masked out of every target, and every label ignored
    targets = ensemble_outputs([teacher], torch.ones(1), data.images)
    loader = training_loader(data, 16, 0, False, steps=60, targets=targets, label_weight=torch.zeros(64),
                             target_mask=mask)
    fit(FusionModule(student, [teacher], torch.ones(1), cfg, seed=0), loader, "cpu")
    with torch.no_grad():
        assert (student(data.images.float() / 255).argmax(-1) == 2).all()  # what the teacher says without class 0
    x, y = torch.randn(4, 3), torch.zeros(4).long()
    t = torch.randn(4, 3)
    assert torch.allclose(distillation_loss(x, t, y, 0.5, 2.0, torch.zeros(4)), distillation_loss(x, t, y, 0.0, 2.0) / 2)


def test_actaudit_refuses_bad_parameters_before_compute(tiny_config):
    with pytest.raises(ConfigError, match="signals 'x' unknown; valid: both, margin, belief"):
        tiny_config({"defense": {"name": "actaudit", "params": {"signals": "x"}}})
    with pytest.raises(ConfigError, match="client_z must be > 0"):
        tiny_config({"defense": {"name": "actaudit", "params": {"client_z": 0}}})
    with pytest.raises(ConfigError, match="norm_ratio must be > 1 .* got 0.5"):
        tiny_config({"defense": {"name": "actaudit", "params": {"norm_ratio": 0.5}}})
    with pytest.raises(ConfigError, match="blur_sigma must be in .* got 0"):
        tiny_config({"defense": {"name": "actaudit", "params": {"blur_sigma": 0}}})
    with pytest.raises(ConfigError, match="occlusion_share must be in .* got 0.3"):
        tiny_config({"defense": {"name": "actaudit", "params": {"occlusion_share": 0.3}}})
    with pytest.raises(ConfigError, match="label_rejection must be in .* got 1.5"):
        tiny_config({"defense": {"name": "actaudit", "params": {"label_rejection": 1.5}}})
    with pytest.raises(ConfigError, match="kept_trim must be in"):
        tiny_config({"defense": {"name": "actaudit", "params": {"kept_trim": 1.5}}})
    with pytest.raises(ConfigError, match="audit_passes must be >= 1"):
        tiny_config({"defense": {"name": "actaudit", "params": {"audit_passes": 0}}})


def test_a_chain_saves_each_members_state_under_its_position():
    from fl_core.hooks import DefenseChain

    class Stateful(Defense):
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"x": torch.tensor(self.value)}

    chain = DefenseChain([Stateful(1.0), Stateful(2.0)])
    assert {k: float(v) for k, v in chain.state_dict().items()} == {"0/x": 1.0, "1/x": 2.0}
    assert DefenseChain([Stateful(3.0)]).state_dict()["x"] == 3.0
    with pytest.raises(ValueError, match="at least one defense"):
        DefenseChain([])
