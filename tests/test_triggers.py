import pytest
import torch

from attacks.triggers import PatchTrigger


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
