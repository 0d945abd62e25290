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

The modules, each importing only those above it:

* ``registry``: one :class:`DatasetSpec` per dataset (its facts), the option checks and
  defaults (no torch);
* ``config``: the run config's data section, :class:`DataConfig`, and :func:`resolve_data`;
* ``pixels``: value ranges, fitting to the stored size and channels, random crops and flips;
* ``arrays``: the IDX and CIFAR readers;
* ``files``: image-file indexes, decoding one file, :func:`load_images`;
* ``download``: torchvision's downloaders and the offline message;
* ``sources``: :class:`ImageData` (in memory), :class:`StreamingImages` (decoded on demand) and
  :class:`LatentData` (encoded by an autoencoder);
* ``cache``: decoding image files into memory once, and the cache of the result;
* ``stream``: :class:`BatchStream`;
* ``load``: :func:`load_dataset` and :func:`open_dataset`, which put the others together.
"""

from .arrays import read_idx
from .files import decode_image, load_images
from .load import held_out_images, images_at, load_dataset, open_dataset
from .pixels import random_crop, random_hflip, to_model_range, to_uint8, to_unit_range
from .registry import (
    CROPS,
    DATASET_SPECS,
    DATASETS,
    FASHION_MNIST_CLASSES,
    FILE_DATASETS,
    FILE_IMAGE_SIZE,
    FOLDER_DATASETS,
    IMAGE_SUFFIXES,
    MNIST_CLASSES,
    SPLITS,
    DatasetNotFoundError,
    DatasetSpec,
    check_options,
    dataset_spec,
    default_cache_dir,
    default_data_dir,
    stored_size,
)
from .sources import ImageData, LatentData, StreamingImages
from .stream import BatchStream

__all__ = [
    "CROPS", "DATASET_SPECS", "DATASETS", "FASHION_MNIST_CLASSES", "FILE_DATASETS",
    "FILE_IMAGE_SIZE", "FOLDER_DATASETS", "IMAGE_SUFFIXES", "MNIST_CLASSES", "SPLITS",
    "BatchStream", "DatasetNotFoundError", "DatasetSpec", "ImageData", "LatentData",
    "StreamingImages",
    "check_options", "dataset_spec", "decode_image", "default_cache_dir", "default_data_dir",
    "held_out_images", "images_at",
    "load_dataset", "load_images", "open_dataset", "random_crop", "random_hflip", "read_idx",
    "stored_size", "to_model_range", "to_uint8", "to_unit_range",
]
