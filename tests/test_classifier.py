"""The packaged classifiers: accuracy on the real test splits, size, training and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpm.classifier import WeightsNotFoundError, accuracy, load_classifier, shipped_weights, train_classifier
from ddpm.data import load_dataset

FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST_TEST = Path(__file__).parent / "data" / "mnist"  # the real t10k files, gzipped


@pytest.mark.parametrize("dataset, folder, target", [
    ("fashion-mnist", FASHION, 0.91),
    ("mnist", MNIST_TEST, 0.985),
])
def test_shipped_classifier_reaches_its_accuracy_and_is_small(dataset, folder, target):
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: install Debian's dataset-fashion-mnist (scripts/setup.sh does)")
    path = shipped_weights(dataset)
    assert path.stat().st_size < 2 * 1024 * 1024
    clf = load_classifier(dataset)
    measured = accuracy(clf.model, load_dataset(dataset, folder, "test"))
    assert measured >= target
    assert measured == pytest.approx(clf.test_accuracy, abs=1e-9)  # the recorded figure is true


def test_train_classifier_writes_loadable_weights(tmp_path, fake_fashion):
    out = tmp_path / "clf.pt"
    acc, seconds = train_classifier("fashion-mnist", fake_fashion, out, epochs=1, batch_size=64,
                                    progress=False)
    clf = load_classifier("fashion-mnist", out)
    assert clf.test_accuracy == acc and 0.0 <= acc <= 1.0 and seconds > 0
    predictions = clf.predict(load_dataset("fashion-mnist", fake_fashion, "test").images)
    assert predictions.shape == (64,) and predictions.dtype == torch.int64


def test_train_classifier_follows_its_seed_and_leaves_the_global_random_state(tmp_path, fake_fashion):
    state = torch.get_rng_state()
    weights = {}
    for name, seed in (("a", 3), ("again", 3), ("other", 4)):
        train_classifier("fashion-mnist", fake_fashion, tmp_path / f"{name}.pt", epochs=1,
                         batch_size=64, seed=seed, progress=False)
        assert torch.equal(torch.get_rng_state(), state), name  # forked, not reseeded
        weights[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)["model"]
    a, again, other = weights["a"], weights["again"], weights["other"]
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not all(torch.equal(a[k], other[k]) for k in a)  # the seed is what decides


def test_bad_classifier_files_are_explained(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="ddpm train-classifier"):
        load_classifier("fashion-mnist", tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a fashion-mnist classifier weights file"):
        load_classifier("fashion-mnist", bad)
    with pytest.raises(ValueError, match="not a mnist classifier"):
        load_classifier("mnist", shipped_weights("fashion-mnist"))
