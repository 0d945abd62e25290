"""Fetching a dataset's files with torchvision's downloaders (``--download``), and the message
that says how to lay them out by hand when there is no internet."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .files import _loadmat
from .registry import _LAYOUT, _SOURCE, TINYIMAGENET_MD5, TINYIMAGENET_URL, DatasetNotFoundError

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
    """Fetch ``dataset`` into ``root`` as torchvision lays it out; offline: DatasetNotFoundError."""
    if dataset not in _SOURCE:
        raise DatasetNotFoundError(
            f"{dataset} cannot be downloaded: it is a folder of images you provide (Kaggle's Flowers "
            f"Recognition needs an account); check that {root} holds the images"
        )
    if dataset == "flowers102":
        _loadmat()  # torchvision reads the .mat files with scipy too; say so before downloading
    from torchvision import datasets
    from torchvision.datasets import utils

    try:
        root.mkdir(parents=True, exist_ok=True)
        if dataset in ("mnist", "fashion-mnist"):
            cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
            for train in (True, False):
                cls(str(root), train=train, download=True)
        elif dataset in ("cifar10", "cifar100"):
            (datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100)(str(root), download=True)
        elif dataset == "flowers102":
            datasets.Flowers102(str(root), download=True)
        else:
            utils.download_and_extract_archive(TINYIMAGENET_URL, str(root), md5=TINYIMAGENET_MD5)
    except PermissionError as exc:
        raise DatasetNotFoundError(f"cannot download {dataset} into {root} ({exc}); pass a "
                                   f"--data-dir you can write to") from exc
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision raises both
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DatasetNotFoundError(
            f"could not download {dataset} from {_SOURCE[dataset]} ({reason}); download it on a "
            f"machine with internet into {root} ({_LAYOUT[dataset]}) and pass --data-dir {root}"
        ) from exc
