"""Sample quality: FID, KID and precision/recall, and the feature extractors that define them.

The metric arithmetic and the Inception-v3 network come from torch-fidelity (Obukhov et al.), the
maintained port of the TensorFlow FID code: its Inception reproduces the original graph,
TF1-style bilinear resize to 299 px included, so FIDs computed with it match the literature's.
It needs no SciPy. What lives here is what torch-fidelity leaves to its user:

* two extractors behind one interface: Inception-v3 (``inception-v3``; weights from the torch hub
  cache or ``--inception-weights``, never downloaded silently) and the packaged classifiers for
  MNIST and Fashion-MNIST (``mnist-cnn``, ``fashion-mnist-cnn``), which work fully offline;
* reference statistics per (dataset, split, extractor), cached on disk under a key that changes
  with the images, the split and the extractor's weights;
* the *floor*: the same metrics for n held-out real images, what a perfect generator would score.

FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the kernel (x.y / d + 1)^3,
averaged over random subsets. Precision/recall: Kynkaanniemi et al. 2019, k = 3.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import atomic_save, unwritable
from .classifier import CLASSIFIER_DATASETS, WeightsNotFoundError, load_classifier
from .config import DataConfig
from .data import SPLITS, ImageData, dataset_spec, default_cache_dir, load_dataset, to_model_range

INCEPTION = "inception-v3"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
EXTRACTORS = ("auto", *(f"{d}-cnn" for d in CLASSIFIER_DATASETS), INCEPTION)
CACHE_FORMAT = 1
#: real images kept per cached reference for KID, precision/recall and the floor (all of them
#: for the small classifier features; a fixed random subset of Inception's 2048-d ones).
MAX_STORED_FEATURES = {INCEPTION: 10_000}
#: the dimension of each extractor's features: FID needs at least this many images, below which
#: their covariance is singular and FID measures the rank deficit, not the images.
FEATURE_DIMS = {**{f"{d}-cnn": 128 for d in CLASSIFIER_DATASETS}, INCEPTION: 2048}


def check_image_count(n: int, extractor: str, option: str | None = None) -> None:
    """Raise ValueError when ``n`` images are too few for FID with ``extractor``'s features
    (``option``: the setting that chose n, named in the advice)."""
    dim = FEATURE_DIMS.get(extractor, 2)
    if n < dim:
        advice = f"give {option} {dim} or more" if option else f"score {dim} images or more"
        raise ValueError(f"FID of {n} images with {extractor} features is not estimable: their "
                         f"covariance needs at least {dim} images, one per feature dimension; "
                         f"{advice}")


# --- feature extractors -----------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """Images uint8 ``[N, C, H, W]`` -> features float32 ``[N, dim]``, in batches."""

    name: str
    fingerprint: str  # changes whenever the weights do; part of every cache key
    dim: int
    channels: int  # what the network takes; grey <-> RGB is converted on the way in
    size: int | None  # the input size it needs, or None when it resizes by itself
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 250

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, *, progress: bool = False, desc: str = "") -> torch.Tensor:
        images = _as_uint8_images(images)
        out = []
        with tqdm(total=len(images), disable=not progress, unit="img", desc=desc or self.name) as bar:
            for batch in images.split(self.batch_size):
                batch = self._convert(batch.to(self.device))
                out.append(self.forward(batch).float().cpu())
                bar.update(len(batch))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3 and self.channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif x.shape[1] == 1 and self.channels == 3:  # grey repeated to RGB, as standard FID does
            x = x.repeat(1, 3, 1, 1)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear",
                              antialias=True, align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        return x


def _as_uint8_images(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def inception_weights_path(explicit: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: ``explicit``, else the torch hub cache; never downloads."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise WeightsNotFoundError(f"--inception-weights {path}: no such file")
        return path
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / INCEPTION_FILE
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Inception-v3 weights not found: put {INCEPTION_FILE} (91 MB, from {INCEPTION_URL}) "
            f"in {folder}/ or pass --inception-weights PATH; for MNIST and Fashion-MNIST the "
            f"offline extractors (--extractor fashion-mnist-cnn or mnist-cnn) need no download"
        )
    return path


def inception_extractor(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        batch_size: int = 100) -> FeatureExtractor:
    """torch-fidelity's Inception-v3 (pool3, 2048 features) from a local weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(weights)
    try:  # torch-fidelity unpickles without weights_only: refuse anything but plain tensors first
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a plain weights file ({type(exc).__name__}); use "
                         f"{INCEPTION_FILE} from {INCEPTION_URL}") from None
    device = torch.device(device)
    try:
        net = FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as exc:  # wrong keys or shapes
        raise ValueError(f"{path} does not hold Inception-v3 FID weights ({str(exc)[:200]}...); "
                         f"use {INCEPTION_FILE} from {INCEPTION_URL}") from None
    net = net.to(device)
    return FeatureExtractor(INCEPTION, _sha256_file(path), 2048, 3, None,
                            lambda x: net(x)[0], device, batch_size)


def classifier_extractor(dataset: str, weights: str | os.PathLike | None = None,
                         device: str | torch.device = "cpu") -> FeatureExtractor:
    """The packaged classifier of ``dataset``: 128 features from its penultimate layer."""
    clf = load_classifier(dataset, weights)
    device = torch.device(device)
    model = clf.model.to(device)
    return FeatureExtractor(f"{dataset}-cnn", clf.fingerprint, 128, 1, 28,
                            lambda x: model.features(to_model_range(x)), device, 1000)


def resolve_extractor(name: str, dataset: str) -> str:
    """``auto`` is the dataset's packaged classifier when it has one, Inception-v3 otherwise."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")
    if name == "auto":
        return f"{dataset}-cnn" if dataset in CLASSIFIER_DATASETS else INCEPTION
    return name


def load_extractor(name: str, dataset: str, *, inception_weights: str | os.PathLike | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    name = resolve_extractor(name, dataset)
    if name == INCEPTION:
        return inception_extractor(inception_weights, device)
    return classifier_extractor(name.removesuffix("-cnn"), device=device)


# --- the metrics --------------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features ``[N, D]``."""
    f = features.double().numpy()
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. in sec. 4)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    stats = [{"mu": np.asarray(m, np.float64), "sigma": np.asarray(s, np.float64)}
             for m, s in ((mu1, sigma1), (mu2, sigma2))]
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


def kernel_distance(features_1: torch.Tensor, features_2: torch.Tensor, *, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of the unbiased MMD^2 estimate with the
    cubic polynomial kernel; subsets hold min(subset_size, n_1, n_2) samples."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(features_1), len(features_2))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(features_1)} "
                         f"and {len(features_2)}")
    out = kid_features_to_metric(
        features_1.double(), features_2.double(), kid_subsets=subsets, kid_subset_size=size,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    out = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k,
                                 prc_batch_size=10_000, save_cpu_ram=True, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


# --- reference statistics, cached ---------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The real images' statistics for one (dataset, split, extractor)."""

    dataset: str
    split: str
    extractor: str
    count: int  # images the statistics were computed from
    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor  # all of them, or a fixed random subset (MAX_STORED_FEATURES)
    path: Path  # the cache file


def reference_key(data: ImageData, split: str, extractor: FeatureExtractor, limit: int | None) -> str:
    """A digest of everything the statistics depend on: the pixels, the split, the weights."""
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT}|{data.name}|{split}|{extractor.name}|{extractor.fingerprint}|"
                  f"{limit}|{tuple(data.images.shape)}|".encode())
    digest.update(data.images.numpy().tobytes())
    return digest.hexdigest()[:16]


def reference_statistics(
    data: ImageData,
    split: str,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> Reference:
    """Features and statistics of ``data`` (or of a fixed random ``limit`` of its images),
    from the cache when the same images went through the same extractor before."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = unwritable(folder / "reference") is None
    stem = f"{data.name}-{split}-{extractor.name}" + (f"-{limit}" if limit else "")
    path = folder / "reference" / f"{stem}-{reference_key(data, split, extractor, limit)}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            return Reference(data.name, split, extractor.name, int(blob["count"]),
                             blob["mu"].numpy(), blob["sigma"].numpy(), blob["features"], path)
        except Exception:  # an unreadable cache file is recomputed, never trusted
            pass
    images = data.images
    if limit is not None and len(images) > limit:
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:limit]]
    features = extractor(images, progress=progress, desc=f"reference features ({stem})")
    mu, sigma = feature_statistics(features)
    keep = MAX_STORED_FEATURES.get(extractor.name)
    if keep is not None and len(features) > keep:
        features = features[torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:keep]]
    if cache:
        try:
            atomic_save({"count": len(images), "mu": torch.from_numpy(mu),
                         "sigma": torch.from_numpy(sigma), "features": features.contiguous()}, path)
        except (OSError, RuntimeError) as exc:  # the statistics are computed; keep them
            warnings.warn(f"could not cache reference statistics in {path.parent} "
                          f"({str(exc).splitlines()[0]}); the next evaluation computes them again",
                          stacklevel=2)
        for stale in path.parent.glob(f"{stem}-*.pt"):  # the same reference for older pixels/weights
            if stale != path and re.fullmatch(re.escape(stem) + "-[0-9a-f]{16}", stale.stem):
                stale.unlink(missing_ok=True)
    return Reference(data.name, split, extractor.name, len(images), mu, sigma, features, path)


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """One evaluation: the generated images' scores and the floor (held-out real images)."""

    fid: float
    kid: float
    kid_std: float
    n: int
    dataset: str
    split: str
    extractor: str
    floor_fid: float
    floor_kid: float
    floor_n: int
    precision: float | None = None
    recall: float | None = None
    floor_precision: float | None = None
    floor_recall: float | None = None
    sampler: str | None = None
    steps: int | None = None
    seed: int | None = None
    reference_n: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def data_options(data: DataConfig) -> dict:
    """The :func:`load_dataset` options that give the real images a run was trained on (as its
    model sees them: a random crop's reference is the centre crop)."""
    return {"image_size": data.image_size, "channels": data.channels,
            "crop": "center" if data.crop == "random" else data.crop,
            "folder_labels": data.folder_labels, "cache_dir": data.cache_dir, "strict": data.strict}


class Evaluator:
    """Scores images against one dataset split; holds the extractor, reference and floor."""

    def __init__(
        self,
        dataset: str,
        data_dir: str | os.PathLike | None,
        *,
        split: str = "train",
        extractor: str | FeatureExtractor = "auto",
        inception_weights: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        progress: bool = False,
        data_options: dict | None = None,
    ):
        """``data_options`` go to :func:`load_dataset` (image size, channels, crop, ...), so the
        real images are the ones the model was trained to make."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if isinstance(extractor, str):
            extractor = load_extractor(extractor, dataset, inception_weights=inception_weights,
                                       device=device)
        self.dataset, self.split, self.extractor, self.progress = dataset, split, extractor, progress
        start = time.perf_counter()
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if (reason := unwritable(folder / "reference")) is not None:  # said now, not after minutes
            warnings.warn(f"cannot cache reference statistics in {folder / 'reference'} "
                          f"({reason}); computing them without a cache (--cache-dir or "
                          f"$DDPM_CACHE_DIR to choose another folder)", stacklevel=2)
        options = dict(data_options or {})
        data = load_dataset(dataset, data_dir, split, **options)
        self.image_shape = tuple(data.images.shape[1:])  # [C, H, W] of the real images
        self.reference = reference_statistics(data, split, extractor, cache_dir=cache_dir,
                                              progress=progress)
        # The floor's real images come from the other split, so they are not the reference's own;
        # a dataset without one (an image folder, or split "all") draws them from the reference.
        held_split = split if split == "all" or dataset_spec(dataset).folder else (
            "test" if split == "train" else "train")
        held = data if held_split == split else load_dataset(dataset, data_dir, held_split, **options)
        self.held_out = reference_statistics(held, held_split, extractor, cache_dir=cache_dir,
                                             limit=10_000, progress=progress)
        self.setup_seconds = time.perf_counter() - start
        self._floor: dict[tuple[int, int, bool], dict[str, float]] = {}

    def _scores(self, features: torch.Tensor, seed: int, prc: bool) -> dict[str, float]:
        ref = self.reference
        mu, sigma = feature_statistics(features)
        out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
        out["kid"], out["kid_std"] = kernel_distance(features, ref.features, seed=seed)
        if prc:  # equal-sized real and fake sets, as Kynkaanniemi et al. use
            pick = torch.randperm(len(ref.features), generator=torch.Generator().manual_seed(seed))
            out["precision"], out["recall"] = precision_recall(features, ref.features[pick[:len(features)]])
        return out

    def floor(self, n: int, *, seed: int = 0, prc: bool = False) -> tuple[int, dict[str, float]]:
        """Scores of ``n`` held-out real images (fewer if the other split is smaller)."""
        feats = self.held_out.features
        n = min(n, len(feats))
        key = (n, seed, prc)
        if key not in self._floor:
            pick = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:n]
            self._floor[key] = self._scores(feats[pick], seed, prc)
        return n, self._floor[key]

    def evaluate(self, images: torch.Tensor, *, seed: int = 0, prc: bool = False,
                 sampler: str | None = None, steps: int | None = None,
                 seconds: dict[str, float] | None = None) -> EvalResult:
        """Score uint8 images ``[N, C, H, W]``. ``seed`` draws KID's subsets and the floor's
        images; ``sampler``, ``steps`` and ``seconds`` record how the images were made."""
        images = _as_uint8_images(images)
        check_image_count(len(images), self.extractor.name)
        if tuple(images.shape[1:]) != self.image_shape:
            shape = "x".join(map(str, images.shape[1:]))
            warnings.warn(f"the images are {shape} but the {self.dataset} {self.split} images are "
                          f"{'x'.join(map(str, self.image_shape))}; both are converted to what "
                          f"{self.extractor.name} takes, but the scores compare unlike images",
                          stacklevel=2)
        start = time.perf_counter()
        features = self.extractor(images, progress=self.progress, desc="features")
        feature_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = self._scores(features, seed, prc)
        floor_n, floor = self.floor(len(images), seed=seed, prc=prc)
        seconds = dict(seconds or {})
        seconds.update(features=feature_s, metrics=time.perf_counter() - start,
                       reference=self.setup_seconds)
        return EvalResult(
            fid=scores["fid"], kid=scores["kid"], kid_std=scores["kid_std"], n=len(images),
            dataset=self.dataset, split=self.split, extractor=self.extractor.name,
            floor_fid=floor["fid"], floor_kid=floor["kid"], floor_n=floor_n,
            precision=scores.get("precision"), recall=scores.get("recall"),
            floor_precision=floor.get("precision"), floor_recall=floor.get("recall"),
            sampler=sampler, steps=steps, seed=seed, reference_n=self.reference.count,
            seconds=seconds,
        )
