"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2021, sec. 3 and appendix G).

The encoder maps images ``[B, C, H, W]`` to the mean and log-variance of a diagonal Gaussian
q(z | x) over latents ``[B, c, H/F, W/F]`` (F the downsampling factor, c the latent channels); the
decoder maps a latent back to an image. It is built from the U-Net's residual blocks without a
time embedding, its downsamples, upsamples and self-attention, at the widths and depth Rombach et
al.'s first-stage models use (one level per halving, a middle block with attention). It knows
nothing of diffusion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import SettingError, check_fields, setting
from .unet import AttentionBlock, Downsample, ResBlock, Upsample, _group_norm

DOWNSAMPLES = (1, 2, 4, 8)
# Width of each level in base channels: one level per halving of the image, as Rombach et al.'s
# f = 4 and f = 8 models (ch_mult 1,2,4 and 1,2,4,4).
LEVEL_MULTS = (1, 2, 4, 4)
# The log-variance is clamped where exp() stays finite in fp32 and bf16 (as Rombach et al.'s
# DiagonalGaussianDistribution does): a wild encoder output cannot make the KL infinite.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """Shape of the autoencoder. ``in_channels`` and ``image_size`` follow the data."""

    in_channels: int = setting(1, flag=None, at_least=1, help="channels of the images")
    image_size: int = setting(28, flag=None, at_least=1, help="side of the square images")
    downsample: int = setting(4, flag="--downsample", choices=DOWNSAMPLES,
                              help="F: the latents are F times smaller on each side than the images")
    latent_channels: int = setting(4, flag="--latent-channels", at_least=1,
                                   help="channels of the latents")
    base_channels: int = setting(32, flag="--base-channels", at_least=1,
                                 help="width of the first level (the next ones are 2x and 4x)")
    num_res_blocks: int = setting(1, flag="--num-res-blocks", at_least=1,
                                  help="residual blocks per level")
    norm_groups: int = setting(32, flag="--norm-groups", at_least=1,
                               help="GroupNorm groups (fewer where the width has no such divisor)")

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what would work."""
        check_fields(self)
        if self.image_size % self.downsample:
            divisors = [f for f in DOWNSAMPLES if self.image_size % f == 0]
            raise SettingError(
                "model.downsample",
                f"the downsampling factor {{setting}} {self.downsample} does not divide the image "
                f"size {self.image_size}: give {' or '.join(map(str, divisors))}, or an image size "
                f"that {self.downsample} divides")

    @property
    def channel_mults(self) -> tuple[int, ...]:
        """The width of each level, in base channels: log2(F) + 1 levels."""
        return LEVEL_MULTS[: int(math.log2(self.downsample)) + 1]

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(c, H/F, W/F)``: one latent's shape."""
        return self.latent_channels, self.latent_size, self.latent_size


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's ``[B, 2c, h, w]`` output."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, 2c, h, w] -> 2 x [B, c, h, w]
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation (Kingma & Welling 2014)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) of each image, ``[B]``, in nats:
        1/2 sum (mean^2 + var - 1 - log var) over the latent's elements."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class _Level(nn.Module):
    """The residual blocks of one resolution, then the down- or upsample (or nothing)."""

    def __init__(self, blocks: Sequence[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(self.blocks(x))


def _block(in_ch: int, out_ch: int, groups: int) -> ResBlock:
    return ResBlock(in_ch, out_ch, None, 0.0, groups)


class _Middle(nn.Module):
    """Residual block, self-attention, residual block: the one place that sees the whole latent."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block1 = _block(channels, channels, groups)
        self.attention = AttentionBlock(channels, channels, groups)  # one head
        self.block2 = _block(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.attention(self.block1(x)))


class Encoder(nn.Module):
    """``[B, C, H, W]`` -> ``[B, 2c, H/F, W/F]``: the mean and log-variance of q(z | x)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        widths = [c.base_channels * m for m in c.channel_mults]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        levels, ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [_block(ch if j == 0 else width, width, groups) for j in range(c.num_res_blocks)]
            ch = width
            last = i == len(widths) - 1
            levels.append(_Level(blocks, nn.Identity() if last else Downsample(width)))
        self.levels = nn.ModuleList(levels)
        self.middle = _Middle(ch, groups)
        self.norm_out = _group_norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.middle(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``[B, c, H/F, W/F]`` -> ``[B, C, H, W]``, the mirror of :class:`Encoder` (one more block
    per level, as Rombach et al.'s decoder has)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        widths = [c.base_channels * m for m in c.channel_mults][::-1]  # deepest first
        self.conv_in = nn.Conv2d(c.latent_channels, widths[0], 3, padding=1)
        self.middle = _Middle(widths[0], groups)
        levels, ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [_block(ch if j == 0 else width, width, groups)
                      for j in range(c.num_res_blocks + 1)]
            ch = width
            last = i == len(widths) - 1
            levels.append(_Level(blocks, nn.Identity() if last else Upsample(width)))
        self.levels = nn.ModuleList(levels)
        self.norm_out = _group_norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Autoencoder(nn.Module):
    """x -> q(z | x) -> z -> x-hat. Images and reconstructions are in [-1, 1] (the diffusion
    model's range); latents are unscaled here (the run's scale factor is applied outside)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """The reconstruction of a posterior sample, and the posterior."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017), as Esser et al. 2021 and Rombach et al. train their
    autoencoders against: strided 4x4 convolutions down to one logit per overlapping patch of
    the image (7x7 patches' logits for 28 px images), real images high, reconstructions low."""

    def __init__(self, in_channels: int, width: int, groups: int, layers: int = 2):
        super().__init__()
        convs: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
                                  nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(1, layers):
            convs += [nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), _group_norm(2 * ch, groups),
                      nn.LeakyReLU(0.2)]
            ch *= 2
        convs.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, 1, H/2^layers, W/2^layers]``."""
        return self.net(x)
