"""Each baseline defense on small hand-made update sets with known answers."""
import copy

import pytest
import torch
from torch import nn

from defenses import DEFENSES
from fl_core.config import ModelSpec
from fl_core.data import ImageData
from fl_core.hooks import ClientUpdate, FusionPlan, ServerContext
from fl_core.models import build_model
from fl_core.updates import deltas

GLOBAL = nn.Linear(3, 1, bias=False)
with torch.no_grad():
    GLOBAL.weight.zero_()


def _ctx(round_idx=1, rounds=1, synthetic=None, seed=0):
    return ServerContext(round_idx, seed, torch.device("cpu"), 4, synthetic, rounds=rounds)


def _updates(vectors, sizes=None):
    out = []
    for i, v in enumerate(vectors):
        m = copy.deepcopy(GLOBAL)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(v, dtype=torch.float).view(1, 3))
        out.append(ClientUpdate(i, 0, (sizes or [1] * len(vectors))[i], m))
    return out


def _aggregate(name, vectors, ctx=None, **params):
    state = DEFENSES.get(name)(**params).aggregate(_updates(vectors), GLOBAL, ctx or _ctx())
    return state["weight"].flatten()


def test_krum_picks_the_central_update():
    vectors = [[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [50, 50, 50]]
    assert torch.equal(_aggregate("krum", vectors), torch.zeros(3))
    multi = _aggregate("krum", vectors, multi=-1)  # n - f = 5 best: everything but the outlier
    assert torch.allclose(multi, torch.zeros(3))


def test_median_and_trimmed_mean_per_coordinate():
    vectors = [[1, 10, 0], [2, 20, 0], [3, 30, 0], [4, 40, 0], [100, -100, 9]]
    assert torch.equal(_aggregate("median", vectors), torch.tensor([3.0, 20.0, 0.0]))
    # beta 0.2 of 5 clients drops 1 lowest and 1 highest per coordinate
    assert torch.allclose(_aggregate("trimmedmean", vectors, beta=0.2), torch.tensor([3.0, 20.0, 0.0]))


def test_bulyan_ignores_the_outlier():
    vectors = [[1, 1, 1], [1.1, 0.9, 1], [0.9, 1.1, 1], [1, 1, 1.1], [1, 1, 0.9], [1.05, 1, 1], [-40, 40, 90]]
    assert torch.allclose(_aggregate("bulyan", vectors), torch.ones(3), atol=0.1)


def test_norm_clipping_bounds_norms():
    out = _aggregate("normclip", [[3, 4, 0], [0, 0, 0.5]], max_norm=1.0)
    assert torch.allclose(out, torch.tensor([0.3, 0.4, 0.25]))
    adaptive = DEFENSES.get("normclip")()
    assert adaptive.bound(torch.tensor([[3.0, 4, 0], [0, 0, 1], [0, 2, 0]])) == 2.0  # median norm


def test_weak_dp_noise_is_seeded_and_sized():
    vectors = [[0, 0, 0]] * 3
    a = _aggregate("weakdp", vectors, sigma=0.5)
    assert torch.equal(a, _aggregate("weakdp", vectors, sigma=0.5))
    assert not torch.equal(a, _aggregate("weakdp", vectors, ctx=_ctx(seed=1), sigma=0.5))
    assert 0 < a.abs().max() < 3


def test_flame_excludes_the_opposite_update():
    flame = DEFENSES.get("flame")(noise_lambda=0.0)
    benign = [[1, 1, 0.1 * i] for i in range(6)]
    flame.aggregate(_updates(benign + [[-5, -5, 0]]), GLOBAL, _ctx())
    assert 6 not in flame._admitted and len(flame._admitted) >= 4  # a majority cluster, without the outlier


def test_foolsgold_down_weights_sybils():
    fg = DEFENSES.get("foolsgold")()
    vectors = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, -1, 0.5], [5, 5, 5], [5, 5, 5]]
    fg.aggregate(_updates(vectors), GLOBAL, _ctx())
    assert fg._weights[4] == fg._weights[5] == 0.0
    assert min(fg._weights[i] for i in range(4)) > 0.5


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
    ft = DEFENSES.get("fltrust")(root_steps=3)
    g0 = ft.root_update(model, ctx)
    ups = []
    for vec in (2 * g0, -g0):
        m = copy.deepcopy(model)
        from fl_core.updates import state_plus

        m.load_state_dict(state_plus(model, vec))
        ups.append(ClientUpdate(len(ups), 0, 1, m))
    state = ft.aggregate(ups, model, ctx)
    assert ft._trust[0] == pytest.approx(1.0, abs=1e-4) and ft._trust[1] == 0.0
    new = copy.deepcopy(model)
    new.load_state_dict(state)
    assert torch.allclose(deltas([ClientUpdate(0, 0, 1, new)], model)[0], g0, atol=1e-4)


def test_pruning_removes_the_planted_dormant_channel():
    model, ctx = _cnn(), _ctx(synthetic=_tiny_synthetic())
    site = list(model.activation_sites())[-1]
    bn = model.get_submodule(site.rsplit(".", 1)[0])[1]
    with torch.no_grad():
        bn.weight[5], bn.bias[5] = 0.0, -5.0  # channel 5 never fires: dormant
    pruning = DEFENSES.get("pruning")(rate=1 / 32)
    pruning.after_round(model, 0, ctx)
    assert pruning._pruned[0] == [5]
    with torch.no_grad():
        bn.bias[5] = 50.0  # even if it wakes up, the mask keeps it off
    seen = []
    model.get_submodule(site).register_forward_hook(lambda m, a, o: seen.append(o[:, 5].abs().max()))
    model(torch.rand(2, 3, 32, 32))
    assert seen[-1] == 0


def test_clp_zeroes_the_channel_with_an_abnormal_lipschitz_bound():
    model = _cnn(width=1.0)  # 32 channels: with 8, no channel can sit 3 std above the mean
    conv = model.net[0][0]
    with torch.no_grad():
        conv.weight[3] *= 100
    clp = DEFENSES.get("clp")(u=3.0)
    clp.after_round(model, 0, _ctx())
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


def test_teacher_filter_drops_the_deviating_teacher():
    good = _cnn()
    teachers = [ClientUpdate(i, 0, 1, good) for i in range(4)] + [ClientUpdate(4, 1, 1, _Constant())]
    syn = _tiny_synthetic()
    plan = FusionPlan(0, teachers, torch.ones(5), syn)
    out = DEFENSES.get("teacherfilter")().on_fusion(plan, good, _ctx(synthetic=syn))
    assert [u.client_id for u in out.teachers] == [0, 1, 2, 3] and len(out.teacher_weights) == 4
    plan = FusionPlan(0, teachers, torch.ones(5), syn)
    soft = DEFENSES.get("teacherfilter")(mode="downweight").on_fusion(plan, good, _ctx(synthetic=syn))
    assert soft.teacher_weights[4] < 1 and torch.equal(soft.teacher_weights[:4], torch.ones(4))


@pytest.mark.parametrize("name", ["normclip", "krum", "median", "flame", "pruning", "clp", "teacherfilter"])
def test_defenses_run_in_the_fl_loop(tiny_config, name):
    from fl_core.fl import run_cell

    record = run_cell(tiny_config({"defense": {"name": name}, "fl": {"rounds": 1}}), log=lambda *_: None)
    assert record["defense"]["name"] == name and record["rounds"][-1]["defense_seconds"] >= 0


@pytest.mark.parametrize("name", ["pruning", "clp", "finetune", "fineprune"])
def test_repair_schedule_is_validated(name):
    from fl_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="when 'sometimes' unknown; valid: final, every"):
        load_config(None, [f"defense.name={name}", "defense.params={when: sometimes}"])
