"""Cascades (Ho et al. 2021): a base model's samples super-resolved by one super-resolution model
after another (``superres.py``), each stage with its own run's sampler and steps.

    from ddpm.cascade import load_cascade, upscale
    chain = load_cascade("runs/base14", ["runs/sr28"])
    images = chain.generate(16, seed=0)             # [16, 1, 28, 28] in [-1, 1]
    bigger = upscale(load_pipeline("runs/sr28"), my_14px_images)   # a user's own images

A stage must take what the stage before it makes: its low-res side, its channels and, when it
is class-conditional, the same classes; :func:`check_stage` says in one line which does not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import to_model_range, to_uint8
from .pipeline import Pipeline, load_pipeline


def check_stage(before: Pipeline, stage: Pipeline, name: str = "the stage") -> None:
    """ValueError (one line) when ``stage`` cannot super-resolve what ``before`` makes."""
    c, h, _ = before.image_shape
    if stage.low_res is None:
        raise ValueError(f"{name} is not a super-resolution model (it generates from noise "
                         f"alone); a cascade's later stages are runs of 'ddpm train --super-res LOW'")
    sc, _, _ = stage.image_shape
    if (sc, stage.low_res) != (c, h):
        raise ValueError(f"{name} super-resolves {sc}x{stage.low_res}x{stage.low_res} images, and "
                         f"the stage before it makes {c}x{h}x{h}")
    if stage.num_classes and tuple(stage.classes) != tuple(before.classes):
        had = f"classes {', '.join(before.classes)}" if before.classes else "no classes"
        raise ValueError(f"{name} is conditioned on the classes {', '.join(stage.classes)}, and "
                         f"the stage before it has {had}; chain stages trained on the same labels")


@dataclass
class Cascade:
    """A base pipeline and the super-resolution pipelines after it, checked to fit."""

    base: Pipeline
    stages: list[Pipeline]

    def __post_init__(self) -> None:
        before = self.base
        for i, stage in enumerate(self.stages):
            check_stage(before, stage, f"stage {i + 1}")
            before = stage

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.stages[-1] if self.stages else self.base).image_shape

    def generate(self, n: int, *, seed: int = 0, batch_size: int = 128,
                 labels: torch.Tensor | Sequence[int] | int | None = None, progress: bool = False,
                 stage_steps: int | None = None, stage_sampler: str | None = None,
                 keep: bool = False, workers: int | str = 1,
                 **settings: Any) -> torch.Tensor | list[torch.Tensor]:
        """``n`` images of the last stage ``[n, C, H, W]`` in [-1, 1] (with ``keep``, the images of
        every stage, base first). ``settings`` and ``labels`` are the base's; each stage samples
        with its own run's settings (``stage_sampler`` and ``stage_steps`` over them) and seed
        ``seed + k`` for stage k, and a class-conditional stage is given the base's labels. Each
        stage is given the 8-bit images of the one before, as if saved and read back, so that a
        chain computes what ``ddpm sample`` then ``ddpm upscale`` do. Every stage samples its
        batches in ``workers`` processes (``Pipeline.generate``)."""
        labels = self.base.class_labels(n, labels)
        images = [self.base.generate(n, seed=seed, batch_size=batch_size, labels=labels,
                                     progress=progress, workers=workers, **settings)]
        for k, stage in enumerate(self.stages, start=1):
            images.append(upscale(stage, to_uint8(images[-1]), seed=seed + k, batch_size=batch_size,
                                  labels=labels if stage.num_classes else None,
                                  progress=progress, workers=workers,
                                  **stage_settings(stage_steps, stage_sampler)))
        return images if keep else images[-1]


def stage_settings(steps: int | None, sampler: str | None) -> dict[str, Any]:
    """The sampling settings given for every stage, over each stage's own (None: its own)."""
    return {name: value for name, value in (("num_sample_steps", steps), ("sampler", sampler))
            if value is not None}


def upscale(stage: Pipeline, images: torch.Tensor, *, seed: int = 0, batch_size: int = 128,
            labels: torch.Tensor | None = None, progress: bool = False, workers: int | str = 1,
            **settings: Any) -> torch.Tensor:
    """``images`` (float in [-1, 1], or uint8) super-resolved by the super-resolution pipeline
    ``stage``: ``[n, C, H, W]`` in [-1, 1]."""
    low = to_model_range(images) if images.dtype == torch.uint8 else images
    return stage.generate(len(low), seed=seed, batch_size=batch_size, labels=labels,
                          progress=progress, low_res=low, workers=workers, **settings)


def load_cascade(base: str | os.PathLike, stages: Sequence[str | os.PathLike], *,
                 device: str = "auto", use_ema: bool = True, precision: str = "fp32") -> Cascade:
    """The runs (or checkpoints) of a cascade, loaded and checked stage by stage."""
    pipes = [load_pipeline(path, device=device, use_ema=use_ema, precision=precision)
             for path in (base, *stages)]
    return Cascade(pipes[0], pipes[1:])
