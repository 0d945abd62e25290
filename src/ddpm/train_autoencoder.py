"""``ddpm train-autoencoder``: the autoencoder of latent diffusion trained as a run directory, as
``train`` trains a diffusion model: config.json, atomic checkpoints, an exact ``--resume``,
metrics.jsonl and TensorBoard, a reconstruction grid every ``sample_every`` steps, stopped by
steps, minutes or a signal.

Every checkpoint holds the scale factor of its weights (``autoencoder.latent_scale``), so any of
them can serve a latent diffusion run; the last one also logs PSNR (and, for MNIST and
Fashion-MNIST, rFID on the packaged classifier's features) on the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .autoencoder import (
    KIND,
    SECTIONS,
    AutoencoderRunConfig,
    autoencoder_loss,
    discriminator_loss,
    images_at,
    latent_scale,
    reconstruct,
    reconstruction_scores,
)
from .autoprecision import choose
from .checkpoint import (
    _set_generator,
    atomic_write_bytes,
    check_writable,
    list_checkpoints,
    load_run_or_file,
    remove_partial_writes,
    save_checkpoint,
)
from .classifier import load_classifier
from .data import BatchStream, ImageData, StreamingImages, open_dataset
from .data.pixels import to_model_range
from .data.registry import default_cache_dir
from .models.autoencoder import Autoencoder, PatchDiscriminator
from .monitor import StopRequest
from .rundir import CONFIG_FILE, SAMPLES_DIR, Loggers, SideOutputs, run_lock
from .runtime import (
    PrecisionProbe,
    autocast,
    resolve_device,
    torch_state_kept,
    training_precision,
)
from .settings import declaration
from .step import learning_rate
from .viz import save_grid

GRID_IMAGES = 8  # originals in the grid's top row, their reconstructions below


class AutoencoderState:
    """Everything an autoencoder run is at a step; ``state_dict()`` is its checkpoint (with the
    scale factor of these weights) and ``load_state_dict()`` resumes it exactly."""

    def __init__(self, config: AutoencoderRunConfig, model: Autoencoder,
                 optimizer: torch.optim.Optimizer, stream: BatchStream,
                 noise_generator: torch.Generator, critic: Critic | None = None):
        self.config, self.model, self.optimizer = config, model, optimizer
        self.stream, self.noise_generator, self.critic = stream, noise_generator, critic
        self.step, self.elapsed_before = 0, 0.0
        self.clock = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.clock

    def state_dict(self, scale_factor: float) -> dict[str, Any]:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"the weights are not finite at step {self.step}; nothing "
                                     f"was saved over the existing checkpoints")
        return {
            "kind": KIND,
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_stream": self.stream.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state(),
                    "data": self.stream.generator.get_state()},
            "scale_factor": scale_factor,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            **({} if self.critic is None else {
                "discriminator": self.critic.model.state_dict(),
                "discriminator_optimizer": self.critic.optimizer.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            self.critic.model.load_state_dict(state["discriminator"])
            self.critic.optimizer.load_state_dict(state["discriminator_optimizer"])
        self.stream.load_state_dict(state["data_stream"])
        torch.set_rng_state(state["rng"]["torch"])
        _set_generator(self.noise_generator, state["rng"]["noise"], 2 * int(state["step"]) + 1, path)
        _set_generator(self.stream.generator, state["rng"]["data"], 2 * int(state["step"]), path)
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])


@dataclass
class Critic:
    """What the reconstructions are judged by: the patch discriminator and its AdamW (betas
    0.5, 0.9 as Esser et al.'s), trained from ``loss.disc_start``."""

    model: PatchDiscriminator
    optimizer: torch.optim.Optimizer


@dataclass
class AutoencoderResult:
    run_dir: Path
    step: int
    checkpoint: Path
    elapsed_s: float
    last_loss: float
    scale_factor: float
    scores: dict[str, float]  # psnr (dB) and, for MNIST/Fashion-MNIST, rfid, on the test split
    stopped_by: int | None = None


def check_autoencoder_run(config: AutoencoderRunConfig, run_dir: Path, *, resume: bool) -> None:
    """ValueError before anything is written, for a run that would fail later."""
    if not resume and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds a run; continue it with 'ddpm "
                         f"train-autoencoder --resume {run_dir}' or choose a new folder")
    config.validate()
    training_precision(config.train.precision, resolve_device(config.train.device))
    check_writable(run_dir, "the run directory")


def resumed_config(run_dir: str | os.PathLike, overrides: dict[str, Any], *,
                   preset: AutoencoderRunConfig | None = None) -> tuple[AutoencoderRunConfig, int]:
    """The config an autoencoder run was trained with, with the settings of ``overrides`` that
    their declarations let ``--resume`` change (the stopping rule, the machine), and the step
    of its newest checkpoint. With a ``preset`` (a job script run again with ``--resume``
    added), every other setting it builds, under ``overrides``, must be the run's."""
    path, state = load_run_or_file(run_dir)
    if state.get("kind") != KIND:
        raise ValueError(f"{run_dir} is a diffusion run; resume it with 'ddpm train --resume "
                         f"{run_dir}'")
    saved = AutoencoderRunConfig.from_dict(state["config"])
    wanted = overrides
    if preset is not None:
        built = preset.with_overrides(overrides).to_dict()
        wanted = {s: {**{k: v for k, v in built[s].items() if not _resumable(s, k)},
                      **overrides.get(s, {})} for s in built}
    for section, values in wanted.items():
        for name, value in values.items():
            if not _resumable(section, name):
                old = saved.to_dict().get(section, {}).get(name)
                if old != value:
                    raise ValueError(f"--resume keeps the run's settings; {section}.{name} is "
                                     f"{old!r} in {run_dir}, not {value!r} (only the stopping "
                                     f"rule, threads and device may change)")
    return saved.with_overrides(overrides, resolve=False), int(state["step"])


def _resumable(section: str, name: str) -> bool:
    """Whether ``--resume`` may change the setting, as its declaration says."""
    decl = declaration(next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name))
    return decl is not None and decl.resume


def train_autoencoder(config: AutoencoderRunConfig, run_dir: str | os.PathLike, *,
                      resume: bool = False, progress: bool = True) -> AutoencoderResult:
    """Train (or continue) the autoencoder run in ``run_dir``; torch's threads and global random
    state are as they were when it returns."""
    run_dir = Path(run_dir)
    config = config if resume else config.resolved()
    with torch_state_kept(), contextlib.ExitStack() as hold:
        check_autoencoder_run(config, run_dir, resume=resume)
        return _train(config, run_dir, hold, resume=resume, progress=progress)


def _build(config: AutoencoderRunConfig, device: torch.device, progress: bool,
           ) -> tuple[AutoencoderState, ImageData | StreamingImages]:
    """Seed, network, AdamW, data stream and the posterior's noise generator, in a fixed order."""
    tc = config.train
    torch.manual_seed(tc.seed)
    model = Autoencoder(config.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                  weight_decay=tc.weight_decay,
                                  fused=(device.type in ("cpu", "cuda")) or None)
    data = open_dataset(config.data, progress=progress)
    stream = BatchStream(data, tc.batch_size, hflip=bool(config.data.hflip),
                         generator=torch.Generator().manual_seed(tc.seed),
                         crop_size=config.data.image_size if config.data.crop == "random" else None,
                         workers=config.data.workers)
    noise = torch.Generator(device).manual_seed(tc.seed + 1)
    critic = None
    if config.loss.disc_weight:  # made after the rest, so a run without one draws as before
        m = config.model
        disc = PatchDiscriminator(m.in_channels, m.base_channels, m.norm_groups).to(device)
        critic = Critic(disc, torch.optim.AdamW(disc.parameters(), lr=tc.lr, betas=(0.5, 0.9)))
    return AutoencoderState(config, model, optimizer, stream, noise, critic), data


def _train(config: AutoencoderRunConfig, run_dir: Path, hold: contextlib.ExitStack, *,
           resume: bool, progress: bool) -> AutoencoderResult:
    tc = config.train
    device = resolve_device(tc.device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    precision, why = training_precision(tc.precision, device, _probe(config, device))
    state, data = _build(config, device, progress)
    hold.enter_context(run_lock(run_dir))
    remove_partial_writes(run_dir)
    if resume:
        path, saved = load_run_or_file(run_dir, map_location=device)
        state.load_state_dict(saved, path)
        if tc.steps is not None and state.step >= tc.steps:
            return AutoencoderResult(run_dir, state.step, path, state.elapsed_s, float("nan"),
                                     float(saved["scale_factor"]), {})
    else:
        atomic_write_bytes(json.dumps(config.to_dict(), indent=2).encode(), run_dir / CONFIG_FILE)
    log = Loggers(run_dir, config, state.step if resume else None, SideOutputs())
    hold.callback(log.close)  # closed however the run ends
    grid_images = images_at(data, torch.arange(min(GRID_IMAGES, len(data))))
    features = None
    if config.loss.perceptual_weight:  # the packaged classifier's features (validate checked it)
        classifier = load_classifier(config.data.dataset).model.to(device).eval().requires_grad_(False)
        features = classifier.features
    if progress:
        tqdm.write(f"precision: {precision} ({why})")
    bar = tqdm(total=tc.steps, initial=state.step, disable=not progress, unit="step",
               desc="autoencoder", dynamic_ncols=True)
    start, loss = time.perf_counter(), float("nan")
    state.clock = time.perf_counter()
    with bar, StopRequest() as signals:
        while True:
            fraction = (time.perf_counter() - start) / (60 * tc.minutes) if tc.minutes else None
            if (tc.steps is not None and state.step >= tc.steps) or (fraction or 0) >= 1 \
                    or signals.signum is not None:
                break
            lr = learning_rate(config, state.step, fraction)
            stats = _step(state, precision, device, lr, features)
            state.step += 1
            bar.update(1)
            loss = stats["loss"]
            if state.step % tc.log_every == 0 or state.step == 1:
                log.log(state.step, {**stats, "lr": lr, "elapsed_s": state.elapsed_s})
            if tc.sample_every and state.step % tc.sample_every == 0:
                _save_grid(state.model, grid_images, run_dir, state.step)
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                _checkpoint(state, data, run_dir)
        path, scale = _checkpoint(state, data, run_dir)
        scores = {} if signals.signum is not None else _scores(state.model, config)
        if scores:
            log.log(state.step, {**{f"test_{k}": v for k, v in scores.items()},
                                 "elapsed_s": state.elapsed_s})  # the training's whole time
            _save_grid(state.model, grid_images, run_dir, state.step)
    return AutoencoderResult(run_dir, state.step, path, state.elapsed_s, loss, scale, scores,
                             signals.signum)


def _step(state: AutoencoderState, precision: str, device: torch.device, lr: float,
          features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """One AdamW update on one batch, the gradient clipped, then (from ``disc_start``) one of
    the discriminator; the loss's parts as floats."""
    x, _ = state.stream.next()
    x = x.to(device, non_blocking=True)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    lc, critic = state.config.loss, state.critic
    judged = critic is not None and state.step >= lc.disc_start
    with autocast(device, precision):
        loss, parts = autoencoder_loss(state.model, x, lc, state.noise_generator,
                                       features=features,
                                       discriminator=critic.model if judged and critic else None)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.config.train.grad_clip)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"the autoencoder's loss is {value} at step "
                                 f"{state.step + 1}; nothing was saved over the checkpoints; "
                                 f"try a lower --lr")
    state.optimizer.step()
    stats = {"loss": value, "grad_norm": float(grad_norm),
             **{k: float(v) for k, v in parts.items() if k != "x_hat"}}
    if judged and critic is not None:  # then the discriminator, on the same batch
        for group in critic.optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, precision):
            d_loss = discriminator_loss(critic.model, x, parts["x_hat"])
        critic.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(critic.model.parameters(), state.config.train.grad_clip)
        critic.optimizer.step()
        stats["d_loss"] = float(d_loss.detach())
    return stats


def _checkpoint(state: AutoencoderState, data: ImageData | StreamingImages,
                run_dir: Path) -> tuple[Path, float]:
    """The scale factor of the weights now, and the checkpoint that holds both."""
    state.model.eval()
    scale = latent_scale(state.model, data, state.config.train.seed)
    state.model.train()
    path = save_checkpoint(state.state_dict(scale), run_dir, keep=state.config.train.keep_checkpoints)
    return path, scale


def _save_grid(model: Autoencoder, images: torch.Tensor, run_dir: Path, step: int) -> None:
    """Originals above, their reconstructions below."""
    model.eval()
    both = torch.cat([images, reconstruct(model, images)])
    model.train()
    save_grid(to_model_range(both), run_dir / SAMPLES_DIR / f"recon-{step:08d}.png", nrow=len(images))


def _scores(model: Autoencoder, config: AutoencoderRunConfig) -> dict[str, float]:
    """PSNR and rFID of the reconstructions of test images (``reconstruction_scores``)."""
    model.eval()
    try:
        return reconstruction_scores(model, config.data)
    finally:
        model.train()


def _probe(config: AutoencoderRunConfig, device: torch.device) -> PrecisionProbe:
    """``--precision auto`` on a CPU with bf16: this autoencoder's update timed in fp32 and bf16
    (``autoprecision``), once per machine and shape."""
    tc, m = config.train, config.model

    def make_step(precision: str) -> Callable[[], Any]:
        model = Autoencoder(m).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr)
        x = torch.randn(tc.batch_size, m.in_channels, m.image_size, m.image_size, device=device)

        def step() -> None:
            with autocast(device, precision):
                loss, _ = autoencoder_loss(model, x, config.loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    def probe() -> tuple[str, str]:
        with torch_state_kept():
            shape = {"autoencoder": config.to_dict()["model"], "batch": tc.batch_size}
            found = choose("train-autoencoder", shape, make_step,
                           cache_dir=config.data.cache_dir or default_cache_dir())
        return found.precision, found.why()

    return probe


