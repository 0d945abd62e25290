"""The kinds of split a :class:`~ddpm.data.stream.BatchStream` draws from: :class:`ImageData`,
a whole split in memory, :class:`StreamingImages`, image files decoded on demand, and
:class:`LatentData`, a split encoded by an autoencoder (``ddpm.latent``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch

from .files import _DECODE_ERRORS, decode_image


@dataclass(frozen=True)
class ImageData:
    """A whole split in memory: ``images`` uint8 ``[N, C, S, S]``, ``labels`` int64 ``[N]`` and
    ``classes`` (the name of each label; empty when the data has no labels, all zeros then)."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: tuple[str, ...] = ()
    cached: bool = field(default=False, compare=False)  # read from the decoded-images cache

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, S, S)`` as stored (random crops are taken from these)."""
        return cast(tuple[int, int, int], tuple(self.images.shape[1:]))  # images are [N, C, S, S]


@dataclass(frozen=True)
class LatentData:
    """A split encoded once by an autoencoder, for latent diffusion: per image the Gaussian
    q(z | x), already multiplied by the autoencoder's scale factor, as ``mean`` and ``std``
    float32 ``[N, c, h, w]``; ``flipped`` holds the same of the mirrored images when batches
    are flipped. Each batch takes a fresh draw z = mean + std * eps (``sample``) or the mean."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor
    name: str
    classes: tuple[str, ...] = ()
    flipped: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) of mirrored images
    sample: bool = True

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(c, h, w)`` of the latents."""
        return cast(tuple[int, int, int], tuple(self.mean.shape[1:]))

    def to(self, device: torch.device) -> LatentData:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)
        flipped = None if self.flipped is None else (move(self.flipped[0]), move(self.flipped[1]))
        return dataclasses.replace(self, mean=move(self.mean), std=move(self.std),
                                   labels=move(self.labels), flipped=flipped)

    def nbytes(self) -> int:
        tensors = [self.mean, self.std, *(self.flipped or ())]
        return sum(t.numel() * t.element_size() for t in tensors)


class StreamingImages(torch.utils.data.Dataset):
    """A split too large for memory: image files decoded on demand (in DataLoader workers).

    Item ``i`` is ``(i, image uint8 [C, S, S], error)``; a file that fails to decode gives zeros
    and the error's text, which :class:`BatchStream` turns into a skip or (strict) an error.
    """

    def __init__(self, paths: list[Path], labels: torch.Tensor, *, name: str,
                 classes: tuple[str, ...], size: int, channels: int, crop: str, strict: bool = False):
        self.paths, self.labels, self.name, self.classes = list(paths), labels, name, classes
        self.size, self.channels, self.crop, self.strict = size, channels, crop, strict

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return i, decode_image(self.paths[i], self.size, self.channels, self.crop), ""
        except _DECODE_ERRORS as exc:
            return i, torch.zeros(self.image_shape, dtype=torch.uint8), f"{type(exc).__name__}: {exc}"
