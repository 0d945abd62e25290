"""A split from its options: the reader for the dataset (downloading first when asked), its
images fitted to the stored size and channels, in memory or streamed from disk."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .arrays import _ARRAY_READERS
from .cache import _decode_files, _drop_unreadable
from .download import _with_download
from .files import _FileIndex, _index_flowers102, _index_folder, _index_tinyimagenet
from .pixels import _fit_array
from .registry import (
    FILE_DATASETS,
    FOLDER_DATASETS,
    _data_root,
    check_options,
    resolve,
    size_and_channels,
    stored_size,
)
from .sources import ImageData, StreamingImages

if TYPE_CHECKING:  # only for annotations: config.py may import this package, never the reverse
    from ..config import DataConfig


def load_dataset(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    *,
    download: bool = False,
    image_size: int | None = None,
    channels: int | None = None,
    crop: str = "center",
    folder_labels: bool = False,
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    progress: bool = False,
    workers: int = 0,
) -> ImageData:
    """A split in memory, at ``stored_size(image_size, crop)`` with ``channels`` (None: the
    dataset's own). Raises DatasetNotFoundError with a how-to when the files are missing.

    Image files are decoded (in ``workers`` processes) once, then read from ``cache_dir``.
    """
    check_options(dataset, split, image_size, channels, crop)
    root = _data_root(dataset, data_dir)
    image_size, channels = size_and_channels(dataset, image_size, channels)
    size = stored_size(image_size, crop)
    if dataset not in FILE_DATASETS:
        images, labels, classes = _with_download(_ARRAY_READERS[dataset], dataset, root, split, download)
        return ImageData(_fit_array(images, size, channels, crop), labels, dataset, classes)
    index = _index_files(dataset, root, split, download=download, folder_labels=folder_labels)
    return _decode_files(index, size=size, channels=channels, crop=crop, cache_dir=cache_dir,
                         strict=strict, progress=progress, workers=workers)


def open_dataset(config: DataConfig, split: str | None = None, *,
                 progress: bool = False) -> ImageData | StreamingImages:
    """``config``'s split (or ``split``): in memory when its decoded images fit
    ``config.max_memory_gb``, else (image files only) streamed from disk by DataLoader workers."""
    c = resolve(config if split is None else dataclasses.replace(config, split=split))
    assert c.data_dir is not None and c.image_size is not None and c.channels is not None  # resolved
    options: dict[str, Any] = dict(
        image_size=c.image_size, channels=c.channels, crop=c.crop, download=c.download,
        folder_labels=c.folder_labels, cache_dir=c.cache_dir, strict=c.strict, progress=progress,
        workers=c.workers)
    if c.dataset not in FILE_DATASETS:  # arrays in a few files: always in memory
        return load_dataset(c.dataset, c.data_dir, c.split, **options)
    size = stored_size(c.image_size, c.crop)
    index = _index_files(c.dataset, Path(c.data_dir), c.split, download=c.download,
                         folder_labels=c.folder_labels)
    if len(index.paths) * c.channels * size * size <= c.max_memory_gb * 1e9:
        return _decode_files(index, size=size, channels=c.channels, crop=c.crop,
                             cache_dir=c.cache_dir, strict=c.strict, progress=progress,
                             workers=c.workers)
    index = _drop_unreadable(index, strict=c.strict, progress=progress)
    return StreamingImages(index.paths, torch.from_numpy(index.labels), name=c.dataset,
                           classes=index.classes, size=size, channels=c.channels, crop=c.crop,
                           strict=c.strict)


def _index_files(dataset: str, root: Path, split: str, *, download: bool,
                 folder_labels: bool) -> _FileIndex:
    root = root.expanduser().resolve()
    if dataset in FOLDER_DATASETS:
        return _index_folder(dataset, root, labelled=folder_labels or dataset == "flowers-folder",
                             download=download)
    reader = {"flowers102": _index_flowers102, "tinyimagenet": _index_tinyimagenet}[dataset]
    return _with_download(reader, dataset, root, split, download)
