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
from .files import _FILE_INDEXERS, _FileIndex, _index_folder
from .pixels import _fit_array
from .registry import check_options, data_root, dataset_spec, size_and_channels, stored_size
from .sources import ImageData, StreamingImages

if TYPE_CHECKING:  # only for annotations: config.py may import this package, never the reverse
    from .config import DataConfig


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
    root, image_size, channels = _located(dataset, split, data_dir, image_size, channels, crop)
    size = stored_size(image_size, crop)
    spec = dataset_spec(dataset)
    if spec.kind == "arrays":
        read = _ARRAY_READERS[spec.reader]
        images, labels, classes = _with_download(read, dataset, root, split, download)
        return ImageData(_fit_array(images, size, channels, crop), labels, dataset, classes)
    index = _index_files(dataset, root, split, download=download, folder_labels=folder_labels)
    return _decode_files(index, size=size, channels=channels, crop=crop, cache_dir=cache_dir,
                         strict=strict, progress=progress, workers=workers)


def open_dataset(config: DataConfig, split: str | None = None, *,
                 progress: bool = False) -> ImageData | StreamingImages:
    """``config``'s split (or ``split``): in memory when its decoded images fit
    ``config.max_memory_gb``, else (image files only) streamed from disk by DataLoader workers."""
    c = config if split is None else dataclasses.replace(config, split=split)
    root, image_size, channels = _located(c.dataset, c.split, c.data_dir, c.image_size,
                                          c.channels, c.crop)
    options: dict[str, Any] = dict(
        image_size=image_size, channels=channels, crop=c.crop, download=c.download,
        folder_labels=c.folder_labels, cache_dir=c.cache_dir, strict=c.strict, progress=progress,
        workers=c.workers)
    if dataset_spec(c.dataset).kind == "arrays":  # arrays in a few files: always in memory
        return load_dataset(c.dataset, root, c.split, **options)
    size = stored_size(image_size, c.crop)
    index = _index_files(c.dataset, root, c.split, download=c.download,
                         folder_labels=c.folder_labels)
    if len(index.paths) * channels * size * size <= c.max_memory_gb * 1e9:
        return _decode_files(index, size=size, channels=channels, crop=c.crop,
                             cache_dir=c.cache_dir, strict=c.strict, progress=progress,
                             workers=c.workers)
    index = _drop_unreadable(index, strict=c.strict, progress=progress)
    return StreamingImages(index.paths, torch.from_numpy(index.labels), name=c.dataset,
                           classes=index.classes, size=size, channels=channels, crop=c.crop,
                           strict=c.strict)


def labelled_images_at(data: ImageData | StreamingImages,
                       idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images of a split at ``idx`` and their labels; of a streamed split, those that
    decode (a corrupt file is left out, with its label)."""
    if isinstance(data, ImageData):
        return data.images[idx], data.labels[idx]
    items = [data[int(i)] for i in idx]
    good = [int(idx[k]) for k, (_, _, error) in enumerate(items) if not error]
    return torch.stack([image for _, image, error in items if not error]), data.labels[good]


def images_at(data: ImageData | StreamingImages, idx: torch.Tensor) -> torch.Tensor:
    """The uint8 images of a split at ``idx`` (:func:`labelled_images_at`'s)."""
    return labelled_images_at(data, idx)[0]


def held_out_images(config: DataConfig, limit: int, *,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit`` fixed random uint8 images of the data's held-out split (the test split, or a
    folder's own split: a folder has no other), and their labels."""
    split = config.split if dataset_spec(config.dataset).folder else "test"
    source = open_dataset(config, split)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))
    return labelled_images_at(source, order[:limit])


def _located(dataset: str, split: str, data_dir: str | os.PathLike | None, image_size: int | None,
             channels: int | None, crop: str) -> tuple[Path, int, int]:
    """(folder, image size, channels) of a split's options, checked, each None filled in with
    the dataset's own (``registry``); ValueError naming a bad option."""
    check_options(dataset, split, image_size, channels, crop)
    return (data_root(dataset, data_dir), *size_and_channels(dataset, image_size, channels))


def _index_files(dataset: str, root: Path, split: str, *, download: bool,
                 folder_labels: bool) -> _FileIndex:
    root = root.expanduser().resolve()
    spec = dataset_spec(dataset)
    if spec.folder:
        return _index_folder(dataset, root, labelled=folder_labels or spec.class_folders,
                             download=download)
    return _with_download(_FILE_INDEXERS[spec.reader], dataset, root, split, download)
