"""Each baseline defense on small hand-made update sets with known answers."""
import copy

import pytest
import torch
from torch import nn

from defenses import DEFENSES
from defenses.fltrust import root_update
from fl_core.data import ImageData
from fl_core.hooks import Aggregation, ClientTraining, ClientUpdate, FusionPlan, ServerContext
from fl_core.models import build_model
from fl_core.schema import ModelSpec, OptimConfig
from fl_core.updates import compose_state, deltas, median

GLOBAL = nn.Linear(3, 1, bias=False)
with torch.no_grad():
    GLOBAL.weight.zero_()


def _ctx(round_idx=1, rounds=1, synthetic=None, seed=0, lr=0.05):
    training = ClientTraining(OptimConfig(optimizer="sgd", lr=lr, momentum=0.9, weight_decay=0.0, batch_size=16), 1, True)
    return ServerContext(round_idx, seed, torch.device("cpu"), 4, synthetic, rounds=rounds, client_training=training)


def _updates(vectors, sizes=None):
    out = []
    for i, v in enumerate(vectors):
        m = copy.deepcopy(GLOBAL)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(v, dtype=torch.float).view(1, 3))
        out.append(ClientUpdate(i, 0, (sizes or [1] * len(vectors))[i], m))
    return out


def _start(updates):
    return Aggregation(updates, torch.ones(len(updates)))


def _decide(name, vectors, ctx=None, **params) -> Aggregation:
    return DEFENSES.get(name)(**params).aggregate(_start(_updates(vectors)), GLOBAL, ctx or _ctx())


def _aggregate(name, vectors, ctx=None, **params):
    from fl_core.updates import fedavg_of

    agg = _decide(name, vectors, ctx, **params)
    return (agg.state if agg.state is not None else fedavg_of(agg))["weight"].flatten()


def test_krum_picks_the_central_update():
    vectors = [[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [50, 50, 50]]
    assert torch.equal(_aggregate("krum", vectors), torch.zeros(3))
    multi = _aggregate("krum", vectors, multi=-1)  # n - f = 5 best: everything but the outlier
    assert torch.allclose(multi, torch.zeros(3))
    assert [u.client_id for u in _decide("krum", vectors).updates] == [0]  # only the kept update teaches


def test_multi_krum_averages_the_best_scored_updates():
    # scores 11, 16, 59, 15, 37, 25: Multi-Krum (m = 3) keeps 0, 3, 1; repeating Krum would pick 0, 1, 2
    vectors = [[-2, 2, 0], [-1, 0, 0], [3, -2, 0], [-2, 0, 0], [2, 1, 0], [-3, 3, 0]]
    agg = _decide("krum", vectors, multi=3)
    assert [u.client_id for u in agg.updates] == [0, 1, 3]
    assert torch.allclose(agg.state["weight"].flatten(), torch.tensor([-5 / 3, 2 / 3, 0]))


def test_median_and_trimmed_mean_per_coordinate():
    vectors = [[1, 10, 0], [2, 20, 0], [3, 30, 0], [4, 40, 0], [100, -100, 9]]
    assert torch.equal(_aggregate("median", vectors), torch.tensor([3.0, 20.0, 0.0]))
    even = [[1, 10, 0], [2, 20, 0], [3, 30, 0], [4, 40, 0]]  # the mean of the two middle values
    assert torch.equal(_aggregate("median", even), torch.tensor([2.5, 25.0, 0.0]))
    # beta 0.2 of 5 clients drops 1 lowest and 1 highest per coordinate
    assert torch.allclose(_aggregate("trimmedmean", vectors, beta=0.2), torch.tensor([3.0, 20.0, 0.0]))


def test_true_median_is_unbiased_for_an_even_count():
    values = torch.randn(10, 100_000, generator=torch.Generator().manual_seed(0))
    assert abs(float(median(values, dim=0).mean())) < 0.01  # torch.median (lower middle) gives about -0.12


def test_bulyan_ignores_the_outlier():
    vectors = [[1, 1, 1], [1.1, 0.9, 1], [0.9, 1.1, 1], [1, 1, 1.1], [1, 1, 0.9], [1.05, 1, 1], [-40, 40, 90]]
    assert torch.allclose(_aggregate("bulyan", vectors), torch.ones(3), atol=0.1)
    assert 6 not in [u.client_id for u in _decide("bulyan", vectors).updates]


def test_bulyan_averages_the_values_closest_to_the_median():
    from defenses.bulyan import closest_to_median_mean

    column = torch.tensor([[0.0], [0.1], [0.2], [5.0], [6.0]])
    assert closest_to_median_mean(column, 3).item() == pytest.approx(0.1)  # a trimmed mean gives 1.77


def test_norm_clipping_bounds_norms():
    out = _aggregate("normclip", [[3, 4, 0], [0, 0, 0.5]], max_norm=1.0)
    assert torch.allclose(out, torch.tensor([0.3, 0.4, 0.25]))
    adaptive = _decide("normclip", [[3, 4, 0], [0, 0, 1], [0, 2, 0]])  # median norm 2
    assert [round(float(u.model.weight.detach().norm()), 4) for u in adaptive.updates] == [2.0, 1.0, 2.0]  # teachers clipped


def test_weak_dp_noise_is_seeded_and_sized():
    vectors = [[0, 0, 0]] * 3
    a = _aggregate("weakdp", vectors, sigma=0.5)
    assert torch.equal(a, _aggregate("weakdp", vectors, sigma=0.5))
    assert not torch.equal(a, _aggregate("weakdp", vectors, ctx=_ctx(seed=1), sigma=0.5))
    assert 0 < a.abs().max() < 3


def test_flame_excludes_the_opposite_update():
    benign = [[1, 1, 0.1 * i] for i in range(6)]
    agg = _decide("flame", benign + [[-5, -5, 0]], noise_lambda=0.0)
    admitted = [u.client_id for u in agg.updates]
    assert 6 not in admitted and len(admitted) >= 4  # a majority cluster, without the outlier
    noisy = _decide("flame", benign + [[-5, -5, 0]], noise_lambda=0.1)
    clean = {u.client_id: u.model.weight.clone() for u in agg.updates}
    assert all(not torch.equal(u.model.weight, clean[u.client_id]) for u in noisy.updates)  # teachers noised


def test_foolsgold_down_weights_sybils():
    vectors = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, -1, 0.5], [5, 5, 5], [5, 5, 5]]
    weights = _decide("foolsgold", vectors).weights
    assert weights[4] == weights[5] == 0.0  # weight 0: no say in the average, no teaching
    assert weights[:4].min() > 0.5


def test_rlr_flips_the_learning_rate_where_agreement_is_low():
    vectors = [[1, 1, 0], [1, -1, 0], [1, 1, 0], [1, -1, 0], [1, 1, 0]]
    out = _aggregate("rlr", vectors, threshold=4)
    assert torch.allclose(out, torch.tensor([1.0, -0.2, 0.0]))  # coordinate 1: |sum of signs| = 1 < 4


def _tiny_synthetic(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 3, 32, 32), generator=gen).to(torch.uint8),
                     torch.randint(0, 4, (n,), generator=gen), list("abcd"))


def _cnn(width=0.25):
    torch.manual_seed(0)
    return build_model(ModelSpec(width=width), 3, 4, (0.5,) * 3, (0.25,) * 3)


def test_fltrust_trusts_the_root_direction_only():
    model, ctx = _cnn(), _ctx(synthetic=_tiny_synthetic())
    ft, syn = DEFENSES.get("fltrust")(root_steps=3), ctx.synthetic
    g0 = root_update(model, ctx, [32], syn.images, syn.labels, root_steps=3)
    ups = []
    for vec in (2 * g0, -g0):
        m = copy.deepcopy(model)
        m.load_state_dict(compose_state(model, vec, []))
        ups.append(ClientUpdate(len(ups), 0, 1, m))
    agg = ft.aggregate(_start(ups), model, ctx)
    assert agg.weights[0] == pytest.approx(1.0, abs=1e-4) and agg.weights[1] == 0.0
    assert agg.teachers() == {0: pytest.approx(1.0, abs=1e-4)}  # the distrusted client does not teach
    new = copy.deepcopy(model)
    new.load_state_dict(agg.state)
    assert torch.allclose(deltas([ClientUpdate(0, 0, 1, new)], model)[0], g0, atol=1e-4)


def test_fltrust_trains_the_server_like_the_clients():
    model, syn = _cnn(), _tiny_synthetic()
    assert deltas([ClientUpdate(0, 0, 1, model)], model).abs().sum() == 0
    frozen = root_update(model, _ctx(synthetic=syn, lr=0.0), [32, 32], syn.images, syn.labels)  # the clients' lr 0
    assert frozen.abs().max() == 0
    moving = root_update(model, _ctx(synthetic=syn, lr=0.05), [32, 32], syn.images, syn.labels)
    assert moving.abs().max() > 0


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_parameter_statistics_ignore_batchnorm_buffers():
    glob = _bn_model()
    ups = []
    for i in range(4):
        m = copy.deepcopy(glob)
        with torch.no_grad():
            m[0].weight += 0.01 * (i + 1)  # a small parameter update
            m[1].running_var += 1000.0 * (i + 1)  # huge, varied BN statistics
            m[1].running_mean -= 500.0 * (i + 1)
        ups.append(ClientUpdate(i, 0, 1, m))
    matrix = deltas(ups, glob)
    assert matrix.shape[1] == sum(p.numel() for p in glob.parameters())
    assert torch.allclose(matrix.norm(dim=1), torch.tensor([0.01, 0.02, 0.03, 0.04]) * 12 ** 0.5, atol=1e-5)
    agg = DEFENSES.get("rlr")(threshold=4).aggregate(_start(ups), glob, _ctx())
    assert (agg.state["1.running_var"] > 0).all()  # buffers averaged, never sign-flipped
    assert torch.allclose(agg.state["1.running_var"], torch.full((4,), 1 + 2500.0))
    clipped = DEFENSES.get("normclip")(max_norm=1.0).aggregate(_start(ups), glob, _ctx())
    assert torch.allclose(clipped.updates[3].model[0].weight, glob[0].weight + 0.04)  # not clipped: norm 0.14


def test_pruning_removes_the_planted_dormant_channel():
    model, ctx = _cnn(), _ctx(synthetic=_tiny_synthetic())
    site = list(model.activation_sites())[-1]
    bn = model.get_submodule(site.rsplit(".", 1)[0])[1]
    with torch.no_grad():
        bn.weight[5], bn.bias[5] = 0.0, -5.0  # channel 5 never fires: dormant
    pruning = DEFENSES.get("pruning")(rate=1 / 32)
    pruning.after_round(model, 0, ctx)
    assert pruning._pruned[0] == [5]
    assert bn.weight[5] == 0 and bn.bias[5] == 0  # pruned in the weights: saved and broadcast with them
    assert not model.get_submodule(site)._forward_hooks
    fresh = _cnn()
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_pruning_the_last_resnet_site_zeroes_the_classifier_columns():
    from defenses.pruning import prune_channels

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="resnet8", width=0.125), 3, 4, (0.5,) * 3, (0.25,) * 3)
    site = list(model.activation_sites())[-1]
    assert prune_channels(model, site, torch.tensor([1, 2]), 32) == "classifier"
    assert model.net[-1].weight[:, [1, 2]].abs().sum() == 0


def test_clp_zeroes_the_channel_with_an_abnormal_lipschitz_bound():
    model = _cnn(width=1.0)  # 32 channels: with 8, no channel can sit 3 std above the mean
    conv = model.net[0][0]
    with torch.no_grad():
        conv.weight[3] *= 100
    clp = DEFENSES.get("clp")(u=3.0)
    clp.after_round(model, 0, _ctx(round_idx=1, rounds=2))  # once, after the last round (the paper's schedule)
    assert model.net[0][1].weight[3] != 0
    clp.after_round(model, 0, _ctx(round_idx=2, rounds=2))
    bn = model.net[0][1]
    assert bn.weight[3] == 0 and bn.bias[3] == 0 and clp._pruned[0] >= 1
    assert (bn.weight != 0).sum() >= 30  # the normal channels of that layer survive


def test_finetune_changes_only_at_the_final_round():
    model, syn = _cnn(), _tiny_synthetic()
    before = copy.deepcopy(model.state_dict())
    ft = DEFENSES.get("finetune")(steps=2)
    ft.after_round(model, 0, _ctx(round_idx=1, rounds=2, synthetic=syn))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ft.after_round(model, 0, _ctx(round_idx=2, rounds=2, synthetic=syn))
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Constant(nn.Module):
    def forward(self, x):
        return torch.tensor([0.0, 0.0, 0.0, 9.0]).expand(len(x), 4)


def _plan(teachers, syn):
    return FusionPlan(0, teachers, torch.ones(len(teachers)), torch.ones(len(syn), dtype=torch.bool))


def test_teacher_filter_drops_the_deviating_teacher():
    good = _cnn()
    teachers = [ClientUpdate(i, 0, 1, good) for i in range(4)] + [ClientUpdate(4, 1, 1, _Constant())]
    syn = _tiny_synthetic()
    out = DEFENSES.get("teacherfilter")().on_fusion(_plan(teachers, syn), good, _ctx(synthetic=syn))
    assert out.teacher_weights.tolist() == [1, 1, 1, 1, 0]
    soft = DEFENSES.get("teacherfilter")(mode="downweight").on_fusion(_plan(teachers, syn), good, _ctx(synthetic=syn))
    assert soft.teacher_weights[4] < 1 and torch.equal(soft.teacher_weights[:4], torch.ones(4))


class _Brightness(nn.Module):
    """Class 0 for every image, or class 3 for bright images if ``deviant``."""

    def __init__(self, deviant):
        super().__init__()
        self.deviant = deviant

    def forward(self, x):
        bright = (x.flatten(1).mean(1) > 0.5) & self.deviant
        return torch.nn.functional.one_hot(torch.where(bright, 3, 0), 4).float()


def test_teacher_filter_probes_a_random_sample_of_a_class_ordered_set():
    # a class-ordered set: the deviant teacher differs only on the later (bright) classes, which the
    # first probe_size samples would never show
    images = torch.cat([torch.zeros(32, 3, 8, 8), torch.full((32, 3, 8, 8), 255.0)]).to(torch.uint8)
    syn = ImageData(images, torch.arange(64) // 16, list("abcd"))
    teachers = [ClientUpdate(i, 0, 1, _Brightness(False)) for i in range(4)] + [ClientUpdate(4, 0, 1, _Brightness(True))]
    out = DEFENSES.get("teacherfilter")(probe_size=32).on_fusion(_plan(teachers, syn), teachers[0].model,
                                                               _ctx(synthetic=syn))
    assert out.teacher_weights.tolist() == [1, 1, 1, 1, 0]


@pytest.mark.parametrize("name", ["normclip", "krum", "median", "flame", "pruning", "clp", "teacherfilter", "fltrust",
                                  "actaudit"])
def test_defenses_run_in_the_fl_loop(tiny_config, name):
    from fl_core.fl import run_cell

    record = run_cell(tiny_config({"defense": {"name": name}, "fl": {"rounds": 1}}), log=lambda *_: None)
    assert record["defense"]["name"] == name and record["rounds"][-1]["defense_seconds"] >= 0


@pytest.mark.parametrize("name", ["pruning", "clp", "finetune", "fineprune"])
def test_repair_schedule_is_validated(name):
    from fl_core.config import load_config
    from fl_core.schema import ConfigError

    with pytest.raises(ConfigError, match="when 'sometimes' unknown; valid: final, every"):
        load_config(None, [f"defense.name={name}", "defense.params={when: sometimes}"])
