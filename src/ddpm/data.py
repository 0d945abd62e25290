"""Datasets as uint8 images ``[N, C, S, S]`` with int64 labels, shuffled batches, and the
[0, 1] <-> [-1, 1] conversions.

Each dataset is read from the files its publisher (or torchvision's downloader) lays out:

* ``mnist``, ``fashion-mnist``: LeCun's IDX files, gzipped or not: Debian's package
  ``dataset-fashion-mnist`` installs them in /usr/share/datasets/fashion-mnist, torchvision
  downloads them to ``<root>/MNIST/raw`` (``FashionMNIST/raw``).
* ``cifar10``, ``cifar100``: the pickled python batches (``cifar-10-batches-py``, ``cifar-100-python``).
* ``flowers102``: ``flowers-102/jpg/image_00001.jpg ...``, ``imagelabels.mat``, ``setid.mat``.
* ``tinyimagenet``: ``tiny-imagenet-200/`` with ``wnids.txt``, ``train/<wnid>/images``, ``val/``.
* ``flowers-folder`` (Kaggle's "Flowers Recognition": one folder per class) and ``folder``: image
  files found recursively; class labels from the first-level subfolder names.

Image files are decoded once, resized to the stored size and cached as one ``.npz`` under the cache
folder; a split too large for ``max_memory_gb`` is instead decoded batch by batch in DataLoader
workers (:class:`StreamingImages`). :class:`BatchStream` draws the same batches from either.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pickle
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:  # only for annotations: config.py may import this module, never the reverse
    from .config import DataConfig

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
_CACHE_FORMAT = 1  # bump when the decoded pixels for the same options would change

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


# --- options: defaults, validation, locations -----------------------------------------------------


def dataset_info(dataset: str) -> tuple[int | None, int]:
    """``(native image size, native channels)``; the size is None where files come in any size."""
    _check_dataset(dataset)
    return _NATIVE[dataset]


def stored_size(image_size: int, crop: str) -> int:
    """The side images are kept at: ``image_size``, or 9/8 of it for random crops of that size."""
    return round(image_size * 9 / 8) if crop == "random" else image_size


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


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _check_options(dataset: str, split: str, image_size: int | None, channels: int | None,
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


def resolve(config: DataConfig) -> DataConfig:
    """``config`` validated, with data_dir, image_size, channels and hflip filled in, so that a
    saved run config says exactly what was read."""
    _check_options(config.dataset, config.split, config.image_size, config.channels, config.crop)
    if not config.max_memory_gb > 0:
        raise ValueError(f"max_memory_gb must be positive, got {config.max_memory_gb!r}")
    if not (isinstance(config.workers, int) and config.workers >= 0):
        raise ValueError(f"workers must be 0 (decode in this process) or more, got {config.workers!r}")
    native_size, native_channels = _NATIVE[config.dataset]
    return dataclasses.replace(
        config,
        data_dir=str(_data_root(config.dataset, config.data_dir)),
        image_size=config.image_size if config.image_size is not None else native_size or FILE_IMAGE_SIZE,
        channels=config.channels if config.channels is not None else native_channels,
        hflip=config.hflip if config.hflip is not None else config.dataset not in _NO_FLIPS,
    )


# --- the two kinds of source ----------------------------------------------------------------------


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
        return tuple(self.images.shape[1:])

    def read(self, indices: torch.Tensor | list[int]) -> torch.Tensor:
        """The images at ``indices``, uint8 ``[B, C, S, S]``."""
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


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

    def read(self, indices: torch.Tensor | list[int]) -> torch.Tensor:
        """The images at ``indices``, decoded here, uint8 ``[B, C, S, S]``; errors raise."""
        out = []
        for i in torch.as_tensor(indices, dtype=torch.long).tolist():
            _, image, error = self[i]
            if error:
                raise ValueError(f"cannot decode image {self.paths[i]} ({error}); delete or replace it")
            out.append(image)
        return torch.stack(out) if out else torch.empty((0, *self.image_shape), dtype=torch.uint8)


# --- loading --------------------------------------------------------------------------------------


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
    _check_options(dataset, split, image_size, channels, crop)
    root = _data_root(dataset, data_dir)
    native_size, native_channels = _NATIVE[dataset]
    size = stored_size(image_size or native_size or FILE_IMAGE_SIZE, crop)
    channels = channels or native_channels
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
    options = dict(image_size=c.image_size, channels=c.channels, crop=c.crop, download=c.download,
                   folder_labels=c.folder_labels, cache_dir=c.cache_dir, strict=c.strict,
                   progress=progress, workers=c.workers)
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


def _with_download(reader: Callable, dataset: str, root: Path, split: str, download: bool):
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


# --- arrays: IDX and CIFAR ------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIXES = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}
# Where torchvision's FashionMNIST / MNIST classes keep the files they download under ``root``.
_TORCHVISION_FOLDER = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


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


def _read_mnist(dataset: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    images, labels = [], []
    for prefix in _IDX_PREFIXES[split]:
        stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        paths = [_find_idx(root, dataset, s) for s in stems]
        for stem, path in zip(stems, paths):
            if path is None:
                raise DatasetNotFoundError(_missing_message(dataset, root, stem))
        images.append(read_idx(paths[0]))
        labels.append(read_idx(paths[1]))
        if images[-1].ndim != 3 or labels[-1].shape != (images[-1].shape[0],):
            raise ValueError(f"{paths[0]} and {paths[1]} do not match: images "
                             f"{images[-1].shape}, labels {labels[-1].shape}")
    classes = MNIST_CLASSES if dataset == "mnist" else FASHION_MNIST_CLASSES
    return (torch.from_numpy(np.concatenate(images)).unsqueeze(1),  # [N, H, W] -> [N, 1, H, W]
            torch.from_numpy(np.concatenate(labels).astype(np.int64)), classes)


_CIFAR = {  # folder, train files, test files, meta file, class-name key, label key
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                ("test_batch",), "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names", "fine_labels"),
}


@functools.lru_cache(maxsize=1)
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array needs, under their numpy 1 and numpy 2 names."""
    import codecs

    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric
    allowed = {}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    allowed[("numpy", "ndarray")] = np.ndarray
    # Python 3 writes bytes at protocol 2 as _codecs.encode(text, "latin1"): a pure conversion.
    allowed[("_codecs", "encode")] = codecs.encode
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays, lists and strings, and nothing else: a pickle can name
    any function to call, so every global outside numpy's array rebuilders is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the CIFAR batches were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"{self.path} asks to load {module}.{name}; a CIFAR batch holds only numpy arrays "
                f"and lists, so it was refused unread (a pickle can run code). Replace the file "
                f"with the original from its publisher"
            )
        return allowed[(module, name)]


def _unpickle(path: Path) -> dict[str, object]:
    """A CIFAR batch as a dict with str keys (Python 2 wrote them as bytes)."""
    with open(path, "rb") as f:
        d = _ArrayUnpickler(f, path).load()
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a {type(d).__name__}, not the dict of a CIFAR batch")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _entry(d: dict, key: str, path: Path):
    if key not in d:
        raise ValueError(f"{path} has no {key!r} entry (it has {sorted(d)}); is it a CIFAR python batch?")
    return d[key]


def _read_cifar(dataset: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    folder, train, test, meta, names_key, labels_key = _CIFAR[dataset]
    base = root / folder if (root / folder).is_dir() else root
    files = {"train": train, "test": test, "all": train + test}[split]
    for name in (*files, meta):
        if not (base / name).is_file():
            raise DatasetNotFoundError(
                f"{dataset} not found: no {folder}/{name} in {root}. To get it, pass --download "
                f"(needs internet) to fetch it into --data-dir with torchvision, or unpack "
                f"{_SOURCE[dataset]} there"
            )
    images, labels = [], []
    for name in files:
        batch = _unpickle(base / name)
        data = np.asarray(_entry(batch, "data", base / name))
        batch_labels = np.asarray(_entry(batch, labels_key, base / name), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or \
                batch_labels.shape != (data.shape[0],):
            raise ValueError(f"{base / name}: expected uint8 data [N, 3072] and N labels, got data "
                             f"{data.dtype} {data.shape} and labels {batch_labels.shape}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
        labels.append(batch_labels)
    names = _entry(_unpickle(base / meta), names_key, base / meta)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    labels = np.concatenate(labels)
    if labels.size and not 0 <= labels.min() <= labels.max() < len(classes):
        raise ValueError(f"{dataset} labels run {labels.min()}..{labels.max()} but {base / meta} "
                         f"names {len(classes)} classes")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(labels), classes


_ARRAY_READERS = {"mnist": _read_mnist, "fashion-mnist": _read_mnist,
                  "cifar10": _read_cifar, "cifar100": _read_cifar}


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


# --- image files: indexes, decoding, the cache ----------------------------------------------------


@dataclass(frozen=True)
class _FileIndex:
    """The image files of one split with their labels, and the metadata files they came from."""

    root: Path  # absolute; cache keys name files relative to it
    paths: list[Path]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]
    meta: tuple[Path, ...] = ()  # label files: a change to one changes the cache key too
    dataset: str = ""
    split: str = ""
    labelled: bool = True


def _is_image(name: str) -> bool:
    # Hidden files are skipped: macOS's "._x.jpg" resource forks are not images.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively (following links), sorted; hidden ones skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if _is_image(f)]
    return sorted(found)


def _index_files(dataset: str, root: Path, split: str, *, download: bool,
                 folder_labels: bool) -> _FileIndex:
    root = root.expanduser().resolve()
    if dataset in FOLDER_DATASETS:
        return _index_folder(dataset, root, labelled=folder_labels or dataset == "flowers-folder",
                             download=download)
    reader = {"flowers102": _index_flowers102, "tinyimagenet": _index_tinyimagenet}[dataset]
    return _with_download(reader, dataset, root, split, download)


def _index_folder(dataset: str, root: Path, *, labelled: bool, download: bool) -> _FileIndex:
    if not root.is_dir():
        how = (f"; {dataset} cannot be downloaded (--download): it is images you provide"
               if download else "")
        raise DatasetNotFoundError(f"{dataset}: no folder {root}; check the path given as "
                                   f"--data-dir{how}")
    files = _list_images(root)
    if not files:
        raise ValueError(f"{root} holds no images: looked recursively for files ending in "
                         f"{', '.join(IMAGE_SUFFIXES)} (any case)")
    if not labelled:
        return _FileIndex(root, files, np.zeros(len(files), np.int64), (), dataset=dataset,
                          split="train", labelled=False)
    loose = [f for f in files if f.parent == root]
    if loose:
        raise ValueError(
            f"{loose[0]} lies directly in {root}, but class labels come from first-level "
            f"subfolders (<root>/<class>/...): move it into its class folder"
            + ("" if dataset == "flowers-folder" else ", or turn folder labels off")
        )
    # Classes sorted by name, as torchvision's ImageFolder numbers them; folders without images
    # are not classes.
    first = [f.relative_to(root).parts[0] for f in files]
    classes = tuple(sorted(set(first)))
    lookup = {c: i for i, c in enumerate(classes)}
    return _FileIndex(root, files, np.array([lookup[c] for c in first], np.int64), classes,
                      dataset=dataset, split="train", labelled=True)


def _loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading Flowers-102's .mat label files needs scipy: "
                          "pip install 'ddpm[flowers]'") from None
    return loadmat


def _index_flowers102(dataset: str, root: Path, split: str) -> _FileIndex:
    base = root / "flowers-102" if (root / "flowers-102").is_dir() else root
    labels_mat, setid_mat, jpg = base / "imagelabels.mat", base / "setid.mat", base / "jpg"
    for need in (labels_mat, setid_mat, jpg):
        if not need.exists():
            raise DatasetNotFoundError(
                f"flowers102 not found: no {need}. To get it, pass --download (needs internet) "
                f"to fetch it into --data-dir with torchvision, or put there {_LAYOUT['flowers102']}"
            )
    loadmat = _loadmat()
    all_labels = np.asarray(loadmat(labels_mat)["labels"], np.int64).ravel() - 1  # 1-based
    sets = loadmat(setid_mat)
    ids = {"train": lambda: np.concatenate([sets["trnid"].ravel(), sets["valid"].ravel()]),
           "test": lambda: sets["tstid"].ravel(),
           "all": lambda: np.arange(1, len(all_labels) + 1)}[split]()
    ids = np.sort(np.asarray(ids, np.int64))  # 1-based image numbers
    if ids.size and (ids.min() < 1 or ids.max() > len(all_labels)):
        raise ValueError(f"{setid_mat} names images up to {ids.max()} but {labels_mat} labels "
                         f"{len(all_labels)}")
    paths = [jpg / f"image_{i:05d}.jpg" for i in ids]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise DatasetNotFoundError(f"flowers102 is incomplete: {len(absent)} of its {len(paths)} "
                                   f"{split} images are missing, e.g. {absent[0]}; download it again")
    from torchvision.datasets import Flowers102

    classes = tuple(getattr(Flowers102, "classes", None) or (str(i + 1) for i in range(102)))
    return _FileIndex(root, paths, all_labels[ids - 1], classes, meta=(labels_mat, setid_mat),
                      dataset=dataset, split=split)


def _index_tinyimagenet(dataset: str, root: Path, split: str) -> _FileIndex:
    base = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    wnids_file, words_file = base / "wnids.txt", base / "words.txt"
    annotations = base / "val" / "val_annotations.txt"
    needed = [wnids_file] + ([base / "train"] if split != "test" else []) + \
             ([annotations] if split != "train" else [])
    for need in needed:
        if not need.exists():
            raise DatasetNotFoundError(
                f"tinyimagenet not found: no {need}. To get it, pass --download (needs internet) "
                f"to fetch it into --data-dir, or put there {_LAYOUT['tinyimagenet']}"
            )
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    lookup = {w: i for i, w in enumerate(wnids)}
    words = {}
    if words_file.is_file():  # "n01443537<TAB>goldfish, Carassius auratus", for every ImageNet synset
        for line in words_file.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    paths, labels = [], []
    if split in ("train", "all"):
        for i, wnid in enumerate(wnids):
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise DatasetNotFoundError(f"tinyimagenet is incomplete: no {folder} for class "
                                           f"{wnid} of {wnids_file}; download it again")
            files = sorted(folder / f for f in os.listdir(folder) if _is_image(f))
            paths += files
            labels += [i] * len(files)
    if split in ("test", "all"):  # the labelled validation images: the test split of papers
        rows = []
        for n, line in enumerate(annotations.read_text().splitlines(), 1):
            fields = line.split("\t")  # file, wnid, x0, y0, x1, y1
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in lookup:
                raise ValueError(f"{annotations} line {n}: expected '<file>\\t<wnid>\\t...' with a "
                                 f"wnid listed in {wnids_file}, got {line[:80]!r}")
            rows.append((fields[0], lookup[fields[1]]))
        for name, label in sorted(rows):
            paths.append(base / "val" / "images" / name)
            labels.append(label)
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise DatasetNotFoundError(f"tinyimagenet is incomplete: {absent[0]} (listed in "
                                       f"{annotations}) is missing; download it again")
    meta = tuple(p for p in (wnids_file, words_file, annotations) if p.is_file())
    return _FileIndex(root, paths, np.array(labels, np.int64),
                      tuple(words.get(w, w) for w in wnids), meta=meta, dataset=dataset, split=split)


# What a broken file raises inside PIL's decoders (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error)


def decode_image(path: str | os.PathLike, size: int, channels: int, crop: str) -> torch.Tensor:
    """One image file -> uint8 ``[channels, size, size]`` (see ``_fit`` for ``crop``)."""
    from PIL import Image

    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as im:
        # JPEG: decode at 1/2..1/8 scale where that still leaves both sides >= size; far faster
        # for photos many times the stored size, and the antialiased resize follows anyway.
        im.draft(mode, (size, size))
        if im.mode == "P":
            im = im.convert("RGBA")  # palette transparency, then dropped below like any alpha
        pixels = np.array(im.convert(mode))  # [H, W] or [H, W, 3]
    image = torch.from_numpy(pixels).reshape(*pixels.shape[:2], channels).permute(2, 0, 1)
    return _fit(image.contiguous(), size, crop)


def _cache_key(index: _FileIndex, size: int, channels: int, crop: str) -> str:
    """A digest of everything the decoded pixels depend on: options, files, their sizes and times."""
    digest = hashlib.sha256(
        f"{_CACHE_FORMAT}|{index.dataset}|{index.split}|{index.root}|{size}|{channels}|{crop}|"
        f"{index.labelled}\n".encode()
    )
    stats = []
    for path in (*index.paths, *index.meta):
        st = path.stat()
        stats.append((path.relative_to(index.root).as_posix(), st.st_size, st.st_mtime_ns))
    for rel, nbytes, mtime in sorted(stats):
        digest.update(f"{rel}|{nbytes}|{mtime}\n".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            cached = {k: z[k] for k in ("images", "labels", "classes", "skipped")}
    except Exception:  # missing or unreadable: decoded again, never trusted
        return None
    ok = cached["images"].dtype == np.uint8 and cached["images"].ndim == 4 and \
        cached["labels"].shape == (cached["images"].shape[0],)
    return cached if ok else None


def _write_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write atomically: a temporary file renamed over ``path``, so a reader never sees half."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache slows the next load, nothing more
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache decoded images in {path} ({exc}); the next load decodes "
                      f"them again", stacklevel=3)


def _report_skipped(skipped: list[str], strict: bool) -> None:
    """Warn about files that could not be decoded, or (strict) raise naming the first."""
    if not skipped:
        return
    if strict:
        raise ValueError(f"cannot decode image {skipped[0]}; delete or replace it (or without "
                         f"strict, unreadable files are skipped with a warning)")
    warnings.warn(f"skipped {len(skipped)} image file(s) that PIL cannot decode, e.g. "
                  f"{', '.join(skipped[:3])}", stacklevel=3)


def _decode_files(index: _FileIndex, *, size: int, channels: int, crop: str,
                  cache_dir: str | os.PathLike | None, strict: bool, progress: bool,
                  workers: int) -> ImageData:
    """Every file of ``index`` decoded into memory, or read from the cache of an earlier decode."""
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "datasets" / \
        f"{index.dataset}-{_cache_key(index, size, channels, crop)}.npz"
    cached = _read_cache(cache)
    if cached is None:
        images, keep, skipped = _decode_all(index, size, channels, crop, strict, progress, workers)
        labels = index.labels[keep]
        cached = dict(images=images.numpy(), labels=labels, classes=np.array(index.classes, str),
                      skipped=np.array(skipped, str))
        _write_cache(cache, **cached)
        hit = False
    else:
        hit = True
    skipped = cached["skipped"].tolist()
    _report_skipped(skipped, strict)
    if len(cached["images"]) == 0:
        raise ValueError(f"none of the {len(skipped)} image files of {index.dataset} in "
                         f"{index.root} could be decoded, e.g. {skipped[0]}")
    return ImageData(torch.from_numpy(cached["images"]), torch.from_numpy(cached["labels"]),
                     index.dataset, tuple(cached["classes"].tolist()), cached=hit)


def _decode_all(index: _FileIndex, size: int, channels: int, crop: str, strict: bool,
                progress: bool, workers: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode in ``workers`` DataLoader processes (0: here): ``(images [M, C, S, S] of the files
    that decoded, a mask [N] of which did, the paths of those that did not)``."""
    from tqdm.auto import tqdm

    files = StreamingImages(index.paths, torch.from_numpy(index.labels), name=index.dataset,
                            classes=index.classes, size=size, channels=channels, crop=crop)
    images = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    ok = np.ones(len(files), bool)
    skipped = []
    loader = torch.utils.data.DataLoader(files, batch_size=64, num_workers=workers)
    with tqdm(total=len(files), disable=not progress, unit="img",
              desc=f"decoding {index.dataset}") as bar:
        for positions, batch, errors in loader:
            images[positions] = batch
            for i, error in zip(positions.tolist(), errors):
                if error:
                    if strict:
                        raise ValueError(f"cannot decode image {index.paths[i]} ({error}); delete "
                                         f"or replace it (or without strict, it is skipped)")
                    ok[i] = False
                    skipped.append(str(index.paths[i]))
            bar.update(len(positions))
    return (images if ok.all() else images[torch.from_numpy(ok)]), ok, skipped


def _drop_unreadable(index: _FileIndex, *, strict: bool, progress: bool) -> _FileIndex:
    """``index`` without the files PIL cannot even identify (a cheap header read each), so that
    streaming sees the same images as a load into memory; errors later in decoding are handled
    per batch."""
    from PIL import Image
    from tqdm.auto import tqdm

    keep, skipped = [], []
    for path in tqdm(index.paths, disable=not progress, unit="img", desc="checking files"):
        try:
            with Image.open(path):
                keep.append(True)
        except _DECODE_ERRORS:
            keep.append(False)
            skipped.append(str(path))
    _report_skipped(skipped, strict)
    if not any(keep):
        raise ValueError(f"none of the {len(keep)} image files in {index.root} could be read, "
                         f"e.g. {skipped[0]}")
    return dataclasses.replace(index, paths=[p for p, k in zip(index.paths, keep) if k],
                               labels=index.labels[np.array(keep)])


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


# --- batches --------------------------------------------------------------------------------------


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``size`` x ``size`` window of each image at offsets drawn from ``generator``:
    ``[B, C, H, W]`` -> ``[B, C, size, size]``, all at once by two gathers."""
    b, c, h, w = images.shape
    dy = torch.randint(0, h - size + 1, (b,), generator=generator)
    dx = torch.randint(0, w - size + 1, (b,), generator=generator)
    rows = dy[:, None] + torch.arange(size)  # [B, size]
    cols = dx[:, None] + torch.arange(size)
    images = images.gather(2, rows[:, None, :, None].expand(b, c, size, w))  # [B, C, size, W]
    return images.gather(3, cols[:, None, None, :].expand(b, c, size, size))  # [B, C, size, size]


class _EpochBatches(torch.utils.data.Sampler):
    """The index lists of the current epoch's remaining batches; BatchStream sets ``perm`` and
    ``start`` before each ``iter(loader)``, so workers persist while epochs change."""

    def __init__(self, batch_size: int):
        self.batch_size, self.perm, self.start = batch_size, torch.empty(0, dtype=torch.long), 0

    def __iter__(self):
        ends = range(self.start + self.batch_size, len(self.perm) + 1, self.batch_size)
        return iter([self.perm[end - self.batch_size : end].tolist() for end in ends])

    def __len__(self) -> int:
        return (len(self.perm) - self.start) // self.batch_size


def _own_process_group(worker_id: int) -> None:
    """A decoding worker leaves the training process's group, so that Ctrl-C at a terminal (or
    a signal to the group) reaches only the training process, which finishes its step with the
    batch the worker is preparing and saves a checkpoint. The worker ends with it (DataLoader
    stops its workers, and they watch their parent)."""
    if hasattr(os, "setpgid"):  # not on Windows, where there are no signals to the group
        os.setpgid(0, 0)


class BatchStream:
    """Endless shuffled batches, resumable from its ``state_dict``.

    Every draw comes from ``generator``, in the same order whether ``source`` is in memory or
    streamed: a permutation at each epoch's start, then per batch the crop offsets (when
    ``crop_size``) and the horizontal flips (when ``hflip``), applied to the whole batch at once.
    A streamed source is decoded by ``workers`` DataLoader processes, a few batches ahead.
    """

    def __init__(self, source: ImageData | StreamingImages, batch_size: int, *, hflip: bool,
                 generator: torch.Generator, crop_size: int | None = None, workers: int = 0):
        if batch_size > len(source):
            raise ValueError(
                f"batch size {batch_size} is larger than the dataset ({len(source)} images)"
            )
        stored = source.image_shape[-1]
        if crop_size is not None and not 0 < crop_size <= stored:
            raise ValueError(f"crop size {crop_size} does not fit the stored {stored}x{stored} "
                             f"images; load them with crop 'random' at that image size")
        self.data = source
        self.batch_size = batch_size
        self.hflip = hflip
        self.crop_size = crop_size
        self.workers = workers
        self.generator = generator
        self.perm = torch.randperm(len(source), generator=generator)
        self.pos = 0
        self.epoch = 0
        self._loader = None  # built on the first streamed batch
        self._batches = None  # the loader's iterator over the current epoch from pos
        self._warned: set[str] = set()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``: x float32 ``[B, C, S, S]`` in [-1, 1], y int64 ``[B]``
        labels (drops an epoch's ragged tail)."""
        if self.pos + self.batch_size > len(self.data):
            self.perm = torch.randperm(len(self.data), generator=self.generator)
            self.pos = 0
            self.epoch += 1
            self._batches = None
        idx = self.perm[self.pos : self.pos + self.batch_size]
        if isinstance(self.data, StreamingImages):
            images, labels = self._fetch(idx)
        else:
            images, labels = self.data.images[idx], self.data.labels[idx]
        self.pos += self.batch_size
        if self.crop_size is not None:
            images = random_crop(images, self.crop_size, self.generator)
        x = to_model_range(images)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=self.generator) < 0.5
            x[flip] = x[flip].flip(-1)
        return x, labels

    def _fetch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded images at ``idx`` from the workers, with undecodable ones replaced."""
        if self._loader is None:
            self._sampler = _EpochBatches(self.batch_size)
            self._loader = torch.utils.data.DataLoader(
                self.data, batch_sampler=self._sampler, num_workers=self.workers,
                persistent_workers=self.workers > 0, worker_init_fn=_own_process_group)
        if self._batches is None:
            self._sampler.perm, self._sampler.start = self.perm, self.pos
            self._batches = iter(self._loader)
        got, images, errors = next(self._batches)
        assert torch.equal(got, idx), "the loader's batches left the stream's order"
        labels = self.data.labels[idx]
        bad = [k for k, error in enumerate(errors) if error]
        if bad:
            paths = [str(self.data.paths[int(idx[k])]) for k in bad]
            if self.data.strict or len(bad) == len(errors):
                raise ValueError(f"cannot decode image {paths[0]} ({errors[bad[0]]}); delete or "
                                 f"replace it")
            new = [p for p in paths if p not in self._warned]
            if new:
                self._warned.update(new)
                warnings.warn(f"could not decode {len(new)} image file(s), e.g. "
                              f"{', '.join(new[:3])}; each is replaced by another image of its "
                              f"batch", stacklevel=2)
            good = next(k for k, error in enumerate(errors) if not error)
            images[bad], labels[bad] = images[good].clone(), labels[good].clone()
        return images, labels

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos, self.epoch = state["perm"].clone(), int(state["pos"]), int(state["epoch"])
        self._batches = None  # the workers restart from the loaded position


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
