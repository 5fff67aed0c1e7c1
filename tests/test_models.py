import pytest
import torch
from torch import nn

from fl_core.models import MODELS, build_model
from fl_core.schema import ModelSpec

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.mark.parametrize("name", ["cnn", "resnet8", "resnet18"])
def test_registered_models_classify_32px_and_name_sites(name):
    model = build_model(ModelSpec(name=name, width=0.25), 3, 10, MEAN, STD)
    out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    sites = model.activation_sites()
    assert len(sites) >= 4
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append(n)) for n, m in sites.items()]
    model(torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == list(sites)  # every site fires, in forward order


def test_width_and_depth_change_the_prototype():
    base = build_model(ModelSpec(), 3, 10, MEAN, STD)
    wide = build_model(ModelSpec(width=2.0), 3, 10, MEAN, STD)
    deep = build_model(ModelSpec(depth=6), 3, 10, MEAN, STD)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(wide) > 3 * count(base)
    assert len(deep.activation_sites()) == 6 and len(base.activation_sites()) == 4


def test_grayscale_input():
    model = build_model(ModelSpec(), 1, 10, (0.5,), (0.25,))
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_timm_model_by_name_has_a_32px_stem():
    model = build_model(ModelSpec(name="timm:resnet10t"), 3, 10, MEAN, STD)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.stride == (1, 1)
    assert isinstance(model.net.maxpool, nn.Identity)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert len(model.activation_sites()) >= 4


def test_registry_lists_names():
    assert {"cnn", "resnet8", "resnet18"} <= set(MODELS.names())
    with pytest.raises(KeyError, match="known: cnn"):
        MODELS.get("vgg99")
