import pytest
import torch

from attacks.triggers import PatchTrigger, PerClassTrigger
from fl_core.config import ConfigError, load_config


def test_corner_patch_geometry_and_values():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    out = PatchTrigger(size=3, position="bottom-right").apply(images)
    assert out[:, :, 29:, 29:].eq(255).all()
    assert out.sum() == 4 * 3 * 9 * 255  # nothing else changed
    assert images.sum() == 0  # input untouched
    tl = PatchTrigger(size=2, position="top-left", pattern="checkerboard").apply(images)
    assert tl[0, 0, :2, :2].tolist() == [[255, 0], [0, 255]]


def test_random_position_is_seeded_and_per_sample():
    images = torch.zeros(50, 1, 16, 16, dtype=torch.uint8)
    trig = PatchTrigger(size=3, position="random")
    a, b, c = trig.apply(images, seed=1), trig.apply(images, seed=1), trig.apply(images, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.flatten(1).eq(255).sum(1) == 9).all()
    corners = {tuple((img[0] == 255).nonzero()[0].tolist()) for img in a}
    assert len(corners) > 10


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="position"):
        PatchTrigger(position="centre")
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(size=40).apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_per_class_trigger_picks_each_images_variant_by_its_class():
    images = torch.zeros(10, 3, 16, 16, dtype=torch.uint8)
    labels = torch.arange(10)
    out = PerClassTrigger().apply(images, labels=labels)
    assert out[0, :, 13:, 13:].eq(255).all() and out[1, :, 13:, :3].eq(255).all()
    assert out[4, 0, 13:, 13:].tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]  # checkerboard
    assert torch.equal(out[8], out[0]) and not torch.equal(out[0], out[4])  # eight variants, then again
    assert all(int(img.gt(0).sum()) in (27, 15) for img in out)  # one 3x3 patch each (checkerboard: 5 of 9)
    with pytest.raises(ValueError, match="true class"):
        PerClassTrigger().apply(images)
    with pytest.raises(ValueError, match="kind"):
        PerClassTrigger(variants=[{"params": {}}])
    with pytest.raises(ValueError, match="variant 1: unknown trigger 'nope'; known: blend"):
        PerClassTrigger(variants=[{"kind": "patch"}, {"kind": "nope"}])


def test_per_class_trigger_is_validated_in_configs():
    cfg = load_config(None, ["backdoor.trigger.kind=per_class"])
    assert cfg.backdoor.trigger.kind == "per_class"
    with pytest.raises(ConfigError, match="backdoor.trigger"):
        load_config(None, ["backdoor.trigger.kind=per_class",
                           'backdoor.trigger.params={"variants": [{"kind": "patch", "params": {"size": 99}}]}'])
