"""Load a trained model from a checkpoint and generate images with it, in batches.

This is the small Python API behind ``ddpm sample``::

    from ddpm.pipeline import load_pipeline
    pipe = load_pipeline("runs/demo")          # a run directory or a .pt checkpoint
    images = pipe.generate(16, seed=0)         # [16, 1, 28, 28] in [-1, 1], the run's sampler
    fast = pipe.generate(16, sampler="dpm++", num_sample_steps=20)
    shoes = pipe.generate(8, labels=7, guidance=3.0)  # a class-conditional run: class 7, w = 3
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import checkpoint_config, load_run_or_file, load_weights
from .config import RunConfig, SampleConfig
from .data import to_uint8
from .models import UNet
from .runtime import autocast, resolve_device, resolve_precision, warn_compile_failed
from .samplers import (DEFAULT_SPACING, StepCallback, classifier_free_guidance, clip_x0,
                       dynamic_threshold, get_sampler, initial_noise, make_timesteps)
from .schedules import NoiseSchedule, make_schedule


@dataclass
class Pipeline:
    """A trained denoiser (the EMA weights by default) with its schedule and config."""

    model: UNet
    schedule: NoiseSchedule
    config: RunConfig
    step: int
    device: torch.device
    precision: str = "fp32"
    classes: tuple[str, ...] = ()  # the training data's class names, label i = classes[i]
    compiled: Any = None  # torch.compile(model), when asked for and compiling works
    compile_proven: bool = False  # a call through ``compiled`` has succeeded

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model; 0 for an unconditional one."""
        return self.config.model.num_classes

    def class_labels(self, n: int, labels: torch.Tensor | Sequence[int] | int | None) -> torch.Tensor | None:
        """The label of each of ``n`` images: ``labels`` as given (one int for all), or for a
        conditional model without them every class in turn (0, 1, ..., K-1, 0, ...); None for an
        unconditional model. Raises ValueError for labels this model cannot take."""
        k = self.num_classes
        if k == 0:
            if labels is not None:
                raise ValueError("this model was trained without class labels, so it cannot draw "
                                 "a chosen class; drop --class, or train one with --conditional")
            return None
        if labels is None:
            return torch.arange(n) % k
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        y = y.expand(n).clone() if y.numel() == 1 else y
        if y.numel() != n:
            raise ValueError(f"got {y.numel()} labels for {n} images; give one label or one per image")
        bad = y[(y < 0) | (y >= k)]
        if bad.numel():
            raise ValueError(f"class {int(bad[0])} is out of range: this model knows classes "
                             f"0..{k - 1}{_names_hint(self.classes)}")
        return y

    def sample_config(self, **settings: Any) -> SampleConfig:
        """The run's :class:`SampleConfig` with ``settings`` over it, checked against this model
        (steps within its T, guidance only when it has classes): ValueError otherwise."""
        sc = replace(self.config.sample, **settings)
        sc.validate(num_train_timesteps=self.schedule.num_train_timesteps,
                    num_classes=self.num_classes)
        return sc

    @torch.inference_mode()
    def generate(
        self,
        n: int,
        *,
        seed: int = 0,
        batch_size: int = 128,
        labels: torch.Tensor | Sequence[int] | int | None = None,
        callback: StepCallback | None = None,
        progress: bool = False,
        **settings: Any,
    ) -> torch.Tensor:
        """Generate ``n`` images ``[n, C, H, W]`` in [-1, 1].

        ``settings`` override the run's :class:`SampleConfig` (``sampler``, ``num_sample_steps``,
        ``spacing``, ``eta``, ``variance``, ``x0_transform``, ``guidance``). The same ``seed`` and
        ``batch_size`` give the same images: all noise comes from one generator seeded with
        ``seed``, drawn batch after batch. A class-conditional model draws class ``labels``
        (see :meth:`class_labels`) with classifier-free guidance of scale ``guidance``.
        """
        sc = self.sample_config(**settings)
        labels = self.class_labels(n, labels)
        sampler = get_sampler(sc.sampler)
        timesteps = make_timesteps(self.schedule.num_train_timesteps, sc.num_sample_steps,
                                   sc.spacing or DEFAULT_SPACING[sc.sampler], schedule=self.schedule)
        options = {"ddpm": {"variance": sc.variance}, "ddim": {"eta": sc.eta}}.get(sc.sampler, {})
        x0_transform = X0_TRANSFORMS[sc.x0_transform]
        generator = torch.Generator("cpu").manual_seed(seed)
        mc = self.config.model
        out = []
        evaluations = 2 * len(timesteps) - 1 if sc.sampler == "heun" else len(timesteps)
        if labels is not None and sc.guidance > 0:
            evaluations *= 2  # conditional and unconditional, as one batch
        bar = tqdm(total=n * evaluations, unit="img-eval", unit_scale=True, disable=not progress,
                   desc=f"sampling ({sc.sampler}, {sc.num_sample_steps} steps)")

        def network(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            with autocast(self.device, self.precision):
                prediction = self._forward(x_t, t, y)
            bar.update(x_t.shape[0])
            return prediction.float()

        self.model.eval()
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x_T = initial_noise((b, mc.in_channels, mc.image_size, mc.image_size), generator, self.device)
            denoiser = network if labels is None else classifier_free_guidance(
                network, labels[start : start + b], self.config.model.num_classes, sc.guidance)
            out.append(
                sampler(
                    denoiser, self.schedule, x_T, timesteps,
                    prediction_type=self.config.diffusion.prediction_type,
                    x0_transform=x0_transform, generator=generator, callback=callback, **options,
                ).cpu()
            )
        bar.close()
        return torch.cat(out)

    def compile(self) -> "Pipeline":
        """Sample through ``torch.compile(model)``; if compiling fails at the first call, the
        uncompiled network goes on, with a one-line warning."""
        self.compiled, self.compile_proven = torch.compile(self.model), False
        return self

    def _forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.compiled is None:
            return self.model(x_t, t, y)
        if self.compile_proven:  # a later failure is not compiling's: it is raised
            return self.compiled(x_t, t, y)
        try:
            prediction = self.compiled(x_t, t, y)
        except Exception as exc:  # a failure to compile: the first call compiles
            warn_compile_failed(exc, "sampling")
            self.compiled = None
            return self.model(x_t, t, y)
        self.compile_proven = True
        return prediction

    @torch.inference_mode()
    def trace(
        self, n: int, *, seed: int = 0, labels: torch.Tensor | Sequence[int] | int | None = None,
        progress: bool = False, **settings: Any
    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """The whole reverse process of ``n`` images, as ``generate(n, seed=seed, batch_size=n,
        labels=labels, **settings)`` walks it: ``states`` uint8 ``[S + 1, n, C, H, W]`` holds x_T, the x_t the
        network sees at each of the S steps, and last the output; ``x0_preds`` (same shape) the
        predicted x0 at each step, and last the output again; ``timesteps`` the S steps."""
        states, x0_preds, timesteps = [], [], []

        def record(i: int, t: float, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
            states.append(to_uint8(x_t.cpu()))
            x0_preds.append(to_uint8(x0_pred.cpu()))
            timesteps.append(float(t))

        final = to_uint8(self.generate(n, seed=seed, batch_size=n, labels=labels, callback=record,
                                       progress=progress, **settings))
        return torch.stack(states + [final]), torch.stack(x0_preds + [final]), timesteps


def _names_hint(classes: Sequence[str]) -> str:
    if not classes:
        return ""
    shown = ", ".join(f"{i} {name}" for i, name in enumerate(classes[:12]))
    return f" ({shown}{', ...' if len(classes) > 12 else ''})"


# What each x0_transform setting does to every predicted x0 (config.X0_TRANSFORMS names them).
X0_TRANSFORMS = {"clip": clip_x0, "dynamic": dynamic_threshold, "none": None}


def build_schedule(config: RunConfig) -> NoiseSchedule:
    d = config.diffusion
    return make_schedule(d.schedule, d.num_train_timesteps, zero_terminal_snr=d.zero_terminal_snr)


def load_pipeline(
    run_or_checkpoint: str | os.PathLike,
    *,
    device: str = "auto",
    use_ema: bool = True,
    precision: str = "fp32",
    compile: bool = False,
) -> Pipeline:
    """Load the newest checkpoint of a run directory, or the given checkpoint file; sample in
    ``precision`` (autocast: fp32, bf16, fp16 on CUDA, or auto) and, with ``compile``, through
    ``torch.compile``."""
    dev = resolve_device(device)
    resolve_precision(precision, dev)  # an unknown name, or fp16 on a CPU, said now
    path, state = load_run_or_file(run_or_checkpoint)
    config = checkpoint_config(state, path)
    model = UNet(config.model)
    load_weights(model, state, path, ema=use_ema)
    model.to(dev).eval().requires_grad_(False)
    pipe = Pipeline(model, build_schedule(config), config, int(state["step"]), dev, precision,
                    classes=tuple(state.get("classes", ())))
    return pipe.compile() if compile else pipe
