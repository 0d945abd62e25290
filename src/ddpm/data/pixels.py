"""Pixel arithmetic shared by every source: the [0, 255] <-> [-1, 1] value ranges, fitting images
to the stored size and channels, random crops and random flips."""

from __future__ import annotations

import torch

# --- value ranges ---------------------------------------------------------------------------------


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255], rounded as a saved PNG is (the inverse of to_model_range)."""
    return (to_unit_range(x) * 255).round().to(torch.uint8)


# --- sizes and channels ---------------------------------------------------------------------------


def _fit(images: torch.Tensor, size: int, crop: str) -> torch.Tensor:
    """uint8 ``[..., C, H, W]`` -> ``[..., C, size, size]``: squashed ("resize"), or the shorter
    side resized to ``size`` and the centre cut out ("center", "random"); antialiased."""
    from torchvision.transforms.v2 import functional as F

    h, w = images.shape[-2:]
    if crop == "resize":
        return images if (h, w) == (size, size) else F.resize(images, [size, size], antialias=True)
    if min(h, w) != size:
        images = F.resize(images, size, antialias=True)  # int: the shorter side
    return images if images.shape[-2:] == (size, size) else F.center_crop(images, [size, size])


def _fit_array(images: torch.Tensor, size: int, channels: int, crop: str) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> ``[N, channels, size, size]``, in chunks to bound the float
    copies; returned as is when nothing changes."""
    if tuple(images.shape[1:]) == (channels, size, size):
        return images
    from torchvision.transforms.v2 import functional as F

    out = []
    for chunk in images.split(4096):
        if chunk.shape[1] == 3 and channels == 1:
            chunk = F.rgb_to_grayscale(chunk)  # before resizing: a third of the pixels to resize
        chunk = _fit(chunk, size, crop)
        if chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.repeat(1, 3, 1, 1)
        out.append(chunk.contiguous())
    return torch.cat(out)


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size`` x ``size`` window of each image at offsets drawn from ``generator``:
    ``[B, C, H, W]`` -> ``[B, C, size, size]``, all at once by two gathers."""
    b, c, h, w = images.shape
    device = generator.device  # where the images are
    dy = torch.randint(0, h - size + 1, (b,), generator=generator, device=device)
    dx = torch.randint(0, w - size + 1, (b,), generator=generator, device=device)
    rows = dy[:, None] + torch.arange(size, device=device)  # [B, size]
    cols = dx[:, None] + torch.arange(size, device=device)
    images = images.gather(2, rows[:, None, :, None].expand(b, c, size, w))  # [B, C, size, W]
    return images.gather(3, cols[:, None, None, :].expand(b, c, size, size))  # [B, C, size, size]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``[B, C, H, W]`` mirrored left to right with probability 1/2: one
    uniform draw per image from ``generator``, on its device (where the images are)."""
    return torch.where(flip_draws(x.shape[0], generator), x.flip(-1), x)


def flip_draws(n: int, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n`` images to mirror: one uniform draw each, below 1/2; ``[n, 1, 1, 1]``."""
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    return flip[:, None, None, None]
