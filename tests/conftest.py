"""Shared fixtures: small datasets in the real on-disk format, written by the tests themselves."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """Write ``array`` (uint8) in LeCun's IDX format: magic 0x0000 08 ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fake_fashion(folder: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files (gzipped, as Debian ships them) with random content."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return folder


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory) -> Path:
    return make_fake_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Reference statistics go to a temporary folder, never the user's ~/.cache/ddpm."""
    os.environ["DDPM_CACHE_DIR"] = str(tmp_path_factory.mktemp("ddpm-cache"))
    yield
