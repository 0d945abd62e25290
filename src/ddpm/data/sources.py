"""The two kinds of split a :class:`~ddpm.data.stream.BatchStream` draws from: :class:`ImageData`,
a whole split in memory, and :class:`StreamingImages`, image files decoded on demand."""

from __future__ import annotations

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
