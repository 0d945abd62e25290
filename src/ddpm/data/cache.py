"""Image files decoded into memory: once, in DataLoader workers, then kept as one ``.npz`` per
split and options under the cache folder; and, before a split is streamed instead, the cheap
check that leaves out the files PIL cannot read."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .files import _DECODE_ERRORS, _FileIndex
from .registry import default_cache_dir
from .sources import ImageData, StreamingImages

_CACHE_FORMAT = 1  # bump when the decoded pixels for the same options would change


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


def write_arrays(path: Path, what: str, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to the cache file ``path`` atomically: a temporary file renamed over it,
    so a reader never sees half. A cache that cannot be written (``what`` it would have held)
    is a warning: the next load computes them again."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            # (numpy's stub reads **arrays as possibly naming its allow_pickle: bool)
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache slows the next load, nothing more
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache {what} in {path} ({exc}); the next load computes them "
                      f"again", stacklevel=3)


def _report_skipped(skipped: list[str], strict: bool) -> None:
    """Warn about files that could not be decoded, or (strict) raise naming the first."""
    if not skipped:
        return
    if strict:
        raise ValueError(f"cannot decode image {skipped[0]}; delete or replace it (or without "
                         f"strict, unreadable files are skipped with a warning)")
    warnings.warn(f"skipped {len(skipped)} image file(s) that PIL cannot decode (or refuses, over "
                  f"its pixel limit), e.g. "
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
        write_arrays(cache, "decoded images", **cached)
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
            for i, error in zip(positions.tolist(), errors, strict=True):
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
    return dataclasses.replace(index, paths=[p for p, k in zip(index.paths, keep, strict=True) if k],
                               labels=index.labels[np.array(keep)])
