"""Latent diffusion (Rombach et al. 2021, sec. 3 and 4.3.2): a run whose U-Net models the
scaled latents z = s * E(x) of an autoencoder trained by 'ddpm train-autoencoder', and whose
samples are decoded as x = D(z / s).

* :func:`resolve_latent`: the autoencoder a config names, checked against the data and against
  the hash a run recorded, with the latents' shape filled in and the U-Net fitted to them;
* :func:`encode_split`: the training split encoded once (the scaled posterior's mean and std,
  of the mirrored images too when batches are flipped), cached by the autoencoder's hash and the
  images' content;
* :func:`load_decoder`: the autoencoder a trained latent run decodes with, refused with both
  hashes named when the file has changed since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .autoencoder import LoadedAutoencoder, coding_batch, load_autoencoder
from .checkpoint import CheckpointError
from .config import RunConfig, resolve
from .data import ImageData, LatentData, StreamingImages
from .data.cache import write_arrays
from .data.pixels import to_model_range
from .data.registry import default_cache_dir
from .models import UNetConfig
from .settings import SettingError

_CACHE_FORMAT = 1  # bump when the latents stored for the same autoencoder and images would change


def read_autoencoder(config: RunConfig, device: str | torch.device = "cpu") -> LoadedAutoencoder:
    """The autoencoder ``config.latent`` names, or a SettingError (the command line names
    --autoencoder) saying why it cannot be read: a missing path, a diffusion run, a damaged
    file, or (when the run recorded one) weights whose hash has changed since."""
    lc = config.latent
    assert lc.autoencoder is not None
    try:
        ae = load_autoencoder(lc.autoencoder, device)
    except CheckpointError as exc:
        raise SettingError("latent.autoencoder", f"{{setting}} {lc.autoencoder}: {exc}") from None
    if lc.sha256 is not None and ae.sha256 != lc.sha256:
        raise SettingError(
            "latent.autoencoder",
            f"{{setting}} {lc.autoencoder} has changed since the run was trained on its latents: "
            f"its weights hash to {ae.sha256[:16]}..., the run's to {lc.sha256[:16]}...; put the "
            f"autoencoder it was trained with back at that path")
    return ae


def resolve_latent(config: RunConfig) -> tuple[RunConfig, LoadedAutoencoder | None]:
    """``config`` (resolved) with its autoencoder read and checked against the data (channels
    and image size), its hash and latent shape recorded, the U-Net fitted to the latents and the
    sampler's x0 left unclipped (latents are not images in [-1, 1]); and the autoencoder. A
    config without one is returned as it is, with None."""
    if not config.latent.autoencoder:
        return config, None
    ae = read_autoencoder(config)
    data, trained = config.data, ae.config.data
    if (trained.channels, trained.image_size) != (data.channels, data.image_size):
        raise SettingError(
            "latent.autoencoder",
            f"{{setting}} {config.latent.autoencoder} was trained on {trained.channels}x"
            f"{trained.image_size}x{trained.image_size} images, and this run's data are "
            f"{data.channels}x{data.image_size}x{data.image_size}; train an autoencoder on these "
            f"images, or give --channels {trained.channels} --image-size {trained.image_size}")
    m = ae.config.model
    # the absolute path, so that the run samples from any folder
    latent = dataclasses.replace(config.latent, autoencoder=str(Path(config.latent.autoencoder).absolute()),
                                 sha256=ae.sha256, channels=m.latent_channels, downsample=m.downsample)
    sample = config.sample
    if sample.x0_transform == "clip":
        sample = dataclasses.replace(sample, x0_transform="none")
    assert data.image_size is not None  # resolved
    model = levels_that_fit(config.model, data.image_size // m.downsample)
    return resolve(dataclasses.replace(config, model=model, latent=latent, sample=sample)), ae


def levels_that_fit(model: UNetConfig, size: int) -> UNetConfig:
    """``model`` with its deepest levels left out while a side of ``size`` cannot be halved into
    them (a 28 px preset's three levels, 28/14/7 px, become two, 14/7 px, for 14 px latents); the
    attention of a level left out moves to the deepest level kept."""
    mults = model.channel_mults
    while len(mults) > 1 and size % (model.patch_size * 2 ** (len(mults) - 1)):
        mults = mults[:-1]
    if mults == model.channel_mults:
        return model
    sizes = model.level_sizes()
    kept, deepest = sizes[: len(mults)], sizes[len(mults) - 1]
    attention = sorted({r if r in kept else deepest for r in model.attention_resolutions},
                       reverse=True)
    return dataclasses.replace(model, channel_mults=mults, attention_resolutions=tuple(attention))


def load_decoder(config: RunConfig, device: str | torch.device = "cpu") -> LoadedAutoencoder | None:
    """The autoencoder a trained run decodes its samples with (None for a pixel-space run);
    a CheckpointError when it is missing or has changed since training."""
    if not config.latent.autoencoder:
        return None
    try:
        return read_autoencoder(config, device)
    except SettingError as exc:
        raise CheckpointError(f"this run diffuses in the latents of an autoencoder, and "
                              f"{exc.for_flag('its autoencoder')}") from None


@torch.no_grad()
def decode(ae: LoadedAutoencoder, z: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (about [-1, 1]) from scaled latents: x = D(z / s)."""
    batch = coding_batch(z.device)
    return torch.cat([ae.model.decode(part / ae.scale_factor).float() for part in z.split(batch)])


# --- the training split's latents -----------------------------------------------------------------


def encode_split(data: ImageData | StreamingImages, ae: LoadedAutoencoder, *, hflip: bool,
                 sample: bool, cache_dir: str | os.PathLike | None = None,
                 progress: bool = False) -> LatentData:
    """``data`` through ``ae``'s encoder once: per image the scaled posterior s * q(z | x), as
    mean and std (of the mirrored images too with ``hflip``), read from the cache when these
    images were encoded by this autoencoder before. Undecodable files of a streamed split are
    left out, with their labels."""
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{ae.sha256}|{hflip}|{_digest(data)}".encode())
    path = Path(cache_dir or default_cache_dir()) / "latents" / f"{key.hexdigest()[:24]}.npz"
    cached = _read(path)
    if cached is None:
        cached = _encode(data, ae, hflip=hflip, progress=progress)
        write_arrays(path, "encoded latents", **{k: v.numpy() for k, v in cached.items()})
    flipped = (cached["flipped_mean"], cached["flipped_std"]) if hflip else None
    return LatentData(cached["mean"], cached["std"], cached["labels"], f"{data.name} latents",
                      data.classes, flipped, sample)


def _encode(data: ImageData | StreamingImages, ae: LoadedAutoencoder, *, hflip: bool,
            progress: bool) -> dict[str, torch.Tensor]:
    device = next(ae.model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "flipped_mean": [],
                                            "flipped_std": [], "labels": []}
    with tqdm(total=len(data), unit="img", disable=not progress, desc="encoding latents") as bar:
        batch = coding_batch(device)
        for start in range(0, len(data), batch):
            idx = torch.arange(start, min(start + batch, len(data)))
            images, labels = _images(data, idx)
            x = to_model_range(images).to(device)
            for prefix, view in (("", x), ("flipped_", x.flip(-1)))[: 2 if hflip else 1]:
                with torch.no_grad():
                    posterior = ae.model.encode(view)
                parts[prefix + "mean"].append((ae.scale_factor * posterior.mean).float().cpu())
                parts[prefix + "std"].append((ae.scale_factor * posterior.std).float().cpu())
            parts["labels"].append(labels)
            bar.update(len(idx))
    return {k: torch.cat(v) for k, v in parts.items() if v}


def _images(data: ImageData | StreamingImages, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels at ``idx``; of a streamed split, those that decode."""
    if isinstance(data, ImageData):
        return data.images[idx], data.labels[idx]
    items = [data[int(i)] for i in idx]
    bad = [str(data.paths[i]) for i, _, error in items if error]
    if bad and data.strict:
        raise ValueError(f"cannot decode image {bad[0]}; delete or replace it")
    if bad:
        warnings.warn(f"could not decode {len(bad)} image file(s), e.g. {', '.join(bad[:3])}; "
                      f"they are left out of the latents", stacklevel=3)
    good = [i for i, _, error in items if not error]
    return torch.stack([image for _, image, error in items if not error]), data.labels[good]


def _digest(data: ImageData | StreamingImages) -> str:
    """A digest of the split's content: its pixels and labels in memory; of a streamed split,
    its files' paths, sizes and times and the size they are decoded to."""
    h = hashlib.sha256()
    if isinstance(data, ImageData):
        h.update(repr(tuple(data.images.shape)).encode())
        h.update(data.images.contiguous().numpy().tobytes())
        h.update(data.labels.contiguous().numpy().tobytes())
        return h.hexdigest()
    h.update(f"{data.size}|{data.channels}|{data.crop}\n".encode())
    for path, label in zip(data.paths, data.labels.tolist(), strict=True):
        st = Path(path).stat()
        h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    return h.hexdigest()


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached latents at ``path``; None when missing or unreadable (encoded again)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    except Exception:  # missing or damaged: never trusted
        return None
