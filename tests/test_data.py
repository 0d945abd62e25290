"""The data/ package: every dataset reader on tiny files in its real on-disk format (IDX, CIFAR,
Flowers-102, Tiny ImageNet, folders of images); options, cache, batch streams, streaming, and
image files that are corrupt or decompression bombs."""

import dataclasses
import gzip
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from ddpm.cli import build_parser
from ddpm.cli.options import given_settings
from ddpm.config import DataConfig, resolve_data, with_overrides
from ddpm.data import (
    FASHION_MNIST_CLASSES,
    BatchStream,
    DatasetNotFoundError,
    ImageData,
    StreamingImages,
    check_options,
    load_dataset,
    load_images,
    open_dataset,
    random_hflip,
    read_idx,
    registry,
    sources,
    stored_size,
    to_model_range,
    to_uint8,
)
from ddpm.presets import get_preset

from conftest import (
    ddpm_in_process,
    label_colour,
    make_fake_cifar,
    make_fake_fashion,
    make_fake_flowers102,
    make_fake_tinyimagenet,
    make_image_folder,
    write_idx,
)

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


def test_random_hflip_mirrors_the_images_its_draws_pick():
    """One uniform draw per image from the generator, below 1/2: mirrored. The classifiers and
    the batch stream all flip with it, so these draws are what keeps their results reproducible."""
    x = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).reshape(4, 2, 2, 3)  # [B, C, H, W]
    generator = torch.Generator().manual_seed(2)
    flipped = random_hflip(x, generator)
    reference = torch.Generator().manual_seed(2)
    coins = torch.rand(4, generator=reference) < 0.5
    assert coins.tolist() == [False, True, False, True]
    assert all(torch.equal(flipped[i], x[i].flip(-1) if coins[i] else x[i]) for i in range(4))
    # it drew exactly four numbers: the generator goes on where the reference does
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=reference))


def assert_colours_match_labels(images: torch.Tensor, labels: torch.Tensor, tol: float = 4.0):
    """Each flat-coloured image has its label's colour (conftest.label_colour)."""
    mean = images.float().mean((2, 3))  # [N, C]
    expected = torch.tensor([label_colour(int(label)) for label in labels], dtype=torch.float32)
    assert (mean - expected).abs().max() <= tol, (mean, expected)


# --- the readers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("str_keys, protocol", [(False, 2), (True, 5)])
def test_cifar10_python_batches(tmp_path, str_keys, protocol):
    # bytes keys and protocol 2: what the real (Python 2) files hold; str keys and protocol 5:
    # what re-pickling them with numpy 2 writes.
    make_fake_cifar(tmp_path, "cifar10", n_per_batch=6, str_keys=str_keys, protocol=protocol)
    train = load_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.shape == (30,)
    assert train.classes == tuple(f"class{i}" for i in range(10))
    # R plane = 2 * label: every image kept its own label; the ramps pin the row layout
    assert (train.images[:, 0].long() == 2 * train.labels[:, None, None]).all()
    ramp = torch.arange(32, dtype=torch.uint8) * 8
    assert (train.images[:, 1] == ramp).all() and (train.images[:, 2] == ramp[:, None]).all()
    test = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test")  # the folder itself
    every = load_dataset("cifar10", tmp_path, "all")
    assert len(test) == 6 and len(every) == 36
    assert torch.equal(every.labels, torch.cat([train.labels, test.labels]))
    assert every.image_shape == (3, 32, 32)


def test_cifar100_fine_labels_and_names(tmp_path):
    make_fake_cifar(tmp_path, "cifar100", n_per_batch=8, seed=1)
    train = load_dataset("cifar100", tmp_path, "train")
    assert train.images.shape == (8, 3, 32, 32) and len(load_dataset("cifar100", tmp_path, "all")) == 16
    assert train.classes == tuple(f"fine{i}" for i in range(100))
    assert (train.images[:, 0].long() == 2 * train.labels[:, None, None]).all()


class _RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_unpickler_refuses_code_without_running_it(tmp_path):
    make_fake_cifar(tmp_path, "cifar10", n_per_batch=2)
    marker = tmp_path / "ran"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _RunsACommand(f"touch {marker}"), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError) as info:
        load_dataset("cifar10", tmp_path, "train")
    assert str(bad) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_idx_class_names_and_the_all_split(fake_fashion, tmp_path):
    every = load_dataset("fashion-mnist", fake_fashion, "all")
    train, test = (load_dataset("fashion-mnist", fake_fashion, s) for s in ("train", "test"))
    assert every.images.shape == (320, 1, 28, 28)
    assert torch.equal(every.images, torch.cat([train.images, test.images]))
    assert torch.equal(every.labels, torch.cat([train.labels, test.labels]))
    assert every.classes == FASHION_MNIST_CLASSES and every.classes[9] == "Ankle boot"
    make_fake_fashion(tmp_path / "MNIST" / "raw", n_train=8, n_test=8)  # torchvision's layout
    assert load_dataset("mnist", tmp_path, "test").classes == tuple("0123456789")


def test_flowers102_splits_labels_and_names(tmp_path):
    sets = make_fake_flowers102(tmp_path / "data")
    written = [(i * 7) % 102 for i in range(12)]  # 0-based label of image i + 1
    options = dict(cache_dir=tmp_path / "cache")
    train = load_dataset("flowers102", tmp_path / "data", "train", **options)
    test = load_dataset("flowers102", tmp_path / "data", "test", **options)
    every = load_dataset("flowers102", tmp_path / "data", "all", **options)
    assert train.images.shape == (6, 3, 64, 64) and train.images.dtype == torch.uint8
    train_ids = sorted(sets["trnid"] + sets["valid"])
    assert train.labels.tolist() == [written[i - 1] for i in train_ids]
    assert test.labels.tolist() == [written[i - 1] for i in sorted(sets["tstid"])]
    assert every.labels.tolist() == written
    assert_colours_match_labels(every.images, every.labels)
    assert len(train.classes) == 102 and train.classes[0] == "pink primrose"


def test_flowers102_without_scipy_names_the_extra(tmp_path, monkeypatch):
    make_fake_flowers102(tmp_path)
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now fails
    with pytest.raises(ImportError, match=r"pip install 'ddpm\[flowers\]'"):
        load_dataset("flowers102", tmp_path, cache_dir=tmp_path / "cache")


def test_tinyimagenet_train_val_and_words(tmp_path):
    val_labels = make_fake_tinyimagenet(tmp_path)
    options = dict(cache_dir=tmp_path / "cache")
    train = load_dataset("tinyimagenet", tmp_path, "train", **options)
    assert train.images.shape == (9, 3, 64, 64)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert train.classes == ("thing 0, other name", "thing 1, other name", "thing 2, other name")
    grey = train.images[0]  # a greyscale JPEG, read as RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert_colours_match_labels(train.images[1:], train.labels[1:])
    test = load_dataset("tinyimagenet", tmp_path / "tiny-imagenet-200", "test", **options)
    assert test.labels.tolist() == val_labels  # val_annotations.txt, whatever its line order
    assert_colours_match_labels(test.images, test.labels)
    assert len(load_dataset("tinyimagenet", tmp_path, "all", **options)) == 9 + len(val_labels)


def test_image_folder_labels_corrupt_and_other_files(tmp_path):
    good = make_image_folder(tmp_path / "pics")
    options = dict(image_size=16, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"skipped 1 image file.*dogs/x\.png"):
        labelled = load_dataset("folder", tmp_path / "pics", folder_labels=True, **options)
    assert labelled.images.shape == (6, 3, 16, 16) and labelled.classes == ("cats", "dogs")
    assert labelled.labels.tolist() == [good[k] for k in sorted(good, key=lambda k: Path(k).parts)]
    assert_colours_match_labels(labelled.images, labelled.labels)
    with pytest.warns(UserWarning, match="skipped 1"):
        plain = load_dataset("folder", tmp_path / "pics", "all", **options)
        flowers = load_dataset("flowers-folder", tmp_path / "pics", **options)
    assert plain.classes == () and plain.labels.tolist() == [0] * 6
    assert torch.equal(plain.images, labelled.images)
    assert flowers.classes == ("cats", "dogs") and torch.equal(flowers.labels, labelled.labels)
    for cache in ("cache", "fresh"):  # from the cache of the lenient load, and decoding afresh
        with pytest.raises(ValueError, match=r"cannot decode image .*dogs/x\.png"):
            load_dataset("folder", tmp_path / "pics", image_size=16, strict=True,
                         cache_dir=tmp_path / cache)
    (tmp_path / "pics" / "loose.png").write_bytes((tmp_path / "pics" / "cats" / "a.png").read_bytes())
    with pytest.raises(ValueError, match="loose.png lies directly in"):
        load_dataset("flowers-folder", tmp_path / "pics", **options)


def test_array_datasets_take_size_crop_and_channel_options(fake_fashion, tmp_path):
    grey = load_dataset("fashion-mnist", fake_fashion, "test")
    rgb = load_dataset("fashion-mnist", fake_fashion, "test", channels=3)
    assert rgb.images.shape == (64, 3, 28, 28) and (rgb.images == grey.images).all()
    big = load_dataset("fashion-mnist", fake_fashion, "test", image_size=32)
    assert torch.equal(big.images, F.resize(grey.images, [32, 32], antialias=True))
    assert load_dataset("fashion-mnist", fake_fashion, "test", crop="random").image_shape == (1, 32, 32)
    make_fake_cifar(tmp_path, "cifar10", n_per_batch=2)
    colour = load_dataset("cifar10", tmp_path, "test")
    assert torch.equal(load_dataset("cifar10", tmp_path, "test", channels=1).images,
                       F.rgb_to_grayscale(colour.images))
    squashed = load_dataset("cifar10", tmp_path, "test", image_size=16, crop="resize")
    assert squashed.image_shape == (3, 16, 16)


def test_image_files_convert_to_grey(tmp_path):
    make_image_folder(tmp_path / "pics")
    with pytest.warns(UserWarning, match="skipped 1"):
        grey = load_dataset("folder", tmp_path / "pics", image_size=12, channels=1, crop="resize",
                            folder_labels=True, cache_dir=tmp_path / "cache")
    assert grey.images.shape == (6, 1, 12, 12)
    luma = torch.tensor([0.299 * r + 0.587 * g + 0.114 * b
                         for r, g, b in (label_colour(int(label)) for label in grey.labels)])
    assert (grey.images.float().mean((1, 2, 3)) - luma).abs().max() < 4


# --- the cache ------------------------------------------------------------------------------------


def test_decoded_files_are_cached_and_rebuilt_on_any_change(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "pics")
    (tmp_path / "pics" / "dogs" / "x.png").unlink()  # only the good images here
    decoded = []
    real = sources.decode_image  # StreamingImages decodes each file through it
    monkeypatch.setattr(sources, "decode_image", lambda path, *a: decoded.append(path) or real(path, *a))

    def load(**options):
        decoded.clear()
        return load_dataset("folder", tmp_path / "pics", **{"image_size": 16,
                            "cache_dir": tmp_path / "cache", **options})

    first = load()
    assert len(decoded) == 6 and not first.cached
    second = load()
    assert decoded == [] and second.cached and torch.equal(second.images, first.images)
    a = tmp_path / "pics" / "cats" / "a.png"
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new time
    assert not load().cached and len(decoded) == 6
    (tmp_path / "pics" / "cats" / "new.png").write_bytes(a.read_bytes())
    assert len(load()) == 7 and len(decoded) == 7
    for change in (dict(image_size=20), dict(channels=1), dict(crop="resize"), dict(crop="random"),
                   dict(folder_labels=True)):
        assert not load(**change).cached and len(decoded) == 7, change
        assert load(**change).cached, change
    (tmp_path / "pics" / "cats" / "new.png").unlink()
    assert load().cached  # back to files seen before
    files = list((tmp_path / "cache" / "datasets").iterdir())
    assert all(f.suffix == ".npz" and f.name.startswith("folder-") for f in files)  # no temp files


# --- batches: streaming, crops, flips -------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_gives_the_batches_of_memory(tmp_path, workers):
    make_fake_tinyimagenet(tmp_path, per_class=4)
    config = DataConfig(dataset="tinyimagenet", data_dir=str(tmp_path), image_size=16,
                        crop="random", cache_dir=str(tmp_path / "cache"), workers=workers)
    memory = open_dataset(config)
    streamed = open_dataset(dataclasses.replace(config, max_memory_gb=1e-9))
    assert isinstance(memory, ImageData) and isinstance(streamed, StreamingImages)
    assert streamed.image_shape == memory.image_shape == (3, 18, 18)
    assert len(streamed) == len(memory) == 12 and torch.equal(streamed.labels, memory.labels)
    assert streamed.classes == memory.classes and streamed.name == memory.name == "tinyimagenet"
    assert torch.equal(torch.stack([streamed[i][1] for i in (0, 5)]), memory.images[[0, 5]])
    assert [streamed[i][2] for i in (0, 5)] == ["", ""]  # no decoding errors

    def stream(source):
        return BatchStream(source, 5, hflip=True, generator=torch.Generator().manual_seed(3),
                           crop_size=16, workers=workers)

    a, b = stream(memory), stream(streamed)
    for _ in range(5):  # two batches an epoch: crosses epochs twice
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert xa.shape == (5, 3, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    state, gstate = b.state_dict(), b.generator.get_state()  # mid-epoch
    expected = [b.next() for _ in range(3)]
    fresh = BatchStream(streamed, 5, hflip=True, generator=torch.Generator().manual_seed(9),
                        crop_size=16, workers=workers)
    for resumed in (fresh, b):  # a new stream, and one rewound while its workers run ahead
        resumed.load_state_dict(state)
        resumed.generator.set_state(gstate)
        for (xa, ya), (xb, yb) in zip(expected, [resumed.next() for _ in range(3)], strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streaming_skips_unreadable_files(tmp_path):
    make_image_folder(tmp_path / "pics")
    truncated = tmp_path / "pics" / "dogs" / "t.png"  # its header reads; its pixels do not
    truncated.write_bytes((tmp_path / "pics" / "cats" / "a.png").read_bytes()[:60])
    config = DataConfig(dataset="folder", data_dir=str(tmp_path / "pics"), image_size=8,
                        folder_labels=True, max_memory_gb=1e-9, workers=0, hflip=False)
    with pytest.warns(UserWarning, match=r"skipped 1 image file.*x\.png"):
        streamed = open_dataset(config)
    assert len(streamed) == 7  # x.png left out; t.png only fails when decoded
    with pytest.warns(UserWarning, match=r"could not decode 1 image file.*t\.png"):
        x, y = BatchStream(streamed, 7, hflip=False, generator=torch.Generator()).next()
    assert x.shape == (7, 3, 8, 8) and (x > -1).any(1).flatten(1).all(1).all()  # no black stand-in
    streamed.strict = True
    with pytest.raises(ValueError, match=r"cannot decode image .*t\.png"):
        BatchStream(streamed, 7, hflip=False, generator=torch.Generator()).next()


def test_random_crops_are_windows_of_the_stored_images(fake_fashion):
    stored = load_dataset("fashion-mnist", fake_fashion, "test", crop="random")  # 28 -> 32
    stream = BatchStream(stored, 64, hflip=False, generator=torch.Generator().manual_seed(1),
                         crop_size=28)
    idx = stream.perm[:64].clone()
    x, y = stream.next()
    assert x.shape == (64, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(y, stored.labels[idx])
    crops, offsets = to_uint8(x), set()
    for image, crop in zip(stored.images[idx], crops, strict=True):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(image[:, dy : dy + 28, dx : dx + 28], crop)]
        assert found, "a crop that is no window of its image"
        offsets.add(found[0])
    assert len(offsets) > 10  # offsets vary per image
    with pytest.raises(ValueError, match="crop size 40 does not fit"):
        BatchStream(stored, 8, hflip=False, generator=torch.Generator(), crop_size=40)


def test_flips_and_crops_come_from_the_generator_alone(fake_fashion):
    stored = load_dataset("fashion-mnist", fake_fashion, "train", crop="random")

    def batches(seed):
        s = BatchStream(stored, 50, hflip=True, generator=torch.Generator().manual_seed(seed),
                        crop_size=28)
        return [s.next() for _ in range(6)]

    same, other = batches(4), batches(5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(same, batches(4), strict=True))
    assert not torch.equal(same[0][0], other[0][0])
    with pytest.raises(ValueError, match="batch size 999 is larger than the dataset"):
        BatchStream(stored, 999, hflip=True, generator=torch.Generator())


def test_in_memory_draws_are_those_of_before(fake_fashion):
    """A permutation per epoch, then one flip draw per image: the order resumed runs rely on."""
    images = load_dataset("fashion-mnist", fake_fashion, "train").images
    stream = BatchStream(load_dataset("fashion-mnist", fake_fashion, "train"), 100, hflip=True,
                         generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    perm, pos = torch.randperm(256, generator=g), 0
    for _ in range(5):
        if pos + 100 > 256:
            perm, pos = torch.randperm(256, generator=g), 0
        x = to_model_range(images[perm[pos : pos + 100]])
        pos += 100
        flip = torch.rand(100, generator=g) < 0.5
        x[flip] = x[flip].flip(-1)
        assert torch.equal(stream.next()[0], x)


# --- options, locations and the errors that teach -------------------------------------------------


def test_resolve_fills_in_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_DATA", str(tmp_path))
    fashion = resolve_data(DataConfig())
    assert (fashion.data_dir, fashion.image_size, fashion.channels) == \
        ("/usr/share/datasets/fashion-mnist", 28, 1)
    cifar = resolve_data(DataConfig(dataset="cifar10"))
    assert (cifar.data_dir, cifar.image_size, cifar.channels) == (str(tmp_path / "cifar10"), 32, 3)
    assert resolve_data(DataConfig(dataset="tinyimagenet", channels=1)).image_size == 64
    flowers = resolve_data(DataConfig(dataset="flowers102", image_size=128))
    assert (flowers.image_size, flowers.channels) == (128, 3)
    # flips only where the images have no one orientation; an explicit choice always stands
    assert (fashion.hflip, resolve_data(DataConfig(dataset="mnist")).hflip, cifar.hflip, flowers.hflip) \
        == (False, False, True, True)
    assert resolve_data(DataConfig(hflip=True)).hflip is True
    assert resolve_data(DataConfig(dataset="cifar10", hflip=False)).hflip is False
    # a run config saved before these options existed still loads, and means what it meant
    # (flips were on for every dataset then)
    saved = {"dataset": "fashion-mnist", "data_dir": "/usr/share/datasets/fashion-mnist",
             "split": "train", "hflip": True, "download": False}
    assert resolve_data(DataConfig(**saved)) == dataclasses.replace(fashion, hflip=True)


@pytest.mark.parametrize("flags, fashion, cifar", [
    ((), False, True), (("--hflip",), True, True), (("--no-hflip",), False, False)])
def test_flip_flags_reach_the_run_config(flags, fashion, cifar):
    def hflip(*options):
        args = build_parser().parse_args(["train", *options])
        return with_overrides(get_preset("fashion-cpu"), given_settings(args)).data.hflip

    assert hflip(*flags) is fashion
    assert hflip("--dataset", "cifar10", "--data-dir", "/x", *flags) is cifar


def test_flip_flags_exclude_each_other():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--hflip", "--no-hflip"])


@pytest.mark.parametrize("change, message", [
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'; choose one of mnist, fashion-mnist, cifar10"),
    (dict(split="val"), "unknown split 'val'; choose one of train, test, all"),
    (dict(crop="zoom"), "unknown crop 'zoom'"),
    (dict(image_size=4), "at least 8 pixels, got 4"),
    (dict(channels=4), "channels must be 1 .* or 3 .*, got 4"),
    (dict(dataset="folder"), "pass --data-dir"),
    (dict(dataset="folder", data_dir="x", split="test"), "folder has no test split"),
    (dict(max_memory_gb=0), "max_memory_gb must be positive"),
])
def test_bad_options_say_what_would_work(change, message):
    with pytest.raises(ValueError, match=message):
        resolve_data(DataConfig(**change))


def test_check_options_is_the_check_of_resolve_and_load_dataset():
    check_options("cifar10", "all", 16, 1, "random")  # all good: no error
    check_options("folder", "train", None, None, "resize")  # None: the dataset's own
    with pytest.raises(ValueError, match="unknown split 'val'; choose one of train, test, all"):
        check_options("mnist", "val", None, None, "center")
    with pytest.raises(ValueError, match="folder has no test split"):
        check_options("folder", "test", None, None, "center")
    with pytest.raises(ValueError, match="at least 8 pixels, got 4"):
        load_dataset("fashion-mnist", "/nowhere", image_size=4)


def test_load_dataset_fills_in_the_defaults_resolve_does(fake_fashion, tmp_path):
    make_fake_cifar(tmp_path / "cifar", "cifar10", n_per_batch=2)
    make_fake_tinyimagenet(tmp_path / "tiny", per_class=1, n_val=1)
    make_image_folder(tmp_path / "pics")
    (tmp_path / "pics" / "dogs" / "x.png").unlink()  # only the good images here
    for dataset, root, options, shape in (
        ("fashion-mnist", fake_fashion, {}, (1, 28, 28)),
        ("fashion-mnist", fake_fashion, dict(channels=3, crop="random"), (3, 32, 32)),
        ("cifar10", tmp_path / "cifar", {}, (3, 32, 32)),
        ("cifar10", tmp_path / "cifar", dict(channels=1, image_size=16), (1, 16, 16)),
        ("tinyimagenet", tmp_path / "tiny", dict(crop="random"), (3, 72, 72)),
        ("folder", tmp_path / "pics", {}, (3, 64, 64)),  # files of any size: FILE_IMAGE_SIZE
        ("folder", tmp_path / "pics", dict(channels=1, crop="resize"), (1, 64, 64)),
    ):
        c = resolve_data(DataConfig(dataset=dataset, data_dir=str(root), **options))
        loaded = load_dataset(dataset, root, cache_dir=tmp_path / "cache", **options)
        side = stored_size(c.image_size, c.crop)
        assert loaded.image_shape == (c.channels, side, side) == shape, (dataset, options)


def test_the_registry_imports_nothing_heavy():
    """config.py takes the dataset names from the registry: it stays free of torch and numpy."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('registry', {registry.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['registry'] = module  # dataclasses look their module up\n"
        "spec.loader.exec_module(module)\n"
        "heavy = sorted({'torch', 'numpy', 'PIL', 'torchvision'} & set(sys.modules))\n"
        "assert not heavy and module.SPLITS == ('train', 'test', 'all'), heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_dataset_is_one_record_that_its_readers_know():
    from ddpm.data import DATASET_SPECS, DATASETS, FILE_DATASETS, FOLDER_DATASETS, dataset_spec
    from ddpm.data.arrays import _ARRAY_READERS
    from ddpm.data.files import _FILE_INDEXERS

    readers = {"arrays": set(_ARRAY_READERS), "files": {*_FILE_INDEXERS, "folder"}}
    for name, spec in DATASET_SPECS.items():
        assert spec.name == name and dataset_spec(name) is spec
        assert spec.reader in readers[spec.kind], name
        assert spec.channels in (1, 3) and spec.native_size in (None, 28, 32, 64), name
        # a folder you name cannot be fetched; every other dataset says where from and how
        assert (spec.source is None) == (spec.layout is None) == spec.folder, name
        assert spec.folder or spec.torchvision is not None or spec.md5 is not None, name
    assert DATASETS == tuple(DATASET_SPECS)
    assert FILE_DATASETS == ("flowers102", "flowers-folder", "tinyimagenet", "folder")
    assert FOLDER_DATASETS == ("flowers-folder", "folder")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; choose one of mnist, "):
        dataset_spec("imagenet")
    with pytest.raises(ValueError, match=r"unknown dataset \['mnist'\]"):
        dataset_spec(["mnist"])  # a value read from a file can be anything


def test_the_public_names_stay_importable():
    import ddpm.data

    names = ("load_dataset open_dataset check_options BatchStream ImageData StreamingImages LatentData "
             "to_model_range to_unit_range to_uint8 DatasetNotFoundError DATASETS SPLITS CROPS "
             "FOLDER_DATASETS FILE_DATASETS IMAGE_SUFFIXES default_cache_dir default_data_dir "
             "load_images decode_image read_idx random_crop stored_size FASHION_MNIST_CLASSES "
             "MNIST_CLASSES FILE_IMAGE_SIZE DATASET_SPECS DatasetSpec dataset_spec random_hflip "
             "held_out_images images_at").split()
    assert [n for n in names if not hasattr(ddpm.data, n)] == []
    assert sorted(ddpm.data.__all__) == sorted(names)


def test_missing_and_empty_data_say_what_to_do(tmp_path):
    for dataset, looked_for in (("cifar10", "cifar-10-batches-py/data_batch_1"),
                                ("cifar100", "cifar-100-python/train"),
                                ("flowers102", "imagelabels.mat"), ("tinyimagenet", "wnids.txt")):
        with pytest.raises(DatasetNotFoundError, match=f"{looked_for}.*--download"):
            load_dataset(dataset, tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="check the path"):
        load_dataset("folder", tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no pictures")
    with pytest.raises(ValueError, match=r"holds no images: .*\.png, \.jpg, \.jpeg, \.webp, \.bmp"):
        load_dataset("folder", tmp_path / "empty")
    with pytest.raises(ValueError, match="folder has no test split"):
        load_dataset("folder", tmp_path / "empty", "test")


@pytest.mark.parametrize("dataset, patch", [
    ("tinyimagenet", "torchvision.datasets.utils.download_and_extract_archive"),
    ("cifar10", "torchvision.datasets.cifar.download_and_extract_archive"),
    ("mnist", "torchvision.datasets.mnist.download_and_extract_archive"),
])
def test_download_offline_says_how_to_get_the_files(tmp_path, monkeypatch, dataset, patch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(patch, offline)
    target = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(dataset, target, download=True)
    message = str(info.value)
    assert f"could not download {dataset} from" in message
    assert "Temporary failure in name resolution" in message
    assert f"into {target} (" in message and f"--data-dir {target}" in message


# --- ddpm eval --images ---------------------------------------------------------------------------


def test_load_images_finds_the_files_training_finds(tmp_path):
    from PIL import Image

    root = tmp_path / "samples"
    for rel, label in (("a.png", 0), ("deep/b.PNG", 1), ("deep/c.bmp", 2)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), label_colour(label)).save(root / rel)
    # What macOS leaves behind: "._x" resource forks (not images), and hidden folders whose
    # pictures (here of another size) are no samples.
    (root / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (root / "deep" / "._b.PNG").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".thumbnails" / "a.png")
    (root / "notes.txt").write_text("not an image")
    images = load_images(root)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert_colours_match_labels(images, torch.tensor([0, 1, 2]), tol=0)
    assert torch.equal(images, load_dataset("folder", root, image_size=8,
                                            cache_dir=tmp_path / "cache").images)


def test_load_images_picks_the_array_of_an_npz(tmp_path):
    samples = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    expected = torch.from_numpy(samples).permute(0, 3, 1, 2)
    np.savez(tmp_path / "one.npz", samples=samples)  # one array, whatever its name
    assert torch.equal(load_images(tmp_path / "one.npz"), expected)
    np.savez(tmp_path / "arr0.npz", samples, labels=np.arange(2))  # arr_0 among others
    assert torch.equal(load_images(tmp_path / "arr0.npz"), expected)
    several = tmp_path / "several.npz"
    np.savez(several, samples=samples, labels=np.arange(2))
    with pytest.raises(ValueError) as info:
        load_images(several)
    message = str(info.value)
    assert str(several) in message and "samples" in message and "labels" in message
    assert "--npz-key NAME" in message
    assert torch.equal(load_images(several, npz_key="samples"), expected)
    with pytest.raises(ValueError, match=r"labels must be uint8 \[N, H, W, C\]"):
        load_images(several, npz_key="labels")
    with pytest.raises(ValueError, match=r"no array 'images', only (samples, labels|labels, samples)"):
        load_images(several, npz_key="images")


# --- a decompression bomb -------------------------------------------------------------------------


def write_bomb(path: Path, side: int = 100_000) -> None:
    """A PNG whose header declares side x side grey pixels (10 gigapixels), and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def bomb_folder(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_bomb(folder / "bomb.png")
    for i in range(2):
        Image.new("RGB", (20, 20), (60 * i, 10, 200)).save(folder / f"ok{i}.png")
    return folder


def test_a_decompression_bomb_is_skipped_and_counted(bomb_folder, tmp_path):
    args = ("train", "--preset", "tiny", "--steps", 1, "--dataset", "folder", "--data-dir",
            bomb_folder, "--image-size", 16, "--batch-size", 1, "--sample-every", 0, "--no-progress")
    r = ddpm_in_process(*args, "--out", tmp_path / "R")
    assert r.returncode == 0, r.stderr
    assert "warning: skipped 1 image file(s)" in r.stderr and "bomb.png" in r.stderr
    r = ddpm_in_process(*args, "--strict", "--cache-dir", tmp_path / "fresh", "--out", tmp_path / "S")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "bomb.png" in lines[0], r.stderr
    assert "DecompressionBombError" in lines[0] and not (tmp_path / "S").exists()
    r = ddpm_in_process("eval", "--images", bomb_folder, "--dataset", "fashion-mnist")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "cannot read image" in lines[0] and "bomb.png" in lines[0] and "Traceback" not in r.stderr


def test_a_streamed_folder_skips_the_bomb_too(bomb_folder, tmp_path):
    r = ddpm_in_process("train", "--preset", "tiny", "--steps", 1, "--dataset", "folder",
                        "--data-dir", bomb_folder, "--image-size", 16, "--batch-size", 1,
                        "--max-memory-gb", 1e-9, "--workers", 0, "--sample-every", 0,
                        "--no-progress", "--out", tmp_path / "R")
    assert r.returncode == 0 and "skipped 1 image file(s)" in r.stderr, r.stderr


# --- corrupt images -------------------------------------------------------------------------------


def test_corrupt_images_are_skipped_with_a_count_and_their_paths(world):
    from ddpm.data import load_dataset

    with pytest.warns(UserWarning, match=r"skipped 1 image file\(s\) .* e\.g\. .*dogs/x\.png"):
        data = load_dataset("folder", world / "pets", image_size=16)
    assert len(data.images) == 6
