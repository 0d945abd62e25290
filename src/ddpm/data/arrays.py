"""The datasets stored as arrays in a few files: LeCun's IDX files (MNIST, Fashion-MNIST) and
CIFAR's pickled python batches (read by a restricted unpickler). Each reader returns the whole
split as ``(images uint8 [N, C, H, W], labels int64 [N], class names)`` at its native size."""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import torch

from .files import _unpacked
from .registry import DatasetNotFoundError, dataset_spec

# --- IDX: MNIST and Fashion-MNIST -----------------------------------------------------------------

_IDX_DTYPES: dict[int, npt.DTypeLike] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
                                         0x0D: ">f4", 0x0E: ">f8"}
_IDX_PREFIXES = {"train": ("train",), "test": ("t10k",), "all": ("train", "t10k")}


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
    """``stem`` (gzipped or not) in ``data_dir`` or where torchvision downloads it there."""
    subfolder = dataset_spec(dataset).subfolder
    for folder in (data_dir, *([data_dir / subfolder] if subfolder else [])):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _missing_message(dataset: str, data_dir: Path, stem: str) -> str:
    spec = dataset_spec(dataset)
    how = (
        f"install Debian's package (apt-get install {spec.debian_package}) and use its folder "
        f"{spec.debian_dir}, or "
        if spec.debian_package
        else ""
    )
    return (
        f"{dataset} not found: no {stem}[.gz] in {data_dir}. To get it, {how}pass --download "
        f"(needs internet) to fetch it into --data-dir with torchvision"
    )


def _read_idx_dataset(dataset: str, root: Path,
                      split: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """An IDX dataset's split; its class names are its record's (IDX files name none)."""
    classes = dataset_spec(dataset).classes
    assert classes is not None, f"the record of {dataset} names no classes"
    images, labels = [], []
    for prefix in _IDX_PREFIXES[split]:
        stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        paths = []
        for stem in stems:
            path = _find_idx(root, dataset, stem)
            if path is None:
                raise DatasetNotFoundError(_missing_message(dataset, root, stem))
            paths.append(path)
        images.append(read_idx(paths[0]))
        labels.append(read_idx(paths[1]))
        if images[-1].ndim != 3 or labels[-1].shape != (images[-1].shape[0],):
            raise ValueError(f"{paths[0]} and {paths[1]} do not match: images "
                             f"{images[-1].shape}, labels {labels[-1].shape}")
    return (torch.from_numpy(np.concatenate(images)).unsqueeze(1),  # [N, H, W] -> [N, 1, H, W]
            torch.from_numpy(np.concatenate(labels).astype(np.int64)), classes)


# --- CIFAR: pickled python batches ----------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array needs, under their numpy 1 and numpy 2 names."""
    import codecs

    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]  # numpy 1's names
    allowed: dict[tuple[str, str], object] = {}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        # protocol 5 (private, so not in numpy's stubs)
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]
    allowed[("numpy", "ndarray")] = np.ndarray
    # Python 3 writes bytes at protocol 2 as _codecs.encode(text, "latin1"): a pure conversion.
    allowed[("_codecs", "encode")] = codecs.encode
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays, lists and strings, and nothing else: a pickle can name
    any function to call, so every global outside numpy's array rebuilders is refused."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the CIFAR batches were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> object:
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


def _entry(d: dict[str, object], key: str, path: Path) -> Any:  # whatever the pickle holds
    if key not in d:
        raise ValueError(f"{path} has no {key!r} entry (it has {sorted(d)}); is it a CIFAR python batch?")
    return d[key]


def _read_cifar(dataset: str, root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    spec = dataset_spec(dataset)
    assert spec.batches is not None and spec.subfolder is not None, f"{dataset} is not a CIFAR"
    batches, meta = spec.batches, spec.batches.meta
    base = _unpacked(dataset, root)
    files = {"train": batches.train, "test": batches.test,
             "all": batches.train + batches.test}[split]
    for name in (*files, meta):
        if not (base / name).is_file():
            raise DatasetNotFoundError(
                f"{dataset} not found: no {spec.subfolder}/{name} in {root}. To get it, pass --download "
                f"(needs internet) to fetch it into --data-dir with torchvision, or unpack "
                f"{spec.source} there"
            )
    images, labels = [], []
    for name in files:
        batch = _unpickle(base / name)
        data = np.asarray(_entry(batch, "data", base / name))
        batch_labels = np.asarray(_entry(batch, batches.labels_key, base / name), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or \
                batch_labels.shape != (data.shape[0],):
            raise ValueError(f"{base / name}: expected uint8 data [N, 3072] and N labels, got data "
                             f"{data.dtype} {data.shape} and labels {batch_labels.shape}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
        labels.append(batch_labels)
    names = _entry(_unpickle(base / meta), batches.names_key, base / meta)
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    label_array = np.concatenate(labels)
    if label_array.size and not 0 <= label_array.min() <= label_array.max() < len(classes):
        raise ValueError(f"{dataset} labels run {label_array.min()}..{label_array.max()} but "
                         f"{base / meta} names {len(classes)} classes")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(label_array), classes


#: the readers of the "arrays" datasets by the name their records give (``DatasetSpec.reader``)
_ARRAY_READERS = {"idx": _read_idx_dataset, "cifar": _read_cifar}
