"""The DDPM U-Net denoiser (Ho et al. 2020, appendix B; PixelCNN++-style residual blocks).

It knows nothing of noise schedules: it maps ``x_t`` ``[B, C, H, W]``, integer timesteps ``t``
``[B]`` and, for a class-conditional model, labels ``y`` ``[B]`` to a tensor of the same shape as
``x_t``: the prediction of eps, x0 or v that it was trained to make. With ``learn_variance`` it
returns ``[B, 2C, H, W]``: that prediction, then the variance interpolation (``diffusion.py``).

Its downsampling half, with a pooled head, is also :class:`NoisyClassifier`, the classifier
p_phi(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import check_fields, setting

BLOCKS = ("resnet", "convnext")


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Shape of the U-Net. ``attention_resolutions`` are feature-map sizes in pixels.

    ``in_channels``, ``image_size`` and ``num_classes`` follow the data (``config.resolve``,
    ``ddpm train --conditional``); the others are settings with a flag of their own."""

    in_channels: int = setting(1, flag=None, at_least=1, help="channels of the images")
    image_size: int = setting(28, flag=None, at_least=1, help="side of the square images")
    base_channels: int = setting(64, flag="--base-channels", at_least=1,
                                 help="width of the first level")
    channel_mults: tuple[int, ...] = setting(
        (1, 2, 2), flag="--channel-mults", at_least=1, min_items=1, metavar="M1,M2,...", example="1,2,2",
        help="width of each level in base channels; each level after the first halves the image")
    num_res_blocks: int = setting(2, flag="--num-res-blocks", at_least=1,
                                  help="blocks per level on the way down")
    attention_resolutions: tuple[int, ...] = setting(
        (7,), flag="--attention-resolutions", at_least=1, metavar="PX,...", example="14,7",
        help="feature-map sizes with self-attention, e.g. 14,7 ('' for none)")
    attention_head_dim: int = setting(32, flag="--attention-head-dim", at_least=1,
                                      help="channels per attention head")
    dropout: float = setting(0.1, flag="--dropout", at_least=0, below=1,
                             help="dropout inside the blocks")
    norm_groups: int = setting(32, flag="--norm-groups", at_least=1,
                               help="GroupNorm groups (fewer where the width has no such divisor)")
    # resnet (Ho et al.) | convnext (Liu et al. 2022, as in the seeds' U-Net)
    block: str = setting("resnet", flag="--arch", choices=BLOCKS,
                         help="U-Net blocks: resnet (Ho et al. 2020) or convnext (Liu et al. 2022)")
    # Fold p x p pixels into channels before the first level (space-to-depth; the patches of
    # ViT-style diffusion models): with p = 2 a 1x28x28 image enters as 4x14x14,
    # so every level costs ~p^2 fewer FLOPs at the same width.
    patch_size: int = setting(1, flag="--patch-size", at_least=1,
                              help="fold PxP pixels into channels before the first level: ~P^2 "
                                   "fewer FLOPs, but a grid texture on 28 px images (BENCHMARKS.md)")
    convnext_mult: int = setting(2, flag="--convnext-mult", at_least=1,
                                 help="convnext: width of the block's inner layer, in output channels")
    # Class-conditional with this many classes (0: unconditional). Label ``num_classes`` is the
    # null class, "no label", which classifier-free guidance needs (Ho & Salimans 2022).
    num_classes: int = setting(0, flag=None, at_least=0,
                               help="classes of a class-conditional model (0: unconditional)")
    # Ho et al. 2020 (their code's resnet_block: dense(nonlinearity(temb))), guided-diffusion and
    # diffusers pass the time embedding through a SiLU before each residual block's projection.
    # ddpm before 0.2 did not; checkpoints saved then say False (RunConfig.from_dict) and keep
    # computing what they computed. With it, diffusers' UNet2DModel can hold our network.
    time_silu: bool = setting(True, flag=None,
                              help="a SiLU on the time embedding before each resnet block's "
                                   "projection (Ho et al. 2020)")
    # Nichol & Dhariwal 2021, sec. 3.1: a second C output channels, v, set the reverse
    # process's variance between beta-tilde_t and beta_t (their eq. 15); trained by L_hybrid.
    learn_variance: bool = setting(
        False, flag="--learn-variance",
        help="also learn the reverse process's variances (Nichol & Dhariwal 2021): 2C output "
             "channels, trained with L_simple + 0.001 L_vlb; ancestral sampling then needs far "
             "fewer steps")

    # A super-resolution model (superres.py): its upsampled low-res input enters beside x_t as
    # this many channels, and the noise level of its augmentation through a second embedding.
    cond_channels: int = setting(0, flag=None, at_least=0,
                                 help="channels of a conditioning image beside x_t (0: none)")
    level_embedding: bool = setting(False, flag=None,
                                    help="a second time embedding, of the conditioning's noise level")

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what would work."""
        check_fields(self)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(
                f"patch size {self.patch_size} must be at least 1 and divide the image size "
                f"{self.image_size}"
            )
        factor = self.patch_size * 2 ** (len(self.channel_mults) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"image size {self.image_size} cannot be halved {len(self.channel_mults) - 1} "
                f"times by a U-Net with channel_mults {self.channel_mults} after patches of "
                f"{self.patch_size}: use a size divisible by {factor}, or fewer levels"
            )
        sizes = self.level_sizes()
        unused = [r for r in self.attention_resolutions if r not in sizes]
        if unused:
            raise ValueError(
                f"attention resolutions {unused} match no level of this U-Net; its feature maps "
                f"are {sizes} pixels"
            )

    def level_sizes(self) -> list[int]:
        """The side of the feature maps at each level, in pixels (after patching)."""
        return [self.image_size // self.patch_size // 2**i for i in range(len(self.channel_mults))]


def _zero_init(conv: nn.Conv2d) -> None:
    """Weight and bias to zero: the layer outputs zeros until training moves it."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:  # (always made with one here)
        nn.init.zeros_(conv.bias)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # The largest group count <= ``groups`` that divides the channels, so any width works.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``[B]`` -> ``[B, dim]`` (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float()[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, the time embedding added in between, and a skip connection.
    With ``time_dim`` None it takes no time embedding (the autoencoder's blocks)."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, dropout: float, groups: int,
                 time_silu: bool = True):
        super().__init__()
        self.time_silu = time_silu
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim is not None else None
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        _zero_init(self.conv2)  # each block starts as the identity
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            assert temb is not None, "a block with a time projection takes a time embedding"
            temb = F.silu(temb) if self.time_silu else temb
            h = h + self.time_proj(temb)[:, :, None, None]  # [B, C] -> [B, C, 1, 1]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block (Liu et al. 2022) as diffusion U-Nets adapt it: a 7x7 depthwise conv, the
    time embedding added, then norm, a 3x3 conv widening by ``mult``, GELU, norm, a 3x3 conv back,
    and a skip connection. It mixes space once, cheaply, and spends its FLOPs on channels."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, mult: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 7, padding=3, groups=in_ch)
        self.time_proj = nn.Sequential(nn.GELU(), nn.Linear(time_dim, in_ch))
        self.norm1 = nn.GroupNorm(1, in_ch)  # one group: LayerNorm over (C, H, W)
        self.conv1 = nn.Conv2d(in_ch, out_ch * mult, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, out_ch * mult)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch * mult, out_ch, 3, padding=1)
        _zero_init(self.conv2)  # each block starts as the identity
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x) + self.time_proj(temb)[:, :, None, None]
        h = F.gelu(self.conv1(self.norm1(h)))
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        _zero_init(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # [B, 3C, H, W]
        # [B, 3C, H, W] -> [3, B, heads, H*W, C/heads]
        qkv = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, HW, C/heads]
        out = out.transpose(2, 3).reshape(b, c, h, w)  # -> [B, C, H, W]
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one U-Net resolution."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)


class _DownPath(nn.Module):
    """The U-Net's way down, shared by :class:`UNet` and :class:`NoisyClassifier`: the time
    embedding's MLP, the input convolution (after folding patches), the levels of blocks with
    their attention and downsamples, and the middle block.

    Its modules are attributes of the network itself (``time_mlp``, ``conv_in``, ``down_levels``,
    ``downsamples``, ``mid_*``), not of a submodule, so the U-Net's parameter names, which its
    checkpoints hold, are those it always had; and they are made in the order they always were,
    so the same seed initialises the same weights."""

    def _init_time(self, config: UNetConfig) -> None:
        config.validate()
        self.config = config
        ch = config.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))

    def _block(self, in_ch: int, out_ch: int) -> nn.Module:
        c = self.config
        time_dim = 4 * c.base_channels
        if c.block == "convnext":
            return ConvNeXtBlock(in_ch, out_ch, time_dim, c.dropout, c.convnext_mult)
        return ResBlock(in_ch, out_ch, time_dim, c.dropout, c.norm_groups, c.time_silu)

    def _attention(self, channels: int, size: int) -> nn.Module:
        c = self.config
        if size in c.attention_resolutions:
            return AttentionBlock(channels, c.attention_head_dim, c.norm_groups)
        return nn.Identity()

    def _init_down(self) -> list[int]:
        """Make the way down; return the channels of each output it keeps for a skip connection
        (the input conv's, each block's, each downsample's), the last being the middle's width."""
        config = self.config
        ch = config.base_channels
        in_channels = config.in_channels + config.cond_channels
        self.conv_in = nn.Conv2d(in_channels * config.patch_size**2, ch, 3, padding=1)
        skip_channels = [ch]
        self.down_levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        cur = ch
        for level, (mult, size) in enumerate(zip(config.channel_mults, config.level_sizes(), strict=True)):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(self._block(cur, out))
                attns.append(self._attention(out, size))
                cur = out
                skip_channels.append(cur)
            self.down_levels.append(_Level(blocks, attns))
            if level < len(config.channel_mults) - 1:
                self.downsamples.append(Downsample(cur))
                skip_channels.append(cur)

        self.mid_block1 = self._block(cur, cur)
        self.mid_attn = AttentionBlock(cur, config.attention_head_dim, config.norm_groups)
        self.mid_block2 = self._block(cur, cur)
        return skip_channels

    def _time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps ``[B]`` (int64, or float for real-valued steps) -> ``[B, 4ch]``, in the
        weights' dtype (float32 as made; float64 for gradient checks)."""
        emb = timestep_embedding(t, self.config.base_channels)  # [B, ch], float32
        first = cast(nn.Linear, self.time_mlp[0])  # Sequential's items are typed as Module
        return self.time_mlp(emb.to(first.weight.dtype))

    def _down(self, x: torch.Tensor, temb: torch.Tensor,
              skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``x`` ``[B, C, H, W]`` -> the middle block's output ``[B, ch * mults[-1], H/p/2^(L-1),
        W/p/2^(L-1)]``, appending the outputs kept for the skip connections to ``skips``."""
        keep = skips.append if skips is not None else (lambda h: None)
        p = self.config.patch_size
        # [B, C, H, W] -> patches [B, C p^2, H/p, W/p] -> [B, ch, H/p, W/p]
        h = self.conv_in(F.pixel_unshuffle(x, p) if p > 1 else x)
        keep(h)
        for i, level in enumerate(cast("list[_Level]", self.down_levels)):  # (typed as Modules)
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, temb))
                keep(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                keep(h)
        return self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)


class UNet(_DownPath):
    """The DDPM U-Net denoiser: ``forward(x_t [B, C, H, W], t [B], y [B] | None) ->
    prediction [B, C, H, W]`` of eps, x0 or v (``[B, 2C, H, W]`` with the variance
    interpolation after it, for a model that learns its variances). ``y`` is ignored by an
    unconditional model; a conditional one reads ``y = None`` as the null class everywhere."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self._init_time(config)
        ch = config.base_channels
        # A learned vector per class, added to the time embedding (as in Ho & Salimans 2022 and
        # diffusers' class_embed_type=None); the last row is the null class.
        self.class_emb = (nn.Embedding(config.num_classes + 1, 4 * ch)
                          if config.num_classes else None)
        # Down path: remember each block's output channels for the skip connections.
        skip_channels = self._init_down()
        cur, size = skip_channels[-1], config.level_sizes()[-1]

        # Up path: one more block per level than on the way down, each eating one skip.
        self.up_levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(self._block(cur + skip_channels.pop(), out))
                attns.append(self._attention(out, size))
                cur = out
            self.up_levels.append(_Level(blocks, attns))
            if level > 0:
                self.upsamples.append(Upsample(cur))
                size *= 2

        self.norm_out = _group_norm(cur, config.norm_groups)
        # [prediction, variance interpolation] per pixel with a learned variance: 2C channels
        patch_channels = config.in_channels * config.patch_size**2
        out_channels = patch_channels * (2 if config.learn_variance else 1)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        _zero_init(self.conv_out)
        # Imagen's embedding of the augmentation level, added to the time embedding (made last,
        # so that the other weights draw what they always drew from the same seed).
        self.level_mlp = (nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
                          if config.level_embedding else None)

    @property
    def null_class(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional model)."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, *,
                cond: torch.Tensor | None = None, cond_level: torch.Tensor | None = None) -> torch.Tensor:
        temb = self._time_embedding(t)  # [B, 4ch]
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            temb = temb + self.class_emb(y)
        if self.config.cond_channels:
            if cond is None or cond_level is None:
                raise ValueError("a super-resolution U-Net takes its low-res input: give cond "
                                 "[B, C, H, W] and cond_level [B]")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)  # [B, C + C_cond, H, W]
        if self.level_mlp is not None:
            assert cond_level is not None
            first = cast(nn.Linear, self.level_mlp[0])
            embedded = timestep_embedding(cond_level, self.config.base_channels)
            temb = temb + self.level_mlp(embedded.to(first.weight.dtype))
        skips: list[torch.Tensor] = []
        h = self._down(x, temb, skips)
        for i, level in enumerate(cast("list[_Level]", self.up_levels)):  # (typed as Modules)
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        p = self.config.patch_size
        return F.pixel_shuffle(out, p) if p > 1 else out


class NoisyClassifier(_DownPath):
    """The noise-aware classifier p_phi(y | x_t, t) of classifier guidance (Dhariwal & Nichol
    2021, sec. 4): the U-Net's downsampling half, then GroupNorm, SiLU, a global average pool and
    a linear layer to the logits (their encoder with the "adaptive" pooled head).

    ``forward(x_t [B, C, H, W], t [B] int64 or float) -> logits [B, K]`` with ``K =
    config.num_classes``. It is built from a :class:`UNetConfig` (width, levels, blocks,
    attention, patches); the config's ``num_classes`` is the number of classes of the head, and
    the network gets no class embedding (it reads the class from the image), nor does
    ``learn_variance`` change it.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.num_classes < 2:
            raise ValueError(
                f"a classifier needs at least 2 classes, got num_classes={config.num_classes}; "
                f"give UNetConfig(num_classes=K), K being the classes of the data"
            )
        self._init_time(config)
        width = self._init_down()[-1]
        self.norm_out = _group_norm(width, config.norm_groups)
        self.head = nn.Linear(width, config.num_classes)
        # Zero-initialised, as guided-diffusion's head: every class starts equally likely.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self._down(x_t, self._time_embedding(t))  # [B, C', H', W']
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # average pool: [B, C', H', W'] -> [B, C']
        return self.head(h)  # [B, K]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
