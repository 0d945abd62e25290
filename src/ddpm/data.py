"""Datasets held in memory as one uint8 tensor, and the [0, 1] <-> [-1, 1] conversions.

Fashion-MNIST (and MNIST) are read from the original IDX files: the ones Debian's package
``dataset-fashion-mnist`` installs in /usr/share/datasets/fashion-mnist, or the ones torchvision
downloads with ``--download``.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("fashion-mnist", "mnist")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# Where torchvision's FashionMNIST / MNIST classes keep the files they download under ``root``.
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing; the message says how to get them."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = data[4 + 4 * ndim :]
    if len(payload) != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), "
            f"found {len(payload)} bytes"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


def _find_idx(data_dir: Path, dataset: str, stem: str) -> Path | None:
    for folder in (data_dir, data_dir / _TORCHVISION_FOLDER[dataset] / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _missing_message(dataset: str, data_dir: Path, stem: str) -> str:
    how = (
        "install Debian's package (apt-get install dataset-fashion-mnist) and use its folder "
        "/usr/share/datasets/fashion-mnist, or "
        if dataset == "fashion-mnist"
        else ""
    )
    return (
        f"{dataset} not found: no {stem}[.gz] in {data_dir}. To get it, {how}pass --download "
        f"(needs internet) to fetch it into --data-dir with torchvision"
    )


def _download(dataset: str, data_dir: Path) -> None:
    """Fetch the IDX files through torchvision into ``data_dir/<Name>/raw``."""
    from torchvision import datasets

    cls = datasets.FashionMNIST if dataset == "fashion-mnist" else datasets.MNIST
    for train in (True, False):
        cls(str(data_dir), train=train, download=True)


@dataclass(frozen=True)
class ImageData:
    """A whole split in memory: ``images`` uint8 ``[N, C, H, W]`` and ``labels`` int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_dataset(
    dataset: str, data_dir: str | os.PathLike, split: str = "train", *, download: bool = False
) -> ImageData:
    """Load a dataset split into memory. Raises DatasetNotFoundError with a how-to if missing."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; choose train or test")
    root = Path(data_dir)
    prefix = _SPLIT_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(root, dataset, s) for s in stems]
    if download and None in paths:
        _download(dataset, root)
        paths = [_find_idx(root, dataset, s) for s in stems]
    for stem, path in zip(stems, paths):
        if path is None:
            raise DatasetNotFoundError(_missing_message(dataset, root, stem))
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"{paths[0]} and {paths[1]} do not match: images {images.shape}, labels {labels.shape}"
        )
    return ImageData(
        images=torch.from_numpy(images.copy()).unsqueeze(1),  # [N, H, W] -> [N, 1, H, W]
        labels=torch.from_numpy(labels.astype(np.int64)),
        name=dataset,
    )


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255], rounded as a saved PNG is (the inverse of to_model_range)."""
    return (to_unit_range(x) * 255).round().to(torch.uint8)


class BatchStream:
    """Endless shuffled batches from an in-memory dataset, resumable from its ``state_dict``.

    Each epoch is a fresh permutation drawn from ``generator``; a horizontal flip, when enabled,
    is drawn per image from the same generator and applied to the whole batch at once.
    """

    def __init__(self, data: ImageData, batch_size: int, *, hflip: bool, generator: torch.Generator):
        if batch_size > len(data):
            raise ValueError(
                f"batch size {batch_size} is larger than the dataset ({len(data)} images)"
            )
        self.data = data
        self.batch_size = batch_size
        self.hflip = hflip
        self.generator = generator
        self.perm = torch.randperm(len(data), generator=generator)
        self.pos = 0
        self.epoch = 0

    def next(self) -> torch.Tensor:
        """The next batch, float32 ``[B, C, H, W]`` in [-1, 1] (drops an epoch's ragged tail)."""
        if self.pos + self.batch_size > len(self.data):
            self.perm = torch.randperm(len(self.data), generator=self.generator)
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        x = to_model_range(self.data.images[idx])
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=self.generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_images(path: str | os.PathLike) -> torch.Tensor:
    """Images from anywhere, as uint8 ``[N, C, H, W]``: a ``.npz`` whose ``arr_0`` is uint8
    ``[N, H, W, C]`` (what ``ddpm sample --out x.npz`` and the ADM evaluation suite write) or
    ``[N, H, W]``, or a folder of image files (searched recursively, all of one size)."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path) as z:
                if "arr_0" not in z.files:
                    raise ValueError(f"it holds {z.files}, not 'arr_0'")
                arr = z["arr_0"]
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read images from {path}: {exc}") from None
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C = 1 or 3 (or [N, H, W]), "
                             f"got {arr.dtype} {arr.shape}")
        arr = arr[..., None] if arr.ndim == 3 else arr
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    if not path.is_dir():
        raise ValueError(f"{path} is neither a folder of images nor a .npz file")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                grey = im.mode in ("L", "1", "I", "I;16", "LA")
                arrays.append(np.asarray(im.convert("L" if grey else "RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"cannot read image {f}: {exc}") from None
        if arrays[-1].shape[:2] != arrays[0].shape[:2]:
            raise ValueError(f"{f} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {files[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all images must be one size")
    if len({a.ndim for a in arrays}) > 1:  # mixed grey and colour: take all as RGB
        arrays = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in arrays]
    stack = np.stack(arrays)
    stack = stack[..., None] if stack.ndim == 3 else stack
    return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()
