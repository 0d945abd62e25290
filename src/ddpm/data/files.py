"""Datasets of image files: the index of a split's files and labels (a folder of class folders,
Flowers-102, Tiny ImageNet), which files count as images, decoding one file to the stored size,
and :func:`load_images`, the reader of ``ddpm eval --images``."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .pixels import _fit
from .registry import IMAGE_SUFFIXES, DatasetNotFoundError, dataset_spec

# --- indexes --------------------------------------------------------------------------------------


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
            + ("" if dataset_spec(dataset).class_folders else ", or turn folder labels off")
        )
    # Classes sorted by name, as torchvision's ImageFolder numbers them; folders without images
    # are not classes.
    first = [f.relative_to(root).parts[0] for f in files]
    classes = tuple(sorted(set(first)))
    lookup = {c: i for i, c in enumerate(classes)}
    return _FileIndex(root, files, np.array([lookup[c] for c in first], np.int64), classes,
                      dataset=dataset, split="train", labelled=True)


def _loadmat() -> Callable[..., dict[str, Any]]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError("reading Flowers-102's .mat label files needs scipy: "
                          "pip install 'ddpm[flowers]'") from None
    return loadmat


def _unpacked(dataset: str, root: Path) -> Path:
    """The subfolder of ``root`` that ``dataset``'s archive unpacks to, when there; else ``root``."""
    subfolder = dataset_spec(dataset).subfolder
    return root / subfolder if subfolder and (root / subfolder).is_dir() else root


def _index_flowers102(dataset: str, root: Path, split: str) -> _FileIndex:
    base = _unpacked(dataset, root)
    labels_mat, setid_mat, jpg = base / "imagelabels.mat", base / "setid.mat", base / "jpg"
    for need in (labels_mat, setid_mat, jpg):
        if not need.exists():
            raise DatasetNotFoundError(
                f"flowers102 not found: no {need}. To get it, pass --download (needs internet) "
                f"to fetch it into --data-dir with torchvision, or put there "
                f"{dataset_spec(dataset).layout}"
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
    base = _unpacked(dataset, root)
    wnids_file, words_file = base / "wnids.txt", base / "words.txt"
    annotations = base / "val" / "val_annotations.txt"
    needed = [wnids_file] + ([base / "train"] if split != "test" else []) + \
             ([annotations] if split != "train" else [])
    for need in needed:
        if not need.exists():
            raise DatasetNotFoundError(
                f"tinyimagenet not found: no {need}. To get it, pass --download (needs internet) "
                f"to fetch it into --data-dir, or put there {dataset_spec(dataset).layout}"
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


#: the indexers of the "files" datasets by the name their records give (``DatasetSpec.reader``);
#: reader "folder" is :func:`_index_folder`, which takes the labelling options
_FILE_INDEXERS = {"flowers102": _index_flowers102, "tinyimagenet": _index_tinyimagenet}


# --- decoding -------------------------------------------------------------------------------------

# What a broken file raises inside PIL's decoders (UnidentifiedImageError is an OSError), and
# what PIL raises for an image whose header declares more than twice Image.MAX_IMAGE_PIXELS
# (179 megapixels): a decompression bomb. PIL's default limit is kept, not made an option: the
# largest photographs of the datasets here are a few megapixels, every image is shrunk to at most
# a few hundred pixels a side, and a limit one can turn off protects no one. (Between 89 and 179
# megapixels PIL only warns, and the warning is shown as one line.)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error,
                  Image.DecompressionBombError)


def decode_image(path: str | os.PathLike, size: int, channels: int, crop: str) -> torch.Tensor:
    """One image file -> uint8 ``[channels, size, size]`` (see ``_fit`` for ``crop``)."""
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


# --- ddpm eval --images ---------------------------------------------------------------------------


def load_images(path: str | os.PathLike, npz_key: str | None = None) -> torch.Tensor:
    """Images from anywhere, as uint8 ``[N, C, H, W]``: a ``.npz`` holding uint8 ``[N, H, W, C]``
    (what ``ddpm sample --out x.npz`` and the ADM evaluation suite write) or ``[N, H, W]``, or a
    folder of image files (all of one size, found as training finds them: recursively, hidden
    files and folders skipped).

    The array of a ``.npz`` is ``npz_key`` when given, else its only array, else ``arr_0``."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        if not zipfile.is_zipfile(path):  # numpy would try it as a pickle, and advise unsafety
            raise ValueError(f"cannot read images from {path}: it is not an .npz file (a zip of "
                             f".npy arrays, as numpy.savez writes); give an .npz or a folder")
        try:
            with np.load(path, allow_pickle=False) as z:
                key = _npz_array_name(z.files, npz_key)
                arr = z[key]
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            reason = ("the array holds Python objects, not pixels" if "pickle" in str(exc)
                      else str(exc))
            raise ValueError(f"cannot read images from {path}: {reason}") from None
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
            raise ValueError(f"{path}: {key} must be uint8 [N, H, W, C] with C = 1 or 3 (or [N, H, W]), "
                             f"got {arr.dtype} {arr.shape}")
        arr = arr[..., None] if arr.ndim == 3 else arr
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
    if not path.is_dir():
        raise ValueError(f"{path} is neither a folder of images nor a .npz file")
    files = _list_images(path)
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                grey = im.mode in ("L", "1", "I", "I;16", "LA")
                arrays.append(np.asarray(im.convert("L" if grey else "RGB")))
        except _DECODE_ERRORS as exc:
            raise ValueError(f"cannot read image {f} ({type(exc).__name__}: {exc}); delete or "
                             f"replace it") from None
        if arrays[-1].shape[:2] != arrays[0].shape[:2]:
            raise ValueError(f"{f} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but {files[0]} is "
                             f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all images must be one size")
    if len({a.ndim for a in arrays}) > 1:  # mixed grey and colour: take all as RGB
        arrays = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in arrays]
    stack = np.stack(arrays)
    stack = stack[..., None] if stack.ndim == 3 else stack
    return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()


def _npz_array_name(names: list[str], npz_key: str | None) -> str:
    """Which array of a ``.npz`` holding ``names`` to read; ValueError (listing them) when the
    choice is not clear."""
    held = ", ".join(names)
    if npz_key is not None:
        if npz_key not in names:
            raise ValueError(f"it has no array {npz_key!r}, only {held or 'none'}")
        return npz_key
    if len(names) == 1:
        return names[0]
    if "arr_0" in names:  # np.savez's name for an array passed without one
        return "arr_0"
    if not names:
        raise ValueError("it holds no arrays")
    raise ValueError(f"it holds several arrays ({held}) and none named 'arr_0'; pick one with "
                     f"--npz-key NAME")
