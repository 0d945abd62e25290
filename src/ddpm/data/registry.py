"""The datasets by name and what is known of each: splits, native size and channels, flips, class
names, where to download them and how to lay them out by hand; the option checks and defaults
(:func:`check_options`, :func:`resolve`).

Nothing here reads a file or imports torch: config.py and the CLI use these names freely.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: config.py may import this module, never the reverse
    from ..config import DataConfig

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "flowers102", "flowers-folder",
            "tinyimagenet", "folder")
SPLITS = ("train", "test", "all")  # all: every labelled image of the dataset
CROPS = ("center", "resize", "random")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: datasets of image files (decoded, resized and cached); the others are arrays in a few files
FILE_DATASETS = ("flowers102", "flowers-folder", "tinyimagenet", "folder")
FOLDER_DATASETS = ("flowers-folder", "folder")
#: (native image size, native channels); None: the files come in any size
_NATIVE = {"mnist": (28, 1), "fashion-mnist": (28, 1), "cifar10": (32, 3), "cifar100": (32, 3),
           "flowers102": (None, 3), "flowers-folder": (None, 3), "tinyimagenet": (64, 3),
           "folder": (None, 3)}
FILE_IMAGE_SIZE = 64  # the default for datasets whose files have no one size
# Datasets whose images have one orientation, which flips would only teach the model to break:
# mirrored digits, and Fashion-MNIST's footwear, whose toes point left in 92-100% of each class.
_NO_FLIPS = frozenset({"mnist", "fashion-mnist"})

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
# Where --download fetches each dataset from, and the layout to recreate by hand when it cannot.
_SOURCE = {
    "mnist": "torchvision's MNIST mirrors",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "flowers102": "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    "tinyimagenet": TINYIMAGENET_URL,
}
_LAYOUT = {
    "mnist": "the four IDX files train-images-idx3-ubyte.gz ... t10k-labels-idx1-ubyte.gz, directly "
             "or in MNIST/raw/",
    "fashion-mnist": "the four IDX files train-images-idx3-ubyte.gz ... t10k-labels-idx1-ubyte.gz, "
                     "directly or in FashionMNIST/raw/",
    "cifar10": "cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, as "
               "cifar-10-python.tar.gz unpacks",
    "cifar100": "cifar-100-python/ with train, test and meta, as cifar-100-python.tar.gz unpacks",
    "flowers102": "flowers-102/ with jpg/image_00001.jpg ... (102flowers.tgz unpacked), "
                  "imagelabels.mat and setid.mat",
    "tinyimagenet": "tiny-imagenet-200/ with wnids.txt, words.txt, train/ and val/, as "
                    "tiny-imagenet-200.zip unpacks",
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing; the message says how to get them."""


# --- defaults and locations -----------------------------------------------------------------------


def stored_size(image_size: int, crop: str) -> int:
    """The side images are kept at: ``image_size``, or 9/8 of it for random crops of that size."""
    return round(image_size * 9 / 8) if crop == "random" else image_size


def size_and_channels(dataset: str, image_size: int | None,
                      channels: int | None) -> tuple[int, int]:
    """``(image_size, channels)`` with each None replaced by the dataset's own (FILE_IMAGE_SIZE
    for files that come in any size); the values given must have passed :func:`check_options`."""
    native_size, native_channels = _NATIVE[dataset]
    return (image_size if image_size is not None else native_size or FILE_IMAGE_SIZE,
            channels if channels is not None else native_channels)


def default_data_dir(dataset: str) -> Path | None:
    """Where ``dataset`` is looked for (and downloaded to) when no data_dir is given; None for
    the folder datasets, which have no default."""
    _check_dataset(dataset)
    if dataset == "fashion-mnist":
        return Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
    if dataset in FOLDER_DATASETS:
        return None
    return Path(os.environ.get("DDPM_DATA") or Path.home() / ".cache" / "ddpm" / "data") / dataset


def default_cache_dir() -> Path:
    """``$DDPM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpm``, else ``~/.cache/ddpm``: decoded image
    folders here, reference features (metrics.py) too."""
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm"


def _data_root(dataset: str, data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    default = default_data_dir(dataset)
    if default is None:
        raise ValueError(
            f"dataset {dataset} reads the images in a folder you name: pass --data-dir (data_dir) "
            f"with the folder that holds them"
        )
    return default


# --- validation -----------------------------------------------------------------------------------


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def check_options(dataset: str, split: str, image_size: int | None, channels: int | None,
                  crop: str) -> None:
    """Raise ValueError naming the bad option, its value and what would work."""
    _check_dataset(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test" and dataset in FOLDER_DATASETS:
        raise ValueError(
            f"{dataset} has no test split: a folder of images is one set; use split train (or "
            f"all, the same images), and keep held-out images in a folder of their own"
        )
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"image_size must be an integer of at least 8 pixels, got {image_size!r}")
    if channels is not None and channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def resolve(config: DataConfig) -> DataConfig:
    """``config`` validated, with data_dir, image_size, channels and hflip filled in, so that a
    saved run config says exactly what was read."""
    check_options(config.dataset, config.split, config.image_size, config.channels, config.crop)
    if not config.max_memory_gb > 0:
        raise ValueError(f"max_memory_gb must be positive, got {config.max_memory_gb!r}")
    if not (isinstance(config.workers, int) and config.workers >= 0):
        raise ValueError(f"workers must be 0 (decode in this process) or more, got {config.workers!r}")
    image_size, channels = size_and_channels(config.dataset, config.image_size, config.channels)
    return dataclasses.replace(
        config,
        data_dir=str(_data_root(config.dataset, config.data_dir)),
        image_size=image_size,
        channels=channels,
        hflip=config.hflip if config.hflip is not None else config.dataset not in _NO_FLIPS,
    )
