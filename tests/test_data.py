import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.data import BatchStream, DatasetNotFoundError, load_dataset, read_idx, to_model_range

from conftest import make_fake_fashion, write_idx

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_idx_round_trip_gz_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", a, gz=True)
    write_idx(tmp_path / "b", a, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "b"), a)


def test_truncated_and_foreign_idx_files_are_rejected(tmp_path):
    a = np.zeros((4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t", a, gz=False)
    data = (tmp_path / "t").read_bytes()
    (tmp_path / "t").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "t")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "png")


def test_load_fake_dataset_shapes_ranges_labels(fake_fashion):
    data = load_dataset("fashion-mnist", fake_fashion, "train")
    assert data.images.shape == (256, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.shape == (256,) and 0 <= data.labels.min() and data.labels.max() <= 9
    raw = np.frombuffer(gzip.open(fake_fashion / "train-images-idx3-ubyte.gz").read()[16:], np.uint8)
    assert np.array_equal(data.images.numpy().ravel(), raw)
    x = to_model_range(data.images)
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
    assert load_dataset("fashion-mnist", fake_fashion, "test").images.shape == (64, 1, 28, 28)


def test_torchvision_download_layout_is_found(tmp_path):
    make_fake_fashion(tmp_path / "FashionMNIST" / "raw", n_train=8, n_test=8)
    assert len(load_dataset("fashion-mnist", tmp_path, "train")) == 8


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", tmp_path / "nowhere", "train")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg


def test_real_fashion_mnist_from_the_debian_package():
    """The README's set-up installs Debian's dataset-fashion-mnist; it must load as shipped."""
    data = load_dataset("fashion-mnist", REAL_FASHION, "test")
    assert data.images.shape == (10_000, 1, 28, 28)
    assert sorted(data.labels.unique().tolist()) == list(range(10))


def test_batch_stream_epochs_flips_and_resume(fake_fashion):
    data = load_dataset("fashion-mnist", fake_fashion, "train")
    a = BatchStream(data, 100, hflip=False, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([a.next()[0], a.next()[0]])
    # two batches of one epoch are distinct images (a permutation, no repeats)
    assert torch.unique(seen.flatten(1), dim=0).shape[0] == 200
    a.next()  # 256 // 100 = 2 batches per epoch; the third starts epoch 1
    assert a.epoch == 1
    state, gstate = a.state_dict(), a.generator.get_state()
    expected = [a.next() for _ in range(3)]  # (x, y) pairs
    b = BatchStream(data, 100, hflip=False, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(state)
    b.generator.set_state(gstate)
    resumed = [b.next() for _ in range(3)]
    assert all(torch.equal(e[0], r[0]) and torch.equal(e[1], r[1])
               for e, r in zip(expected, resumed, strict=True))
    flips = BatchStream(data, 256, hflip=True, generator=torch.Generator().manual_seed(0)).next()[0]
    plain = BatchStream(data, 256, hflip=False, generator=torch.Generator().manual_seed(0)).next()[0]
    same = (flips == plain).flatten(1).all(1)
    mirrored = (flips == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 0.3 < mirrored.float().mean() < 0.7
