import pytest
import torch

from attacks.triggers import PatchTrigger, PerClassTrigger
from fl_core.config import load_config
from fl_core.schema import ConfigError


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


# ---------------------------------------------------------------- the zoo's trigger families

from attacks.global_triggers import (  # noqa: E402
    RGB_TO_YUV,
    FrequencyTrigger,
    LowFrequencyTrigger,
    QuantisationTrigger,
    ReflectionTrigger,
    SinusoidalTrigger,
    dct_matrix,
)


def _images(n=8, c=3, size=32, seed=0):
    return torch.randint(40, 216, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_sig_adds_the_sinusoid_along_the_chosen_axis():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    out = SinusoidalTrigger(amplitude=20, frequency=4).apply(x).float() - 128
    expected = (20 * torch.sin(2 * torch.pi * 4 * torch.arange(32) / 32)).round()
    assert torch.equal(out[0, 1, 5], expected) and torch.equal(out[1, 2, 17], expected)  # every row the same
    vertical = SinusoidalTrigger(amplitude=20, frequency=4, direction="vertical").apply(x).float() - 128
    assert torch.equal(vertical[0, 0, :, 3], expected)
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidalTrigger(amplitude=0)


def test_lowfreq_pattern_has_no_energy_above_its_cutoff_and_is_seeded():
    trig = LowFrequencyTrigger(alpha=0.2, cutoff=0.1, pattern_seed=3)
    pattern = trig.pattern(3, 32, 32)
    spectrum = torch.fft.fft2(pattern - pattern.mean(dim=(1, 2), keepdim=True)).abs()
    fy, fx = torch.fft.fftfreq(32)[:, None], torch.fft.fftfreq(32)[None, :]
    high = (fy ** 2 + fx ** 2).sqrt() > 0.1
    assert spectrum[:, high].max() < 1e-3 * spectrum.max()
    assert pattern.min() >= -1e-3 and pattern.max() <= 255 + 1e-3
    x = _images()
    assert torch.equal(trig.apply(x), trig.apply(x))
    assert not torch.equal(trig.apply(x), LowFrequencyTrigger(pattern_seed=4).apply(x))


def test_ftrojan_moves_the_chosen_dct_coefficients_of_the_chrominance_and_little_else():
    x = _images()
    out = FrequencyTrigger(magnitude=30, bands="both").apply(x)
    assert (out.float() - x.float()).abs().max() <= 8  # invisible: a few grey levels
    d = dct_matrix(32)
    yuv = lambda im: torch.einsum("ij,njhw->nihw", RGB_TO_YUV, im.float())  # noqa: E731
    diff = d @ (yuv(out) - yuv(x)) @ d.T
    for s in (15, 31):
        assert diff[:, 1:, s, s].sub(30).abs().max() < 6  # U and V moved by the magnitude (up to rounding)
    assert diff[:, 0, 15, 15].abs().max() < 6  # luminance left (nearly) alone
    grey = FrequencyTrigger(bands="mid").apply(_images(c=1, size=28))
    assert grey.shape == (8, 1, 28, 28)
    with pytest.raises(ValueError, match="window"):
        FrequencyTrigger(window=5).apply(_images())


def test_bpp_quantises_to_its_colour_depth_with_mean_preserving_dither():
    x = _images(n=4)
    plain = QuantisationTrigger(bits=3, dither="none").apply(x)
    step = 255 / 7
    levels = (plain.float() / step).round() * step
    assert (plain.float() - levels).abs().max() <= 0.5
    dithered = QuantisationTrigger(bits=3).apply(x)
    assert len(torch.unique(dithered)) <= 8
    assert abs(dithered.float().mean() - x.float().mean()) < 2  # error diffusion keeps the brightness
    assert not torch.equal(dithered, plain)
    with pytest.raises(ValueError, match="bits"):
        QuantisationTrigger(bits=8)


def _floyd_steinberg_pixel_by_pixel(images: torch.Tensor, bits: int) -> torch.Tensor:
    """The textbook raster-order error diffusion, one pixel at a time: the reference for the fronts."""
    step = 255 / (2 ** bits - 1)
    x = torch.nn.functional.pad(images.float(), (1, 1, 0, 1))
    h, w = images.shape[2:]
    for i in range(h):
        for j in range(1, w + 1):
            old = x[:, :, i, j].clone()
            x[:, :, i, j] = ((old / step).round() * step).clamp(0, 255)
            err = old - x[:, :, i, j]
            x[:, :, i, j + 1] += err * (7 / 16)
            x[:, :, i + 1, j - 1] += err * (3 / 16)
            x[:, :, i + 1, j] += err * (5 / 16)
            x[:, :, i + 1, j + 1] += err * (1 / 16)
    return x[:, :, :h, 1: w + 1].round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 5, 9), (1, 9, 2), (1, 1, 7)])
def test_bpp_dithering_by_fronts_is_bit_for_bit_the_pixel_by_pixel_pass(shape):
    x = torch.randint(0, 256, (3, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for bits in (3, 5):
        out = QuantisationTrigger(bits=bits).apply(x)
        assert out.is_contiguous() and torch.equal(out, _floyd_steinberg_pixel_by_pixel(x, bits))


def test_refool_reflects_seeded_images_of_the_bound_pool():
    pool, x = _images(n=20, seed=1), _images(seed=2)
    trig = ReflectionTrigger(alpha=0.3, sigma=1.0, shift=2, pool_size=4, pool_seed=5)
    with pytest.raises(ValueError, match="bind_pool"):
        trig.apply(x)
    trig.bind_pool(pool)
    assert trig.reflections.shape == (4, 3, 32, 32)
    a, b, c = trig.apply(x, seed=1), trig.apply(x, seed=1), trig.apply(x, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    no_blur = ReflectionTrigger(alpha=0.5, sigma=0, shift=0, pool_size=1, pool_seed=5)
    no_blur.bind_pool(pool)
    pick = torch.randperm(20, generator=__import__("fl_core.seeding", fromlist=["x"]).torch_generator(5, "refool-pool"))[0]
    expected = (0.5 * x.float() + 0.5 * pool[pick].float()).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(no_blur.apply(x), expected)


def test_patch_colour_and_random_colour_options():
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    red = PatchTrigger(size=2, pattern="color", color=[200, 10, 0]).apply(x)
    assert red[0, :, 15, 15].tolist() == [200, 10, 0]
    grey = PatchTrigger(size=2, pattern="color", color=[200, 10, 0]).apply(x[:, :1])
    assert grey[0, 0, 15, 15] == 70
    rand = PatchTrigger(size=3, pattern="random", pattern_seed=1)
    assert torch.equal(rand.apply(x), rand.apply(x)) and len(torch.unique(rand.apply(x)[0, :, 13:, 13:])) > 3
    assert not torch.equal(rand.apply(x), PatchTrigger(size=3, pattern="random", pattern_seed=2).apply(x))
    with pytest.raises(ValueError, match="color"):
        PatchTrigger(pattern="color", color=[300, 0, 0])


@pytest.mark.parametrize("kind", ["sig", "lowfreq", "ftrojan", "bpp", "refool"])
def test_new_families_validate_in_configs_and_refuse_bad_values(kind):
    assert load_config(None, [f"backdoor.trigger.kind={kind}"]).backdoor.trigger.kind == kind
    bad = {"sig": "amplitude: -1", "lowfreq": "cutoff: 0.9", "ftrojan": "bands: low", "bpp": "bits: 0",
           "refool": "alpha: 1.5"}[kind]
    with pytest.raises(ConfigError, match="backdoor.trigger"):
        load_config(None, [f"backdoor.trigger.kind={kind}", f"backdoor.trigger.params={{{bad}}}"])


def test_a_refool_cell_runs_with_reflections_from_its_public_pool(tiny_config):
    from fl_core.fl import run_cell

    cfg = tiny_config({"attack": {"name": "fm"}, "fl": {"rounds": 1},
                       "backdoor": {"trigger": {"kind": "refool", "params": {"pool_size": 3}}}})
    record = run_cell(cfg, log=lambda *_: None)
    assert 0 <= record["metrics"]["asr"] <= 100
