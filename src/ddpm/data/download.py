"""Fetching a dataset's files with torchvision's downloaders (``--download``), and the message
that says how to lay them out by hand when there is no internet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .files import _loadmat
from .registry import DatasetNotFoundError, dataset_spec

T = TypeVar("T")


def _with_download(reader: Callable[[str, Path, str], T], dataset: str, root: Path, split: str,
                   download: bool) -> T:
    """``reader(dataset, root, split)``, fetching the files first when missing and asked to."""
    try:
        return reader(dataset, root, split)
    except DatasetNotFoundError:
        if not download:
            raise
    _download(dataset, root)
    return reader(dataset, root, split)


def _download(dataset: str, root: Path) -> None:
    """Fetch ``dataset`` into ``root`` as torchvision lays it out (by its record's torchvision
    class, else the archive at its source); offline: DatasetNotFoundError."""
    spec = dataset_spec(dataset)
    if spec.source is None:
        raise DatasetNotFoundError(
            f"{dataset} cannot be downloaded: it is a folder of images you provide (Kaggle's Flowers "
            f"Recognition needs an account); check that {root} holds the images"
        )
    if spec.reader == "flowers102":
        _loadmat()  # torchvision reads the .mat files with scipy too; say so before downloading
    from torchvision import datasets
    from torchvision.datasets import utils

    try:
        root.mkdir(parents=True, exist_ok=True)
        if spec.torchvision is None:
            utils.download_and_extract_archive(spec.source, str(root), md5=spec.md5)
        elif spec.reader == "idx":  # the IDX classes fetch one split each
            for train in (True, False):
                getattr(datasets, spec.torchvision)(str(root), train=train, download=True)
        else:
            getattr(datasets, spec.torchvision)(str(root), download=True)
    except PermissionError as exc:
        raise DatasetNotFoundError(f"cannot download {dataset} into {root} ({exc}); pass a "
                                   f"--data-dir you can write to") from exc
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision raises both
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DatasetNotFoundError(
            f"could not download {dataset} from {spec.source} ({reason}); download it on a "
            f"machine with internet into {root} ({spec.layout}) and pass --data-dir {root}"
        ) from exc
