"""The noise-aware classifier p_phi(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021,
sec. 4): its training, its file and its fit to a run (the guidance itself is
:mod:`ddpm.guidance`).

Guided sampling shifts each reverse step's mean by s * Sigma * grad_x log p_phi(y | x_t, t)
(their Algorithm 1; for DDIM, eps-hat = eps - s sqrt(1 - alpha_bar_t) grad, Algorithm 2). The
classifier must read images noised by the same schedule the diffusion model was trained on, at
the same size, with the same classes. This module holds:

* :func:`train_noisy_classifier`: train a :class:`~ddpm.models.unet.NoisyClassifier` on
  ``q_sample``-noised images of a labelled dataset, measure its accuracy at several noise levels,
  and save it atomically;
* :func:`load_noisy_classifier`: load that file with ``torch.load(weights_only=True)`` (no code
  can run), refusing anything else with a message that says what the file is;
* :func:`check_compatible`: does this classifier fit this run (dataset, classes, schedule,
  image size)?

The file is one dict (``FORMAT``)::

    {"format": 1, "kind": "noisy-classifier", "dataset", "num_classes", "classes",
     "image_size", "channels",
     "schedule": {"name", "num_train_timesteps", "zero_terminal_snr"},
     "model": UNetConfig as a dict, "weights": state_dict,
     "accuracy_by_t": {t: test accuracy at t}, "epochs", "seed"}
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import atomic_save, read_torch_file
from .classifier import fit_classifier
from .config import DataConfig, RunConfig, build_schedule, resolve_data
from .data import (
    DATASETS,
    ImageData,
    dataset_spec,
    load_dataset,
    random_crop,
    random_hflip,
    to_model_range,
)
from .diffusion import q_sample
from .models.unet import NoisyClassifier, UNetConfig
from .presets import DEFAULT_PRESET, get_preset
from .schedules import NoiseSchedule
from .settings import shown

FORMAT = 1
KIND = "noisy-classifier"
#: where accuracy is measured, as fractions of T (t = 0, 100, 250, 500, 750, 999 at T = 1000)
EVAL_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
_MAKE_ONE = "ddpm train-classifier --noisy --like RUN"


# --- the network's shape --------------------------------------------------------------------------


def classifier_config(image_size: int, channels: int, num_classes: int, *,
                      levels: int = 3) -> UNetConfig:
    """The default classifier: 32 channels, widths (1, 2, 2, ...) over ``levels`` levels, one
    residual block per level, no attention but the middle block's (at the smallest feature map,
    where it already sees the whole image), no dropout (so training draws no randomness outside
    its generator), GroupNorm with 8 groups.

    On Fashion-MNIST (28 px: levels of 28, 14 and 7 px) that is 0.42 M parameters. Measured on
    this project's 2-core CPU machine, batches of 128: 6.7 steps/s with both cores (an epoch of
    60k images in ~70 s), ~250 ms a step on one core (~2 min an epoch); with another
    process busy on the machine, torch's two threads slowed to 1.5-3.5 s a step. Attention at
    7 px as well cost 10% more a step; 2x2 patches over levels (1, 2) were 3x faster (accuracy
    not measured)."""
    return UNetConfig(in_channels=channels, image_size=image_size, base_channels=32,
                      channel_mults=(1,) + (2,) * (levels - 1), num_res_blocks=1,
                      attention_resolutions=(), dropout=0.0, norm_groups=8,
                      num_classes=num_classes)


def evaluation_timesteps(num_train_timesteps: int) -> tuple[int, ...]:
    """The steps accuracy is measured at: ``EVAL_FRACTIONS`` of T, in 0..T-1, without repeats."""
    T = num_train_timesteps
    return tuple(sorted({min(round(f * T), T - 1) for f in EVAL_FRACTIONS}))


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisyClassifierResult:
    """What :func:`train_noisy_classifier` measured: test accuracy at each t, and its seconds."""

    path: Path
    accuracy_by_t: dict[int, float]
    seconds: float


def _data_config(dataset: str | None, data_dir: str | os.PathLike | None,
                 like: RunConfig | None) -> DataConfig:
    """The run's data options (or the dataset's defaults), resolved: folder, size, channels."""
    if like is None:
        data = DataConfig(dataset=dataset or "fashion-mnist")
    else:
        if dataset is not None and dataset != like.data.dataset:
            raise ValueError(
                f"the run was trained on {like.data.dataset} but the classifier would be trained "
                f"on {dataset}; guidance needs the run's dataset: leave the dataset out, or give "
                f"{like.data.dataset}"
            )
        data = like.data
    if data_dir is not None:
        data = dataclasses.replace(data, data_dir=str(data_dir))
    return resolve_data(data)


def _load_splits(data: DataConfig, seed: int) -> tuple[ImageData, ImageData]:
    """Train and test split at the run's stored size (uint8 ``[N, C, S, S]``), with labels.

    A folder of images has no test split: a tenth of it (drawn with ``seed``) is held out."""
    options: dict[str, Any] = dict(
        image_size=data.image_size, channels=data.channels, crop=data.crop, folder_labels=True,
        cache_dir=data.cache_dir, strict=data.strict, download=data.download, workers=data.workers)
    train = load_dataset(data.dataset, data.data_dir, "train", **options)
    folder = dataset_spec(data.dataset).folder
    num_classes = len(train.classes)
    if num_classes < 2:
        raise ValueError(
            f"{data.dataset} in {data.data_dir} has "
            + (f"one class ({train.classes[0]!r})" if num_classes else "no class labels")
            + "; a classifier learns labels of at least 2 classes"
            + (": put the images in one first-level subfolder per class" if folder else "")
        )
    if not folder:
        return train, load_dataset(data.dataset, data.data_dir, "test", **options)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held_out, kept = order[: max(1, len(train) // 10)], order[max(1, len(train) // 10):]
    return (ImageData(train.images[kept], train.labels[kept], train.name, train.classes),
            ImageData(train.images[held_out], train.labels[held_out], train.name, train.classes))


def _fit(images: torch.Tensor, size: int, generator: torch.Generator | None,
         hflip: bool) -> torch.Tensor:
    """uint8 ``[B, C, S', S']`` -> float ``[B, C, size, size]`` in [-1, 1]: a random crop and
    random flips with ``generator`` (training), else the centre (testing)."""
    x = to_model_range(images)
    if x.shape[-1] != size:  # stored at 9/8 of the size for random crops
        if generator is not None:
            x = random_crop(x, size, generator)
        else:
            top = (x.shape[-1] - size) // 2
            x = x[..., top:top + size, top:top + size]
    return random_hflip(x, generator) if generator is not None and hflip else x


@torch.inference_mode()
def accuracy_by_noise_level(model: NoisyClassifier, data: ImageData, schedule: NoiseSchedule,
                            timesteps: tuple[int, ...], *, seed: int = 0, batch_size: int = 500,
                            device: str | torch.device = "cpu") -> dict[int, float]:
    """Accuracy of ``model`` on ``data``'s images noised to each of ``timesteps`` by ``q_sample``
    (eq. 4), the noise drawn from a generator seeded with ``seed``: ``{t: accuracy}``."""
    model.eval()
    size = model.config.image_size
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for t in timesteps:
        correct = 0
        for images, labels in zip(data.images.split(batch_size), data.labels.split(batch_size), strict=True):
            x0 = _fit(images, size, None, False)  # [B, C, S, S]
            steps = torch.full((x0.shape[0],), t, dtype=torch.long)  # [B]
            x_t = q_sample(schedule, x0, steps, torch.randn(x0.shape, generator=generator))
            logits = model(x_t.to(device), steps.to(device))  # [B, K]
            correct += int((logits.argmax(1).cpu() == labels).sum())
        result[t] = correct / len(data)
    return result


def train_noisy_classifier(
    dataset: str | None,
    data_dir: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    like: RunConfig | None = None,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-2,
    weight_decay: float = 0.05,
    seed: int = 0,
    model: UNetConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> NoisyClassifierResult:
    """Train a noise-aware classifier p_phi(y | x_t, t) and save it atomically to ``out``.

    The images are those the run ``like`` trains on (its dataset, folder, size, channels, crop
    and flips), noised with its schedule; without ``like``, ``dataset`` (default fashion-mnist)
    at its own size with the default preset's schedule. ``dataset`` None means the run's.
    Each batch: x0 from the train split, t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample (eq. 4),
    cross-entropy of the logits against the labels. AdamW with a one-cycle cosine learning rate
    peaking at ``lr`` (on Fashion-MNIST, one epoch at a peak of 1e-2 reached 73% clean accuracy
    against 68.5% at 2e-3; three epochs at 1e-2, 81%).
    All randomness (order, t, eps, crops, flips, initial weights) follows ``seed``; the global
    torch random state is left as it was. ``model`` overrides :func:`classifier_config` (its
    size, channels and classes are set from the data).

    Returns the test accuracy at :func:`evaluation_timesteps` (which the file records too), the
    path and the seconds taken.
    """
    start = time.perf_counter()
    data = _data_config(dataset, data_dir, like)
    assert data.image_size is not None and data.channels is not None  # resolve_data() filled them
    run = like or get_preset(DEFAULT_PRESET)  # whose schedule noises the images
    if run.diffusion.sde != "vp":
        raise ValueError(f"a noise-aware classifier reads images noised by a VP schedule, and "
                         f"this run uses the {run.diffusion.sde.upper()} process; guide it with "
                         f"--guidance (classifier-free) instead")
    diffusion, schedule = run.diffusion, build_schedule(run)
    train, test = _load_splits(data, seed)
    num_classes = len(train.classes)
    levels = len(like.model.channel_mults) if like is not None else 3
    config = dataclasses.replace(
        model or classifier_config(data.image_size, data.channels, num_classes, levels=levels),
        in_channels=data.channels, image_size=data.image_size, num_classes=num_classes,
        learn_variance=False)
    T = schedule.num_train_timesteps
    size, hflip, device = data.image_size, bool(data.hflip), torch.device(device)

    def batch_loss(net: NoisyClassifier, idx: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
        x0 = _fit(train.images[idx], size, generator, hflip)  # [B, C, S, S]
        t = torch.randint(0, T, (x0.shape[0],), generator=generator)  # [B]
        eps = torch.randn(x0.shape, generator=generator)  # [B, C, S, S]
        x_t = q_sample(schedule, x0, t, eps)  # eq. 4
        logits = net(x_t.to(device), t.to(device))  # [B, K]
        return F.cross_entropy(logits, train.labels[idx].to(device))

    net = fit_classifier(lambda: NoisyClassifier(config), batch_loss, num_examples=len(train),
                         epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         seed=seed, desc=f"noisy classifier ({data.dataset})", progress=progress,
                         device=device)
    accuracy = accuracy_by_noise_level(net, test, schedule, evaluation_timesteps(T), seed=seed,
                                       device=device)
    out = Path(out)
    atomic_save(
        {"format": FORMAT, "kind": KIND, "dataset": data.dataset, "num_classes": num_classes,
         "classes": list(train.classes), "image_size": data.image_size, "channels": data.channels,
         "schedule": {"name": diffusion.schedule, "num_train_timesteps": T,
                      "zero_terminal_snr": diffusion.zero_terminal_snr},
         "model": dataclasses.asdict(config),
         "weights": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
         "accuracy_by_t": accuracy, "epochs": epochs, "seed": seed},
        out,
    )
    return NoisyClassifierResult(out, accuracy, time.perf_counter() - start)


# --- the file -------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoisyClassifierFile:
    """A loaded noise-aware classifier (``model``: eval mode, no gradients for its weights) with
    what it was trained on."""

    model: NoisyClassifier
    path: Path
    dataset: str
    classes: tuple[str, ...]
    image_size: int
    channels: int
    schedule: str
    num_train_timesteps: int
    zero_terminal_snr: bool
    accuracy_by_t: dict[int, float]
    epochs: int
    seed: int

    @property
    def num_classes(self) -> int:
        return self.model.num_classes


def _what_else(blob: Any) -> str | None:
    """What a loaded torch file is when it is not a noisy classifier (None when it is one)."""
    if not isinstance(blob, dict):
        return f"a torch file holding a {type(blob).__name__}, not a noisy classifier"
    if "format_version" in blob and "config" in blob:
        return "a ddpm training checkpoint (a diffusion model), not a noise-aware classifier"
    if blob.get("kind") is None and "test_accuracy" in blob:
        return (f"the {blob.get('dataset', '?')} feature extractor of 'ddpm eval' (plain 'ddpm "
                f"train-classifier', trained on clean images only), not a noise-aware classifier")
    if blob.get("kind") != KIND:
        return "a torch file but not a noisy classifier"
    if blob.get("format") != FORMAT:
        return (f"a noisy classifier of format {blob.get('format')}, but this ddpm reads format "
                f"{FORMAT}; use the ddpm version that wrote it, or make a new one")
    return None


def load_noisy_classifier(path: str | os.PathLike,
                          device: str | torch.device = "cpu") -> NoisyClassifierFile:
    """Load a file written by :func:`train_noisy_classifier`, with ``weights_only=True`` (no code
    can run). Anything else (a missing file, a damaged one, a training checkpoint, the feature
    extractor's weights) is a ValueError saying what it is and how to make the right one."""
    path = Path(path)
    make = f"make one with '{_MAKE_ONE} --out {path}'"  # where the caller looked for one
    blob = read_torch_file(path, "noisy classifier", advice=f"; {make}", error=ValueError)
    if (what := _what_else(blob)) is not None:
        # not at the path of this file, which would be replaced: a training checkpoint is
        # what --like takes
        run = path if isinstance(blob, dict) and "format_version" in blob else "RUN"
        raise ValueError(f"{path} is {what}; make one with 'ddpm train-classifier --noisy "
                         f"--like {run} --out CLASSIFIER.pt'")
    try:
        if blob["dataset"] not in DATASETS:  # said short, not echoed whole in every message
            raise ValueError(f"unknown dataset {shown(blob['dataset'])}")
        config = RunConfig.from_dict({"model": blob["model"]}).model  # older files: time_silu
        model = NoisyClassifier(config)
        model.load_state_dict(blob["weights"])
        schedule = blob["schedule"]
        loaded = NoisyClassifierFile(
            model=model.to(device).eval().requires_grad_(False), path=path,
            dataset=str(blob["dataset"]), classes=tuple(blob["classes"]),
            image_size=int(blob["image_size"]), channels=int(blob["channels"]),
            schedule=str(schedule["name"]),
            num_train_timesteps=int(schedule["num_train_timesteps"]),
            zero_terminal_snr=bool(schedule["zero_terminal_snr"]),
            accuracy_by_t={int(t): float(a) for t, a in blob["accuracy_by_t"].items()},
            epochs=int(blob["epochs"]), seed=int(blob["seed"]))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is a damaged noisy classifier ({detail}): its weights or "
                         f"metadata do not fit together; {make}") from None
    return loaded


# --- using it -------------------------------------------------------------------------------------


def check_compatible(clf: NoisyClassifierFile, config: RunConfig,
                     dataset_classes: tuple[str, ...] | list[str] = (), *,
                     run: str = "RUN") -> None:
    """Raise ValueError (one line) if ``clf`` cannot guide the run of ``config``: trained on
    another dataset, for another number of classes (the run's ``model.num_classes`` when it is
    class-conditional, else ``dataset_classes``, the classes of the run's data, when given),
    with another noise schedule (name, T, zero terminal SNR) or at another image size or
    channels. ``run`` names the run in the advice."""
    fix = f"train one with '{_MAKE_ONE.replace('RUN', str(run))}'"
    d, m = config.diffusion, config.model
    if config.latent.autoencoder:
        raise ValueError(f"the classifier {clf.path} reads noisy images, and this run diffuses an "
                         f"autoencoder's latents; guide it with --guidance (classifier-free) instead")
    if clf.dataset != config.data.dataset:
        raise ValueError(f"the classifier {clf.path} was trained on {clf.dataset}, the run on "
                         f"{config.data.dataset}; {fix}")
    run_classes = m.num_classes or len(dataset_classes)
    if run_classes and run_classes != clf.num_classes:
        raise ValueError(f"the classifier {clf.path} tells {clf.num_classes} classes apart, the "
                         f"run's data have {run_classes}; {fix}")
    if dataset_classes and clf.classes and tuple(dataset_classes) != clf.classes:
        raise ValueError(f"the classifier {clf.path} has classes {', '.join(clf.classes)}, the "
                         f"run's data {', '.join(dataset_classes)}; {fix}")
    if d.sde != "vp":
        raise ValueError(f"the classifier {clf.path} was trained on images noised by a VP "
                         f"schedule, and this run by the {d.sde.upper()} process; guide it with "
                         f"--guidance (classifier-free) instead")
    ours = (d.schedule, d.num_train_timesteps, d.zero_terminal_snr)
    theirs = (clf.schedule, clf.num_train_timesteps, clf.zero_terminal_snr)
    if ours != theirs:
        def say(name: str, T: int, zero: bool) -> str:
            return f"{name} schedule with T = {T}" + (" and zero terminal SNR" if zero else "")
        raise ValueError(f"the classifier {clf.path} was trained on images noised by the "
                         f"{say(*theirs)}, the run by the {say(*ours)}; {fix}")
    if (clf.channels, clf.image_size) != (m.in_channels, m.image_size):
        raise ValueError(f"the classifier {clf.path} reads {clf.channels}x{clf.image_size}x"
                         f"{clf.image_size} images, the run makes {m.in_channels}x{m.image_size}x"
                         f"{m.image_size}; {fix}")
