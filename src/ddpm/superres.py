"""Super-resolution diffusion, the stages of a cascade (Ho et al. 2021, "Cascaded Diffusion Models
for High Fidelity Image Generation"; Saharia et al. 2022, Imagen).

A super-resolution run models an image x0 of the data's size given its low-resolution version:
x0 averaged down to ``LOW`` pixels a side (area averaging, as improved-diffusion's super-resolution
data are made), upsampled back bilinearly and concatenated to x_t as extra input channels. The
same trainer, objectives and samplers serve it; only the network's input grows.

Conditioning augmentation (CDM, sec. 3.2) corrupts that low-resolution input while training, so
that the model learns to trust it no more than the samples of the stage before deserve:

* **blur:** a Gaussian blur of the low-resolution image, sigma drawn uniformly from a range (in
  its own pixels); a fixed sigma, or none, when sampling;
* **noise:** the upsampled input taken through our own forward process to a step s, drawn
  uniformly from 0..round(MAX T) while training, fixed when sampling: z_s = sqrt(alpha_bar_s) x
  + sqrt(1 - alpha_bar_s) eps (Ho et al. 2020, eq. 4), s = 0 being x itself. Levels are given
  as fractions of the process, s / T in [0, 1], as Imagen's are, so that they mean the same at
  any T. The network is told s through a second time embedding, as Imagen's is.

When sampling, ``project`` makes each output consistent with its input by construction: every
predicted x0 keeps what the model made of the details the low-res image does not fix, and takes
the rest, its block averages, from the input (:func:`project`).

Every super-resolution batch draws its levels, sigmas and noise whatever the augmentation, so
runs that differ only in it see the same timesteps, noise and images: `--cond-aug none` and
`--cond-aug noise --cond-aug-max 0` train the same weights, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule
from .settings import SettingError, check_fields, setting

COND_AUGMENTATIONS = ("none", "noise", "blur", "noise+blur")


@dataclass(frozen=True, kw_only=True)
class SuperResConfig:
    """A super-resolution model: what its low-resolution input is and how it is augmented. The
    sampling settings (level, sigma) are the run's defaults; ``ddpm sample``, ``eval``,
    ``upscale`` and ``viz reverse`` take others."""

    low: int | None = setting(
        None, flag="--super-res", at_least=1, metavar="LOW",
        help="train a super-resolution model from LOW px (the images averaged down) to the data's "
             "size, for a cascade after a LOW px base model; docs/cascade.md")
    # BENCHMARKS.md, "Cascades": a 14 -> 28 px stage after a 14 px base, 10 minutes each way on
    # Fashion-MNIST, scored on the base's samples: FID 4.37 with noise+blur (mean of 3 seeds),
    # 5.88 blur, 7.05 noise, 10.23 none (seed to seed about +-0.3).
    cond_aug: str = setting(
        "noise+blur", flag="--cond-aug", choices=COND_AUGMENTATIONS,
        help="conditioning augmentation of the low-res input while training (Ho et al. 2021)")
    aug_max: float = setting(
        0.25, flag="--cond-aug-max", at_least=0, at_most=1, metavar="LEVEL",
        help="noise augmentation: the level (a fraction of the forward process, 0 = none, 1 = "
             "pure noise) is drawn uniformly up to this one while training")
    aug_level: float = setting(
        0.0, flag="--cond-aug-level", at_least=0, at_most=1, metavar="LEVEL",
        help="noise augmentation when sampling: the low-res input noised to this level (0 = none)")
    # CDM's range. BENCHMARKS.md, "Cascades", the blur's range: FID 4.03 for 0.2-1.0, 4.37 for
    # 0.4-0.6, 4.29 for 0.8-1.2 (means of 3 seeds), a lead too small yet to move the default.
    blur_min: float = setting(0.4, flag="--cond-blur-min", at_least=0, metavar="SIGMA",
                              help="blur augmentation: the smallest sigma drawn while training, "
                                   "in low-res pixels")
    blur_max: float = setting(0.6, flag="--cond-blur-max", at_least=0, metavar="SIGMA",
                              help="blur augmentation: the largest sigma drawn while training")
    blur_sigma: float = setting(0.0, flag="--cond-blur", at_least=0, metavar="SIGMA",
                                help="blur augmentation when sampling: this sigma (0 = none)")
    project: bool = setting(
        False, flag="--cond-project",
        help="when sampling, move every predicted x0 to the nearest image in [-1, 1] whose block "
             "averages are the low-res input (Wang et al. 2023's range-null-space step, bounded): "
             "each output averaged down is its input")

    @property
    def noise(self) -> bool:
        return "noise" in self.cond_aug

    @property
    def blur(self) -> bool:
        return "blur" in self.cond_aug

    def validate(self, *, image_size: int | None = None) -> None:
        check_fields(self)
        if self.low is None:
            if self != SuperResConfig():
                raise SettingError("superres.cond_aug", "{setting} and the other conditioning "
                                   "settings are for a super-resolution model; add --super-res LOW")
            return
        if self.blur_min > self.blur_max:
            raise SettingError("superres.blur_min", f"{{setting}} {self.blur_min} is above "
                               f"--cond-blur-max {self.blur_max}; give a range low to high")
        if image_size is not None and (self.low >= image_size or image_size % self.low):
            raise SettingError(
                "superres.low", f"{{setting}} {self.low} must be smaller than the images' "
                f"{image_size} px and divide it (area averaging takes whole blocks of pixels): "
                f"try {_divisors_hint(image_size)}")


def _divisors_hint(size: int) -> str:
    divisors = [d for d in range(2, size) if size % d == 0]
    return ", ".join(map(str, divisors[-3:])) if divisors else "another image size"


# --- the low-resolution path ----------------------------------------------------------------------


def downsample(x: torch.Tensor, low: int) -> torch.Tensor:
    """``[B, C, H, H]`` -> ``[B, C, low, low]``, each pixel the mean of its H/low x H/low block."""
    return F.avg_pool2d(x, x.shape[-1] // low)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling to ``size`` x ``size`` (half-pixel centres: a constant image stays
    that constant, and each block's mean is the low-res pixel it came from, up to the edges)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def project(x0: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``x0`` ``[B, C, H, H]`` moved to the nearest image (in L2) that lies in [-1, 1] and whose
    area average is ``low`` ``[B, C, LOW, LOW]`` (itself in [-1, 1]).

    Without the bounds it is x0 + A^+ (low - A x0), with A the area averaging and A^+ its
    pseudo-inverse, nearest-neighbour upsampling (A A^T = I / f^2 for blocks of f x f, so A^+ =
    f^2 A^T): the range-null-space step of Wang et al. 2023 (DDNM), the input's block averages and
    x0's detail within the blocks. With them, the blocks separate, and the KKT conditions of
    min |x - x0|^2 subject to mean(x) = l, -1 <= x <= 1 give x = clip(x0 + lam, -1, 1) with one
    lam per block. The block's mean is non-decreasing in lam, so lam is found by bisection, then
    solved exactly on the pixels the bisection leaves unclipped."""
    factor = x0.shape[-1] // low.shape[-1]
    low = low.to(x0.dtype)

    def up(v: torch.Tensor) -> torch.Tensor:  # A^+ / f^2: each low-res value over its block
        return v.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)

    lam = low - downsample(x0, low.shape[-1])  # the unbounded step, exact when nothing clips
    if bool(((x0 + up(lam)).abs() <= 1).all()):
        return x0 + up(lam)
    # lam in [-1 - max x0, 1 - min x0] over each block: there every pixel clips to -1, or to 1
    a = -1 - F.max_pool2d(x0, factor)
    b = 1 + F.max_pool2d(-x0, factor)
    for _ in range(40):  # halves [a, b] (width <= 2 + the block's range) to float precision
        mid = (a + b) / 2
        below = downsample((x0 + up(mid)).clamp(-1, 1), low.shape[-1]) < low
        a, b = torch.where(below, mid, a), torch.where(below, b, mid)
    lam = (a + b) / 2
    shifted = x0 + up(lam)
    free = shifted.abs() < 1  # the pixels left unclipped: sum(x0 + lam) + sum(clipped) = f^2 low
    n_free = downsample(free.to(x0.dtype), low.shape[-1]) * factor**2
    clipped_sum = downsample(torch.where(free, 0, shifted.clamp(-1, 1)), low.shape[-1]) * factor**2
    free_sum = downsample(torch.where(free, x0, 0), low.shape[-1]) * factor**2
    exact = (low * factor**2 - clipped_sum - free_sum) / n_free.clamp(min=1)
    lam = torch.where(n_free > 0, exact, lam)
    return (x0 + up(lam)).clamp(-1, 1)


def projecting(low: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An x0 transform for the samplers: ``transform`` (e.g. clipping), then :func:`project`
    onto ``low``."""

    def apply(x0: torch.Tensor) -> torch.Tensor:
        return project(x0 if transform is None else transform(x0), low)

    return apply


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` ``[B, C, H, W]`` blurred by a Gaussian of its own ``sigma`` ``[B]``
    (pixels; 0 leaves that image exactly as it was), separably, edges replicated."""
    radius = max(1, math.ceil(3 * float(sigma.max()))) if len(sigma) else 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    s = sigma.to(x.device, torch.float64).clamp(min=1e-12)[:, None]
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x.dtype)  # [B, 2r + 1]
    b, c, h, w = x.shape
    weights = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    flat = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    flat = F.conv2d(flat, weights[:, None, :, None], groups=b * c)  # down the columns
    flat = F.conv2d(flat, weights[:, None, None, :], groups=b * c)  # along the rows
    return torch.where((sigma > 0).to(x.device)[:, None, None, None], flat.reshape(b, c, h, w), x)


def level_step(schedule: NoiseSchedule, level: float) -> int:
    """The forward process's step s = round(level T) of a level in [0, 1]."""
    return round(level * schedule.num_train_timesteps)


def noise_augment(schedule: NoiseSchedule, x: torch.Tensor, step: torch.Tensor,
                  eps: torch.Tensor) -> torch.Tensor:
    """z_s = sqrt(alpha_bar_s) x + sqrt(1 - alpha_bar_s) eps (Ho et al. 2020, eq. 4) per image, at
    steps ``step`` ``[B]`` in 0..T: step s is the paper's t = s, and step 0 is x itself, to the
    bit (alpha_bar_0 = 1)."""
    one = torch.ones(1, dtype=torch.float64, device=schedule.alphas_cumprod.device)
    alpha_bar = torch.cat([one, schedule.alphas_cumprod])  # [T + 1]: alpha_bar_0 = 1
    a = alpha_bar[step.to(alpha_bar.device)].to(x.device)[:, None, None, None]
    return (a.sqrt().to(x.dtype) * x) + ((1 - a).sqrt().to(x.dtype) * eps)


class Conditioning(NamedTuple):
    """What a super-resolution network is given besides x_t and t: the augmented, upsampled
    low-resolution image ``[B, C, H, W]`` and the step s of its noise ``[B]`` (int64, 0..T)."""

    cond: torch.Tensor
    cond_level: torch.Tensor


def condition(config: SuperResConfig, schedule: NoiseSchedule, low: torch.Tensor, size: int, *,
              level: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> Conditioning:
    """The network's conditioning from low-resolution images ``[B, C, LOW, LOW]``: blurred by
    ``sigma`` (when the run blurs), upsampled to ``size``, then noised to the steps ``level``
    (when the run noises; else step 0). ``eps`` ``[B, C, size, size]`` is the noise."""
    x = gaussian_blur(low, sigma) if config.blur else low
    x = upsample(x, size)
    if not config.noise:
        level = torch.zeros_like(level)
    return Conditioning(noise_augment(schedule, x, level, eps), level)


def training_conditioning(config: SuperResConfig, schedule: NoiseSchedule, x0: torch.Tensor,
                          generator: torch.Generator) -> Conditioning:
    """A training batch's conditioning: ``x0`` averaged down to ``config.low``, with a step
    uniform in 0..round(aug_max T), a sigma uniform in [blur_min, blur_max] and the noise drawn from
    ``generator`` (on its device) for every image, whichever augmentation the run uses."""
    assert config.low is not None
    b, device = x0.shape[0], generator.device
    level = torch.randint(0, level_step(schedule, config.aug_max) + 1, (b,), generator=generator,
                          device=device)
    u = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
    sigma = config.blur_min + (config.blur_max - config.blur_min) * u
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    low = downsample(x0.to(device), config.low)
    return condition(config, schedule, low, x0.shape[-1], level=level, sigma=sigma, eps=eps)


def sampling_conditioning(config: SuperResConfig, schedule: NoiseSchedule, low: torch.Tensor,
                          size: int, generator: torch.Generator) -> Conditioning:
    """The conditioning of low-resolution images ``[B, C, LOW, LOW]`` when sampling: the run's
    fixed level and sigma, the noise drawn from ``generator`` (on the CPU, as the samplers')."""
    b = low.shape[0]
    level = torch.full((b,), level_step(schedule, config.aug_level), dtype=torch.long)
    sigma = torch.full((b,), config.blur_sigma, dtype=torch.float64)
    eps = torch.randn((b, low.shape[1], size, size), generator=generator).to(low.device, low.dtype)
    return condition(config, schedule, low, size, level=level, sigma=sigma, eps=eps)
