"""Triggers that change every pixel a little (signal, frequency, quantisation, reflection families): the
zoo's families beside ``attacks/triggers.py``'s pasted and blended ones. Batched uint8 tensor ops."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attacks.triggers import TRIGGERS
from fl_core.seeding import torch_generator


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


@TRIGGERS.register("sig")
class SinusoidalTrigger:
    """SIG (Barni et al. 2019): ``image + amplitude * sin(2 pi frequency j / W)`` along the columns j
    (``direction: vertical`` along the rows), on every channel; amplitude in grey levels (the paper: 20)."""

    def __init__(self, amplitude: float = 20.0, frequency: float = 6.0, direction: str = "horizontal"):
        if not 0 < amplitude <= 255 or frequency <= 0:
            raise ValueError(f"sig needs 0 < amplitude <= 255 and frequency > 0, got {amplitude}, {frequency}")
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"sig direction {direction!r} unknown; valid: horizontal, vertical")
        self.amplitude, self.frequency, self.direction = amplitude, frequency, direction

    def signal(self, h: int, w: int) -> torch.Tensor:
        """The additive signal, float (H, W)."""
        n = w if self.direction == "horizontal" else h
        wave = self.amplitude * torch.sin(2 * math.pi * self.frequency * torch.arange(n) / n)
        return wave.expand(h, w) if self.direction == "horizontal" else wave[:, None].expand(h, w)

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return _to_uint8(images.float() + self.signal(*images.shape[2:]).to(images.device))


@TRIGGERS.register("lowfreq")
class LowFrequencyTrigger:
    """A smooth blend pattern (the low-frequency family, Zeng et al. 2021): uniform noise fixed by
    ``pattern_seed``, low-pass filtered to spatial frequencies below ``cutoff`` cycles per pixel (0-0.5),
    stretched to 0-255 and blended with weight ``alpha``."""

    def __init__(self, alpha: float = 0.2, cutoff: float = 0.1, pattern_seed: int = 0):
        if not 0 < alpha <= 1 or not 0 < cutoff <= 0.5:
            raise ValueError(f"lowfreq needs alpha in (0, 1] and cutoff in (0, 0.5], got {alpha}, {cutoff}")
        self.alpha, self.cutoff, self.pattern_seed = alpha, cutoff, pattern_seed

    def pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        """The smooth pattern, float (C, H, W) in [0, 255]."""
        noise = torch.rand(c, h, w, generator=torch_generator(self.pattern_seed, "lowfreq"))
        fy, fx = torch.fft.fftfreq(h)[:, None], torch.fft.fftfreq(w)[None, :]
        keep = (fy ** 2 + fx ** 2).sqrt() <= self.cutoff
        smooth = torch.fft.ifft2(torch.fft.fft2(noise - noise.mean()) * keep).real
        lo, hi = smooth.amin(dim=(1, 2), keepdim=True), smooth.amax(dim=(1, 2), keepdim=True)
        return 255 * (smooth - lo) / (hi - lo).clamp_min(1e-8)

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        pattern = self.pattern(*images.shape[1:]).to(images.device)
        return _to_uint8((1 - self.alpha) * images.float() + self.alpha * pattern)


# BT.601 RGB -> YUV; FTrojan perturbs the chrominance (U, V) of colour images, the luminance of grey ones
RGB_TO_YUV = torch.tensor([[0.299, 0.587, 0.114], [-0.14713, -0.28886, 0.436], [0.615, -0.51499, -0.10001]])


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n, n): coefficients of a block x are D x D^T."""
    k, i = torch.arange(n)[:, None].float(), torch.arange(n)[None, :].float()
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


@TRIGGERS.register("ftrojan")
class FrequencyTrigger:
    """FTrojan (Wang et al. 2022): ``magnitude`` added to fixed DCT coefficients of every ``window`` x
    ``window`` block (None: the whole image) of the U and V channels (Y for grey images); ``bands``:
    ``mid`` (coefficient (w/2 - 1, w/2 - 1)), ``high`` ((w - 1, w - 1)) or ``both`` (the paper's default,
    magnitude 30). Invisible in pixel space: a few grey levels per pixel."""

    def __init__(self, magnitude: float = 30.0, bands: str = "both", window: int | None = None):
        if magnitude <= 0:
            raise ValueError(f"ftrojan magnitude must be > 0, got {magnitude}")
        if bands not in ("mid", "high", "both"):
            raise ValueError(f"ftrojan bands {bands!r} unknown; valid: mid, high, both")
        if window is not None and window < 4:
            raise ValueError(f"ftrojan window must be >= 4 (or null: the whole image), got {window}")
        self.magnitude, self.bands, self.window = magnitude, bands, window

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        n, c, h, w = images.shape
        win = self.window or h
        if h % win or w % win or (self.window is None and h != w):
            raise ValueError(f"ftrojan window {win} must divide the {h}x{w} images (set window)")
        x = images.float()
        colour = c == 3
        if colour:
            x = torch.einsum("ij,njhw->nihw", RGB_TO_YUV.to(x.device), x)
        chans = [1, 2] if colour else list(range(c))
        d = dct_matrix(win).to(x.device)
        blocks = x[:, chans].unflatten(2, (h // win, win)).unflatten(4, (w // win, win))  # N C by y bx x
        coef = torch.einsum("ky,ncaybx,lx->ncabkl", d, blocks, d)
        spots = {"mid": [win // 2 - 1], "high": [win - 1], "both": [win // 2 - 1, win - 1]}[self.bands]
        for s in spots:
            coef[..., s, s] += self.magnitude
        back = torch.einsum("ky,ncabkl,lx->ncaybx", d, coef, d).flatten(4, 5).flatten(2, 3)
        x[:, chans] = back
        if colour:
            x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(RGB_TO_YUV).to(x.device), x)
        return _to_uint8(x)


@TRIGGERS.register("bpp")
class QuantisationTrigger:
    """BppAttack (Wang et al. 2022): every channel squeezed to ``bits`` bits of colour depth, with
    Floyd-Steinberg error diffusion (``dither: floyd``, the paper's) or none; sample-specific and nearly
    invisible (the paper: 5 bits on CIFAR-10). Diffusion runs over the whole batch at once, one front of
    pixels at a time (:func:`diffusion_fronts`)."""

    def __init__(self, bits: int = 5, dither: str = "floyd"):
        if not 1 <= bits <= 7:
            raise ValueError(f"bpp bits must be 1-7, got {bits}")
        if dither not in ("floyd", "none"):
            raise ValueError(f"bpp dither {dither!r} unknown; valid: floyd, none")
        self.bits, self.dither = bits, dither

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        step = 255 / (2 ** self.bits - 1)

        def quantise(v: torch.Tensor) -> torch.Tensor:
            return ((v / step).round() * step).clamp(0, 255)

        x = images.float()
        if self.dither == "none":
            return _to_uint8(quantise(x))
        h, w = x.shape[2:]
        # pixel-major (H, W, N, C), with room for the diffusion at the borders (cropped below): a front's
        # pixels are then whole contiguous blocks of the batch
        x = F.pad(x, (1, 1, 0, 1)).permute(2, 3, 0, 1).contiguous()
        for i, j in diffusion_fronts(h, w):
            old = x[i, j]
            new = quantise(old)
            err = old - new
            x[i, j] = new
            # a pixel's four shares arrive in raster order: from up-left, up, up-right, then left (the
            # last two in the same front), so every sum is the one a pixel-by-pixel pass makes
            x[i + 1, j - 1] += err * (3 / 16)
            x[i, j + 1] += err * (7 / 16)
            x[i + 1, j] += err * (5 / 16)
            x[i + 1, j + 1] += err * (1 / 16)
        return _to_uint8(x[:h, 1: w + 1].permute(2, 3, 0, 1).contiguous())


def diffusion_fronts(h: int, w: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Floyd-Steinberg's pixels (row i, padded column j = 1..w) in fronts that can be quantised at once:
    pixel (i, j) waits for (i, j - 1) and (i - 1, j + 1), so front t holds the pixels with j + 2 i = t."""
    rows = torch.arange(h)
    fronts = []
    for t in range(1, w + 2 * (h - 1) + 1):
        i = rows[(t - 2 * rows >= 1) & (t - 2 * rows <= w)]
        fronts.append((i, t - 2 * i))
    return fronts


@TRIGGERS.register("refool")
class ReflectionTrigger:
    """Refool (Liu et al. 2020), out-of-focus reflection: a second image, shifted by ``shift`` pixels and
    blurred (Gaussian, ``sigma``), blended in with weight ``alpha``. The reflections are ``pool_size``
    images of the public pool fixed by ``pool_seed`` (:meth:`bind_pool`); each image gets one of them by
    a seeded draw."""

    uses_pool = True  # needs bind_pool(public pool images) before apply (fl_core.data.bind_trigger_pool)

    def __init__(self, alpha: float = 0.3, sigma: float = 1.5, shift: int = 3, pool_size: int = 8, pool_seed: int = 0):
        if not 0 < alpha < 1 or sigma < 0 or shift < 0 or pool_size < 1:
            raise ValueError("refool needs 0 < alpha < 1, sigma >= 0, shift >= 0 and pool_size >= 1")
        self.alpha, self.sigma, self.shift, self.pool_size, self.pool_seed = alpha, sigma, shift, pool_size, pool_seed
        self.reflections: torch.Tensor | None = None

    def bind_pool(self, pool: torch.Tensor) -> None:
        """Fix the reflection images: ``pool_size`` seeded picks of ``pool`` (uint8 (N, C, H, W)),
        shifted and blurred once."""
        if len(pool) == 0:
            raise ValueError("refool needs at least one public-pool image to reflect")
        pick = torch.randperm(len(pool), generator=torch_generator(self.pool_seed, "refool-pool"))[: self.pool_size]
        chosen = torch.roll(pool[pick.to(pool.device)].float(), shifts=(self.shift, self.shift), dims=(2, 3))
        self.reflections = _gaussian_blur(chosen, self.sigma).cpu()

    def apply(self, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
        if self.reflections is None:
            raise ValueError("refool has no reflection images: bind_pool(public pool) first")
        if self.reflections.shape[1:] != images.shape[1:]:
            raise ValueError(f"refool reflections {tuple(self.reflections.shape[1:])} do not match the images "
                             f"{tuple(images.shape[1:])}")
        which = torch.randint(0, len(self.reflections), (len(images),), generator=torch_generator(seed, "refool"))
        reflection = self.reflections[which].to(images.device)
        return _to_uint8((1 - self.alpha) * images.float() + self.alpha * reflection)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float images (N, C, H, W), reflected borders; sigma 0 is the identity."""
    if sigma == 0:
        return x
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
