"""Pictures: sample grids and per-image PNGs (the reverse-process figures build on these)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from .checkpoint import atomic_write_bytes
from .data import to_unit_range


def grid_image(x: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in [-1, 1] -> one grid ``[C, H', W']`` in [0, 1], near-square."""
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    return make_grid(to_unit_range(x.cpu()), nrow=nrow, padding=padding, pad_value=1.0)


def _png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    save_image(image, buf, format="png")
    return buf.getvalue()


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write images ``[B, C, H, W]`` in [-1, 1] as one PNG grid, atomically."""
    path = Path(path)
    atomic_write_bytes(_png_bytes(grid_image(x, nrow)), path)
    return path


def save_images(x: torch.Tensor, folder: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Write each image of ``[B, C, H, W]`` in [-1, 1] as ``folder/000000.png`` and so on."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_unit_range(x.cpu())):
        path = folder / f"{start_index + i:06d}.png"
        atomic_write_bytes(_png_bytes(img), path)
        paths.append(path)
    return paths


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Images ``[B, C, H, W]`` in [-1, 1] -> uint8 ``[B, H, W, C]`` (the layout FID tools read)."""
    return (to_unit_range(x.cpu()) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_npz(x: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write images ``[B, C, H, W]`` in [-1, 1] as ``arr_0``, uint8 ``[B, H, W, C]``, atomically."""
    buf = io.BytesIO()
    np.savez(buf, arr_0=to_uint8_nhwc(x))
    path = Path(path)
    atomic_write_bytes(buf.getvalue(), path)
    return path
