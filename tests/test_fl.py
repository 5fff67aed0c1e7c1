import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import defenses
from attacks.triggers import PatchTrigger, PerClassTrigger
from fl_core.data import ImageData, batch_loader
from fl_core.fl import run_cell, sample_clients
from fl_core.hooks import Defense
from fl_core.metrics import backdoor_test_set, evaluate
from fl_core.modules import SupervisedModule, distillation_loss, ensemble_logits, fit
from fl_core.schema import BackdoorConfig, OptimConfig
from fl_core.stages import cpu_model
from fl_core.updates import fedavg


def test_fedavg_is_the_sample_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], [1, 3])  # (1*a + 3*b) / 4
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert out["n"].item() == 3  # integer buffers are taken, not averaged


def test_distillation_loss_terms():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(distillation_loss(s, t, y, alpha=1.0, temperature=3.0), F.cross_entropy(s, y))
    assert distillation_loss(s, s, y, alpha=0.0, temperature=2.0).abs() < 1e-6
    temp = 2.0
    p_t = F.softmax(t / temp, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean()
    expected = 0.3 * F.cross_entropy(s, y) + 0.7 * temp ** 2 * kl
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.3, temperature=temp), expected, atol=1e-6)


def test_ensemble_is_the_weighted_mean_of_logits_or_probs():
    t1, t2 = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)
    w = torch.tensor([1.0, 3.0])
    assert torch.allclose(ensemble_logits([t1, t2], w, x), 0.25 * t1(x) + 0.75 * t2(x), atol=1e-6)
    probs = ensemble_logits([t1, t2], w, x, mode="probs").exp()
    assert torch.allclose(probs, 0.25 * t1(x).softmax(-1) + 0.75 * t2(x).softmax(-1), atol=1e-6)


@pytest.mark.parametrize("schedule, epochs, final_lr", [("constant", 1, 0.1), ("cosine", 1, 0.0), ("cosine", 2, 0.0)])
def test_lr_schedule_anneals_over_the_stage_steps(schedule, epochs, final_lr):
    seen = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    images, labels = torch.zeros(40, 3, 4, 4, dtype=torch.uint8), torch.arange(40) % 2
    module = SupervisedModule(model, OptimConfig(lr=0.1, batch_size=4, schedule=schedule), False, seed=0)
    fit(module, batch_loader(images, labels, 4, seed=0, steps=9), "cpu", max_epochs=epochs, callbacks=[RecordLR()])
    steps = 9 * epochs  # the cosine spans every epoch of the stage, not one
    assert len(seen) == steps and seen[0] == pytest.approx(0.1)
    if schedule == "cosine":  # one step before the end: lr * (1 + cos((steps - 1) pi / steps)) / 2
        assert seen[-1] == pytest.approx(0.1 * (1 + math.cos((steps - 1) * math.pi / steps)) / 2)
        assert all(a > b for a, b in zip(seen, seen[1:]))
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(final_lr, abs=1e-9)


def test_client_sampling_is_seeded():
    everyone = list(range(100))
    a = sample_clients(everyone, 10, seed=0, round_idx=1)
    assert a == sample_clients(everyone, 10, seed=0, round_idx=1) and len(set(a)) == 10
    assert a != sample_clients(everyone, 10, seed=0, round_idx=2)
    assert sample_clients(list(range(10)), 10, seed=0, round_idx=1) == list(range(10))
    # the draw from everyone is the one earlier versions made (choice over the client count)
    from fl_core.seeding import numpy_rng
    assert a == sorted(numpy_rng(0, "sample", 1).choice(100, 10, replace=False).tolist())
    assert set(sample_clients(list(range(50, 100)), 10, seed=0, round_idx=1)) <= set(range(50, 100))


class _Const(nn.Module):
    """Predicts class 0 when the bottom-right pixel is white, else the true class encoded in pixel (0, 0)."""

    def forward(self, x):
        logits = F.one_hot((x[:, 0, 0, 0] * 255).round().long(), 4).float()
        triggered = x[:, 0, -1, -1] > 0.99
        logits[triggered] = F.one_hot(torch.zeros(int(triggered.sum()), dtype=torch.long), 4).float()
        return logits


def test_asr_counts_only_non_target_samples_and_ra():
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    test = ImageData(images, labels, ["a", "b", "c", "d"])
    bset = backdoor_test_set(test, BackdoorConfig(target=0), PatchTrigger(size=1), seed=0)
    assert len(bset.labels) == 5 and (bset.labels != 0).all()
    m = evaluate(_Const(), test, bset, batch_size=4, device=torch.device("cpu"))
    assert m == {"acc": 100.0, "asr": 100.0, "ra": 0.0}
    one = backdoor_test_set(test, BackdoorConfig(mapping="one-to-one", source=2, target=1), PatchTrigger(size=1), 0)
    assert one.labels.tolist() == [2, 2] and one.targets.tolist() == [1, 1]


def test_two_round_smoke_run_writes_a_record(tiny_config, tmp_path):
    cfg = tiny_config()
    record = run_cell(cfg, tmp_path / "cell", log=lambda *_: None)
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    saved = json.loads((tmp_path / "cell" / "record.json").read_text())
    assert saved["key"] == cfg.key() and saved["metrics"] == record["metrics"]
    assert saved["config"]["fl"]["rounds"] == 2 and "runtime" not in saved["config"]
    state = torch.load(tmp_path / "cell" / "models" / "prototype0.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)
    assert record["metrics"]["acc"] > 40  # 4 tinted classes: chance is 25
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["cpu"] and record["versions"]["cpu"] == cpu_model()  # numbers differ across models
    assert cpu_model().endswith(f"({torch.backends.cpu.get_cpu_capability()})")  # and across kernels of one model


def test_cells_are_scored_on_a_seeded_stratified_test_subset(tiny_config):
    from fl_core.fl import scored_test_set

    test = ImageData(torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40) % 4, list("abcd"))
    cfg = tiny_config({"data": {"test_size": 24}})
    subset = scored_test_set(test, cfg)
    assert torch.bincount(subset.labels).tolist() == [6, 6, 6, 6]
    assert torch.equal(subset.labels, scored_test_set(test, cfg).labels)
    assert scored_test_set(test, tiny_config()) is test  # test_size None: all of it


def test_same_config_and_seed_give_identical_metrics(tiny_config):
    # stage cache off: both runs compute every stage (tests/test_stage_cache.py covers the cache)
    runs = [run_cell(tiny_config(overrides=("runtime.stage_cache=false",)), log=lambda *_: None) for _ in range(2)]
    strip = lambda r: [{k: v for k, v in row.items() if "seconds" not in k} for row in r["rounds"]]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    other = run_cell(tiny_config(overrides=("seed=1",)), log=lambda *_: None)
    assert strip(other) != strip(runs[0])


def test_fedavg_mode_without_distillation(tiny_config):
    record = run_cell(tiny_config({"fl": {"fusion": "fedavg", "rounds": 1}}), log=lambda *_: None)
    assert len(record["rounds"]) == 2


def test_heterogeneous_prototypes_report_per_prototype_and_weighted_mean(tiny_config):
    cfg = tiny_config({"model": {"prototypes": [{"name": "cnn", "width": 0.25}, {"name": "cnn", "width": 0.5,
                                                                                   "depth": 3}]}})
    record = run_cell(cfg, log=lambda *_: None)
    last = record["rounds"][-1]
    protos = last["prototypes"]
    assert len(protos) == 2
    # 3 clients: prototype 0 has clients 0 and 2, prototype 1 has client 1
    assert last["acc"] == pytest.approx((2 * protos[0]["acc"] + protos[1]["acc"]) / 3)


@defenses.DEFENSES.register("test-spy")
class SpyDefense(Defense):
    """Records what the server hands a defense; drops client 0's update; halves teacher 1's weight."""

    consumes = frozenset({"updates", "synthetic"})
    seen: list = []

    def filter_update(self, update, global_model, ctx):
        self.seen.append(("filter", ctx.round, update.client_id))
        return None if update.client_id == 0 else update

    def on_fusion(self, plan, global_model, ctx):
        self.seen.append(("fusion", ctx.round, [u.client_id for u in plan.teachers], int(plan.keep.sum()),
                          len(ctx.synthetic)))
        plan.teacher_weights[0] = 0.5
        return plan

    def after_round(self, global_model, prototype, ctx):
        self.seen.append(("after", ctx.round, prototype))
        return global_model


def test_defense_hooks_see_server_data_only_and_can_drop_updates(tiny_config):
    SpyDefense.seen.clear()
    run_cell(tiny_config({"defense": {"name": "test-spy"}, "fl": {"rounds": 1}}), log=lambda *_: None)
    assert ("filter", 1, 0) in SpyDefense.seen and ("filter", 1, 2) in SpyDefense.seen
    assert ("fusion", 1, [1, 2], 20, 20) in SpyDefense.seen  # client 0 dropped; synthetic set of size 20
    assert ("after", 1, 0) in SpyDefense.seen


def test_teacher_outputs_computed_once_equal_the_per_batch_ensemble():
    from fl_core.data import training_loader
    from fl_core.modules import FusionModule, ensemble_outputs
    from fl_core.schema import FusionConfig

    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # noqa: E731
    teachers, weights = [net(), net()], torch.tensor([1.0, 3.0])
    data = ImageData(torch.randint(0, 255, (40, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (40,)), list("abc"))
    students = []
    for precompute in (False, True):
        student = net()
        student.load_state_dict(teachers[0].state_dict())
        targets = ensemble_outputs(teachers, weights, data.images, chunk=7) if precompute else None
        loader = training_loader(data, 8, seed=1, augmenting=False, steps=12, targets=targets)
        fit(FusionModule(student, teachers, weights, FusionConfig(alpha=0.3), seed=2), loader, "cpu")
        students.append(student)
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(students[0][1].weight, teachers[0][1].weight)  # it did train


def test_subsets_and_joins_keep_the_stamped_mask():
    trigger = PatchTrigger(size=1)
    a = ImageData(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4), list("abcd"))
    from fl_core.data import Stamped

    b = ImageData(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.arange(3), list("abcd"),
                  Stamped(trigger, torch.tensor([True, False, True])))
    joined = a.concat(b)
    assert joined.stamped.trigger is trigger
    assert joined.stamped.mask.tolist() == [False] * 4 + [True, False, True]
    assert joined.subset(torch.tensor([6, 0])).stamped.mask.tolist() == [True, False]
    with pytest.raises(ValueError, match="different triggers"):
        b.concat(ImageData(b.images, b.labels, b.classes, Stamped(PatchTrigger(size=2), b.stamped.mask)))
    per_class = PerClassTrigger()  # class-dependent: the true classes travel with the mask
    c = ImageData(b.images, torch.zeros(3, dtype=torch.long), b.classes, Stamped(per_class, b.stamped.mask, b.labels))
    joined = a.concat(c)
    assert joined.stamped.source.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert joined.subset(torch.tensor([5, 1])).stamped.source.tolist() == [1, 1]
    assert a.concat(b).stamped.source is None
    from fl_core.stages import data_digest

    other = ImageData(c.images, c.labels, c.classes, Stamped(per_class, c.stamped.mask, c.labels + 1))
    assert data_digest(other) != data_digest(c)  # the true classes decide the pattern: part of the content
