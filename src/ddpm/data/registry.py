"""The datasets by name and what is known of each, one :class:`DatasetSpec` per dataset in
:data:`DATASET_SPECS` (native size and channels, flips, class names, where to download them and
how to lay them out by hand, ...); the splits and crops; the option checks and defaults
(:func:`check_options`, :func:`size_and_channels`, :func:`data_root`), all on plain values:
``config.resolve_data`` fills a run's data section from them.

Nothing here reads a file or imports torch: config.py and the CLI use these names freely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test", "all")  # all: every labelled image of the dataset
CROPS = ("center", "resize", "random")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FILE_IMAGE_SIZE = 64  # the default for datasets whose files have no one size

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class CifarBatches:
    """Where a CIFAR python archive keeps its pickled batches and which keys they use."""

    train: tuple[str, ...]  # the batch files of the train split
    test: tuple[str, ...]
    meta: str  # the file with the class names
    names_key: str  # the class names' key in ``meta``
    labels_key: str  # the labels' key in each batch


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Everything known of one dataset, in one record: adding a dataset is adding a record to
    :data:`DATASET_SPECS` (and, for a new file format, its reader to ``arrays._ARRAY_READERS``
    or ``files._FILE_INDEXERS``).

    The facts of the shipped feature classifier (``feature_classifier``, ``flips_keep_labels``)
    live here too: whether a mirrored image keeps its class is a fact of the images, as
    ``flips_by_default`` is, and which datasets have a classifier is asked by name, as the
    other facts are; a table of its own in classifier.py would be the second list of dataset
    names that this record is here to end. The few facts that only one reader asks for (CIFAR's
    batch files and keys) are a small record of their own, :class:`CifarBatches`, so that the
    fields here are the ones every dataset has.
    """

    name: str
    #: "arrays": every image in a few files, read into memory at its native size; "files": image
    #: files, decoded, resized and cached (or streamed from disk when too many)
    kind: str
    #: the reader of its files: "idx", "cifar" (arrays); "flowers102", "tinyimagenet" (files);
    #: "folder": image files found recursively in a folder the user names
    reader: str
    native_size: int | None  # the side of its images; None: the files come in any size
    channels: int  # 1 (grey) or 3 (RGB), as stored
    #: whether random horizontal flips suit it for generation by default (its images have no
    #: one orientation); False for mirrored digits, and for Fashion-MNIST's footwear, whose toes
    #: point left in 92-100% of each class
    flips_by_default: bool = True
    classes: tuple[str, ...] | None = None  # fixed class names; None: read from its files
    #: the folder its archive unpacks to under data_dir (the readers look there and in
    #: data_dir itself); None: the files lie in data_dir
    subfolder: str | None = None
    batches: CifarBatches | None = None  # reader "cifar": its batch files and keys
    #: where --download fetches it from (said in messages; the archive fetched itself when no
    #: torchvision class does it); None: it cannot be downloaded
    source: str | None = None
    torchvision: str | None = None  # the torchvision.datasets class that downloads it
    md5: str | None = None  # without such a class: the checksum of the archive at ``source``
    layout: str | None = None  # the files to put in data_dir by hand when it cannot be downloaded
    debian_package: str | None = None  # the Debian package that installs it, in debian_dir
    debian_dir: str | None = None  # its default data_dir
    feature_classifier: bool = False  # a SmallCNN feature extractor ships for it (weights/)
    #: whether a mirrored image is still of its class (a mirrored shoe is still a shoe; a
    #: mirrored 3 is not a digit): the feature classifier's flip augmentation; None: not said
    flips_keep_labels: bool | None = None
    #: reader "folder": its first-level subfolders are always its classes; else they are only
    #: with folder_labels
    class_folders: bool = False

    @property
    def folder(self) -> bool:
        """A folder of images the user names: no default place, no test split, no download."""
        return self.reader == "folder"


DATASET_SPECS = {spec.name: spec for spec in (
    DatasetSpec(name="mnist", kind="arrays", reader="idx", native_size=28, channels=1,
                flips_by_default=False, classes=MNIST_CLASSES, subfolder="MNIST/raw",
                source="torchvision's MNIST mirrors", torchvision="MNIST",
                layout="the four IDX files train-images-idx3-ubyte.gz ... "
                       "t10k-labels-idx1-ubyte.gz, directly or in MNIST/raw/", feature_classifier=True,
                flips_keep_labels=False),
    DatasetSpec(name="fashion-mnist", kind="arrays", reader="idx", native_size=28, channels=1,
                flips_by_default=False, classes=FASHION_MNIST_CLASSES,
                subfolder="FashionMNIST/raw",
                source="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                torchvision="FashionMNIST",
                layout="the four IDX files train-images-idx3-ubyte.gz ... "
                       "t10k-labels-idx1-ubyte.gz, directly or in FashionMNIST/raw/",
                debian_package="dataset-fashion-mnist",
                debian_dir="/usr/share/datasets/fashion-mnist", feature_classifier=True,
                flips_keep_labels=True),
    DatasetSpec(name="cifar10", kind="arrays", reader="cifar", native_size=32, channels=3,
                subfolder="cifar-10-batches-py",
                batches=CifarBatches(train=tuple(f"data_batch_{i}" for i in range(1, 6)),
                                     test=("test_batch",), meta="batches.meta",
                                     names_key="label_names", labels_key="labels"),
                source="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                torchvision="CIFAR10",
                layout="cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, "
                       "as cifar-10-python.tar.gz unpacks"),
    DatasetSpec(name="cifar100", kind="arrays", reader="cifar", native_size=32, channels=3,
                subfolder="cifar-100-python",
                batches=CifarBatches(train=("train",), test=("test",), meta="meta",
                                     names_key="fine_label_names", labels_key="fine_labels"),
                source="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                torchvision="CIFAR100",
                layout="cifar-100-python/ with train, test and meta, as cifar-100-python.tar.gz "
                       "unpacks"),
    DatasetSpec(name="flowers102", kind="files", reader="flowers102", native_size=None,
                channels=3, subfolder="flowers-102",
                source="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
                torchvision="Flowers102",
                layout="flowers-102/ with jpg/image_00001.jpg ... (102flowers.tgz unpacked), "
                       "imagelabels.mat and setid.mat"),
    # Kaggle's "Flowers Recognition": one folder per class
    DatasetSpec(name="flowers-folder", kind="files", reader="folder", native_size=None,
                channels=3, class_folders=True),
    DatasetSpec(name="tinyimagenet", kind="files", reader="tinyimagenet", native_size=64,
                channels=3, subfolder="tiny-imagenet-200",
                source="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                md5="90528d7ca1a48142e341f4ef8d21d0de",
                layout="tiny-imagenet-200/ with wnids.txt, words.txt, train/ and val/, as "
                       "tiny-imagenet-200.zip unpacks"),
    DatasetSpec(name="folder", kind="files", reader="folder", native_size=None, channels=3),
)}

DATASETS = tuple(DATASET_SPECS)
#: datasets of image files (decoded, resized and cached); the others are arrays in a few files
FILE_DATASETS = tuple(name for name, spec in DATASET_SPECS.items() if spec.kind == "files")
FOLDER_DATASETS = tuple(name for name, spec in DATASET_SPECS.items() if spec.folder)


def dataset_spec(dataset: str) -> DatasetSpec:
    """The record of ``dataset``; ValueError naming the datasets there are when it is unknown."""
    spec = DATASET_SPECS.get(dataset) if isinstance(dataset, str) else None
    if spec is None:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return spec


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
    spec = dataset_spec(dataset)
    return (image_size if image_size is not None else spec.native_size or FILE_IMAGE_SIZE,
            channels if channels is not None else spec.channels)


def default_data_dir(dataset: str) -> Path | None:
    """Where ``dataset`` is looked for (and downloaded to) when no data_dir is given; None for
    the folder datasets, which have no default."""
    spec = dataset_spec(dataset)
    if spec.debian_dir is not None:
        return Path(spec.debian_dir)
    if spec.folder:
        return None
    return Path(os.environ.get("DDPM_DATA") or Path.home() / ".cache" / "ddpm" / "data") / dataset


def default_cache_dir() -> Path:
    """``$DDPM_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddpm``, else ``~/.cache/ddpm``: decoded image
    folders here, reference features (metrics.py) too."""
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm"


def data_root(dataset: str, data_dir: str | os.PathLike | None) -> Path:
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


def check_options(dataset: str, split: str, image_size: int | None, channels: int | None,
                  crop: str) -> None:
    """Raise ValueError naming the bad option, its value and what would work."""
    spec = dataset_spec(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "test" and spec.folder:
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
