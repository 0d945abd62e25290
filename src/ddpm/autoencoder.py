"""Latent diffusion's first stage: the autoencoder run's settings, its loss, what it is measured
by, and its file read back (Rombach et al. 2021, sec. 3 and 4.3.2, appendix G).

The loss of one image x, with z ~ q(z | x) drawn by the reparameterisation:

    L = sum_pixels |x - D(z)|  (or squared, --reconstruction l2)
        + kl_weight * KL(q(z | x) || N(0, I))

summed over the image's pixels and the latent's elements, then averaged over the batch, so
that ``kl_weight`` = 1e-6 means what it means in Rombach et al.'s KL-f4/f8 models. The KL only
keeps the latent space from growing arbitrary in scale; the latents the diffusion model sees are
then multiplied by the run's scale factor, 1 / std of the training set's latents (sec. 4.3.2),
so that they have unit variance as the forward process assumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_run_or_file, run_of
from .config import DataConfig, TrainConfig, one_stopping_rule, resolve_data
from .data import ImageData, StreamingImages, held_out_images, images_at
from .data.pixels import to_model_range, to_uint8
from .data.registry import dataset_spec
from .models.autoencoder import Autoencoder, AutoencoderConfig, PatchDiscriminator
from .settings import SettingError, check_fields, checked_sections, setting

KIND = "autoencoder"  # the "kind" key of an autoencoder run's checkpoints
RECONSTRUCTIONS = ("l1", "l2")
SCALE_IMAGES = 2048  # training images whose latents set the scale factor (std within ~0.5%)
EVAL_IMAGES = 2000  # test images that PSNR and rFID are measured on


def coding_batch(device: torch.device) -> int:
    """Images per call of the encoder or the decoder outside training: 16 on a CPU, where
    larger batches ran slower (the 64 px Fashion-MNIST autoencoder of BENCHMARKS.md encoded 150
    images/s at 16 against 83 at 256 and decoded 55 against 33, its large activations allocated
    afresh from the system on every call), 256 on a GPU."""
    return 16 if device.type == "cpu" else 256


@dataclass(frozen=True, kw_only=True)
class AutoencoderLossConfig:
    reconstruction: str = setting(
        "l1", flag="--reconstruction", choices=RECONSTRUCTIONS,
        help="per-pixel reconstruction error: l1 (Rombach et al.'s, sharper) or l2")
    kl_weight: float = setting(
        1e-6, flag="--kl-weight", at_least=0, below=1e3,
        help="weight of KL(q(z|x) || N(0, I)) against the reconstruction error summed over "
             "pixels (Rombach et al.'s 1e-6)")
    perceptual_weight: float = setting(
        0.0, flag="--perceptual-weight", at_least=0, below=1e6,
        help="weight of the squared distance between the packaged classifier's 128 features of "
             "each image and of its reconstruction (MNIST and Fashion-MNIST at 28 px; 0: none)")
    disc_weight: float = setting(
        0.0, flag="--disc-weight", at_least=0, below=1e3,
        help="weight of a patch discriminator's hinge loss (Esser et al. 2021), scaled to the "
             "reconstruction's gradient at the decoder's last layer (Rombach et al.: 0.5; 0: none)")
    disc_start: int = setting(500, flag="--disc-start", at_least=0,
                              help="the step from which the discriminator trains and is used")

    def validate(self) -> None:
        check_fields(self)


# The train settings an autoencoder run reads (the rest are the diffusion model's: EMA, FID,
# classes, sampling); its config.json holds only these.
TRAIN_SETTINGS = ("batch_size", "lr", "weight_decay", "adam_betas", "warmup_steps", "lr_schedule",
                  "grad_clip", "steps", "minutes", "precision", "seed", "log_every", "sample_every",
                  "checkpoint_every", "keep_checkpoints", "threads", "device")
# A small convolutional autoencoder takes a higher learning rate and fewer steps than a diffusion
# U-Net; a starting point for 28-64 px images, not yet chosen by measurement.
DEFAULT_TRAIN = TrainConfig(batch_size=64, lr=1e-3, warmup_steps=100, steps=3000, log_every=50,
                            sample_every=500, checkpoint_every=500)
SECTIONS: dict[str, type] = {"model": AutoencoderConfig, "loss": AutoencoderLossConfig,
                             "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True, kw_only=True)
class AutoencoderRunConfig:
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: DEFAULT_TRAIN)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"] = {k: v for k, v in d["train"].items() if k in TRAIN_SETTINGS}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AutoencoderRunConfig:
        """Inverse of :meth:`to_dict`; missing keys keep their defaults, unknown ones are refused."""
        return AutoencoderRunConfig().with_overrides(d, resolve=False)

    def with_overrides(self, overrides: dict[str, Any], *, resolve: bool = True) -> AutoencoderRunConfig:
        """This config with ``{section: {field: value}}`` applied, each checked for its name and
        type; with ``resolve``, the data's facts filled in and the model fitted to the data."""
        given = checked_sections(SECTIONS, overrides, run="an autoencoder run")
        stray = [k for k in given["train"] if k not in TRAIN_SETTINGS]
        if stray:
            raise ValueError(f"train.{stray[0]} is a diffusion setting; an autoencoder run reads "
                             f"train.{', train.'.join(TRAIN_SETTINGS)}")
        train = one_stopping_rule(given["train"])
        config = AutoencoderRunConfig(
            model=dataclasses.replace(self.model, **given["model"]),
            loss=dataclasses.replace(self.loss, **given["loss"]),
            data=dataclasses.replace(self.data, **given["data"]),
            train=dataclasses.replace(self.train, **train))
        return config.resolved() if resolve else config

    def resolved(self) -> AutoencoderRunConfig:
        """The data's defaults filled in (``config.resolve_data``) and the network made for its
        channels and image size."""
        data = resolve_data(self.data)
        assert data.channels is not None and data.image_size is not None  # resolve_data filled them
        model = dataclasses.replace(self.model, in_channels=data.channels,
                                    image_size=data.image_size)
        return dataclasses.replace(self, data=data, model=model)

    def validate(self) -> None:
        self.model.validate()
        self.loss.validate()
        self.data.validate()
        self.train.validate()
        data = self.data
        if self.loss.perceptual_weight and not (
                dataset_spec(data.dataset).feature_classifier
                and (data.channels, data.image_size) in ((1, 28), (None, None))):
            raise SettingError("loss.perceptual_weight", f"{{setting}} needs a packaged feature "
                               f"classifier for the images (MNIST and Fashion-MNIST at 1x28x28), "
                               f"and {data.dataset} has none at this size; drop it")


# --- the loss and its measures --------------------------------------------------------------------


def autoencoder_loss(ae: Autoencoder, x: torch.Tensor, loss: AutoencoderLossConfig,
                     generator: torch.Generator | None = None, *,
                     features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     discriminator: PatchDiscriminator | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The module docstring's L, averaged over the batch ``x`` ``[B, C, H, W]`` in [-1, 1], and
    its parts (detached): the mean per-pixel reconstruction error ``rec``, the mean KL per image
    ``kl`` (nats) and the reconstruction ``x_hat``. With ``features`` (a feature network) it adds
    ``perceptual_weight`` times the squared feature distance; with a ``discriminator``,
    ``disc_weight`` times its adversarial loss -mean D(x_hat) (``adv``), scaled by
    :func:`adversarial_weight` (``adv_weight``)."""
    x_hat, posterior = ae(x, generator)
    error = x_hat.float() - x
    per_pixel = error.abs() if loss.reconstruction == "l1" else error.pow(2)
    reconstruction = per_pixel.sum(dim=(1, 2, 3)).mean()  # summed per image, as Rombach et al.
    kl = posterior.kl().float().mean()
    parts = {"rec": per_pixel.mean().detach(), "kl": kl.detach(), "x_hat": x_hat.detach()}
    if features is not None:
        distance = (features(x_hat).float() - features(x).float()).pow(2).sum(dim=1).mean()
        reconstruction = reconstruction + loss.perceptual_weight * distance
        parts["perceptual"] = distance.detach()
    total = reconstruction + loss.kl_weight * kl
    if discriminator is not None:
        adversarial = -discriminator(x_hat).float().mean()  # the generator's hinge loss
        weight = adversarial_weight(reconstruction, adversarial, ae.decoder.conv_out.weight)
        total = total + loss.disc_weight * weight * adversarial
        parts.update(adv=adversarial.detach(), adv_weight=weight)
    return total, parts


def adversarial_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor,
                       last_layer: torch.Tensor) -> torch.Tensor:
    """Esser et al. 2021, eq. 7: lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4), the gradients
    at the decoder's last layer, so that the adversarial loss moves the decoder about as much as
    the reconstruction does, whatever their scales (clamped to [0, 1e4], and not differentiated)."""
    (g_rec,) = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


def discriminator_loss(discriminator: PatchDiscriminator, x: torch.Tensor,
                       x_hat: torch.Tensor) -> torch.Tensor:
    """The hinge loss (Lim & Ye 2017) Esser et al. train their discriminator with:
    (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2, real images x, reconstructions x_hat."""
    real, fake = discriminator(x).float(), discriminator(x_hat).float()
    return 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())


def psnr(original: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each uint8 image ``[N, C, H, W]``, in dB:
    10 log10(255^2 / MSE); an exact copy is +inf."""
    mse = (original.double() - reconstructed.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def encode_images(ae: Autoencoder, images: torch.Tensor, *, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Unscaled latents of uint8 images ``[N, C, H, W]``: the posterior means, or draws from
    q(z | x) with ``sample``; float32 ``[N, c, H/F, W/F]`` on the CPU."""
    device = next(ae.parameters()).device
    batch_size = coding_batch(device)
    out = []
    for i in range(0, len(images), batch_size):
        posterior = ae.encode(to_model_range(images[i : i + batch_size]).to(device))
        z = posterior.sample(generator) if sample else posterior.mean
        out.append(z.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(ae: Autoencoder, images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` through the posterior mean and the decoder, as uint8."""
    device = next(ae.parameters()).device
    batch_size = coding_batch(device)
    out = []
    for i in range(0, len(images), batch_size):
        z = ae.encode(to_model_range(images[i : i + batch_size]).to(device)).mean
        out.append(to_uint8(ae.decode(z).float().clamp(-1, 1)).cpu())
    return torch.cat(out)


def latent_scale(ae: Autoencoder, data: ImageData | StreamingImages, seed: int) -> float:
    """1 / std of the latents z ~ q(z | x) of a fixed random ``SCALE_IMAGES`` of the training
    images, over all their elements (Rombach et al. sec. 4.3.2): the factor that gives the
    diffusion model latents of unit variance."""
    images = images_at(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(
        seed))[:SCALE_IMAGES])
    z = encode_images(ae, images, sample=True, generator=torch.Generator(
        next(ae.parameters()).device).manual_seed(seed))
    return 1.0 / float(z.double().std())


def reconstruction_scores(ae: Autoencoder, data: DataConfig, *,
                          limit: int = EVAL_IMAGES) -> dict[str, float]:
    """How well ``ae`` reconstructs ``limit`` fixed random test images (the run's own split for
    a folder of images, which has no test split): their mean PSNR, and for a dataset with a
    packaged classifier the rFID, the FID between the images and their reconstructions on its
    features (offline; no weights are downloaded), at 28 px whatever size the run trains at."""
    from .metrics import classifier_extractor, feature_statistics, frechet_distance

    spec = dataset_spec(data.dataset)
    images, _ = held_out_images(data, limit)
    recon = reconstruct(ae, images)
    scores = {"psnr": float(psnr(images, recon).clamp(max=100).mean()), "n": len(images)}
    # at another size than 28 px the extractor resizes both sides to it, as eval does samples
    if spec.feature_classifier and images.shape[1] == 1 and len(images) > 1:
        extractor = classifier_extractor(data.dataset)
        scores["rfid"] = frechet_distance(*feature_statistics(extractor(images)),
                                          *feature_statistics(extractor(recon)))
    return scores


def scores_text(scores: dict[str, float]) -> str:
    """``reconstruction_scores`` in words: "PSNR 28.06 dB, rFID 0.766"."""
    rfid = f", rFID {scores['rfid']:.3f}" if "rfid" in scores else ""
    return f"PSNR {scores['psnr']:.2f} dB{rfid}"


# --- the file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedAutoencoder:
    """An autoencoder run read back: the network (eval mode), its scale factor and the hash of
    its weights and scale, which a latent diffusion run records to name its autoencoder."""

    model: Autoencoder
    scale_factor: float
    sha256: str
    config: AutoencoderRunConfig
    path: Path


def weights_hash(state: dict[str, Any]) -> str:
    """SHA-256 of an autoencoder checkpoint's weights and scale factor, in a fixed order: the same
    for the same numbers, whatever file they were read from."""
    h = hashlib.sha256()
    for name, tensor in sorted(state["model"].items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(repr(float(state["scale_factor"])).encode())
    return h.hexdigest()


def is_autoencoder_state(state: dict[str, Any]) -> bool:
    return state.get("kind") == KIND


def load_autoencoder(run_or_file: str | Path, map_location: str | torch.device = "cpu",
                     ) -> LoadedAutoencoder:
    """The newest checkpoint of an autoencoder run (or the file given), ready to encode and
    decode; a diffusion run, a missing path or a damaged file is a CheckpointError saying so."""
    path, state = load_run_or_file(run_or_file, map_location)
    if not is_autoencoder_state(state):
        raise CheckpointError(
            f"{run_of(path)} is a diffusion run, not an autoencoder; give a run written by "
            f"'ddpm train-autoencoder'")
    try:
        config = AutoencoderRunConfig.from_dict(state["config"])
        model = Autoencoder(config.model)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path} holds an autoencoder this version of ddpm cannot read "
                              f"({str(exc).splitlines()[0]})") from None
    scale = float(state["scale_factor"])
    if not (math.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{path} has the scale factor {scale}, not a positive number; "
                              f"it is damaged")
    return LoadedAutoencoder(model.to(map_location).eval().requires_grad_(False), scale,
                             weights_hash(state), config, path)
