"""One optimisation step: ``train_step`` (Algorithm 1 of Ho et al. 2020 over a batch, the
gradient clipped, AdamW), the learning-rate schedule, and the EMA of the weights.

A step never waits for the device: its loss and gradient norm stay there (:class:`StepStats`),
and a step with a non-finite loss or gradient is skipped there too, by fused AdamW's
``found_inf`` and an EMA update masked the same way, so that it changes neither the weights, nor
the EMA, nor the optimiser's state. ``train.py`` reads the figures when it logs or saves.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from .config import RunConfig, TrainConfig
from .diffusion import draw_t_eps, precondition, timestep_probs, training_loss
from .runtime import autocast
from .schedules import NoiseSchedule
from .superres import training_conditioning

if TYPE_CHECKING:  # (accelerate is imported where a process is made: runtime.make_accelerator)
    from accelerate import Accelerator


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging), sampled from.

    Its count of updates lives on the model's device, so that an update masked by a skipped
    step (``update(model, mask)``) needs no answer from the device."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        device = next(model.parameters()).device
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def num_updates(self) -> int:
        return int(self._updates)

    def current_decay(self) -> torch.Tensor:
        """The decay of the next update, float64 on the device."""
        # (a fill, not torch.tensor(): a copy from the host would wait for the device)
        decay = torch.full((), self.decay, dtype=torch.float64, device=self._updates.device)
        if not self.warmup:
            return decay
        # Short memory while the weights move fast early on: (1 + n) / (10 + n).
        n = self._updates.double()
        return torch.minimum(decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, mask: torch.Tensor | None = None) -> None:
        """One step towards ``model``'s weights; none where ``mask`` (a bool on the device:
        whether the step updated the weights) is False."""
        weight = 1.0 - self.current_decay()  # float64, rounded to float32 once, as the weights are
        if mask is not None:
            weight = weight * mask
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # ema <- ema + (1 - decay) (param - ema). The weight goes in as tensors (the List
        # overload): a tensor passed as one Scalar would be read on the host, waiting for it.
        torch._foreach_lerp_(ema_params, params, [weight.float()] * len(params))
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b if mask is None else torch.where(mask, b, ema_b))
        self._updates += 1 if mask is None else mask.long()

    def state_dict(self) -> dict[str, Any]:
        """The averaging's own state (the averaged weights are ``self.model.state_dict()``)."""
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._updates.fill_(int(state["num_updates"]))


class TrainedConfig(Protocol):
    """A diffusion or an autoencoder run's config, as the learning rate and the loggers read it."""

    @property
    def train(self) -> TrainConfig: ...
    def to_dict(self) -> dict[str, Any]: ...


def learning_rate(config: TrainedConfig, step: int, time_fraction: float | None = None) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (Ho et al. 2020), or a decay to zero
    that helps short runs end sharper: cosine (Loshchilov & Hutter 2017) or linear (Defazio et
    al. 2023 found it at least as good at a fixed budget). The decay runs over ``steps``, or,
    for a run limited by minutes only, over ``time_fraction`` of the budget."""
    tc = config.train
    lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else tc.lr
    if tc.lr_schedule != "constant" and step >= tc.warmup_steps:
        if tc.steps is not None:
            progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
        elif time_fraction is not None:
            progress = time_fraction
        else:
            raise ValueError(f"the {tc.lr_schedule} learning-rate schedule needs steps, or "
                             "minutes and the fraction of them spent")
        progress = min(1.0, progress)
        if tc.lr_schedule == "cosine":
            lr *= 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            lr *= 1.0 - progress
    return lr


class StepStats(NamedTuple):
    """One step's figures, as tensors on the device: reading one waits for the device, so the
    loop reads them only when it logs or saves."""

    loss: torch.Tensor  # mean over the whole batch (all processes)
    grad_norm: torch.Tensor  # before clipping
    updated: torch.Tensor  # bool: False when the weights were left as they were
    faulty: torch.Tensor  # bool: a non-finite loss (or, without fp16's scaler, gradient)


def train_step(
    model: nn.Module,
    schedule: NoiseSchedule,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    accelerator: Accelerator,
    generator: torch.Generator,
    config: RunConfig,
    device: torch.device,
    lr: float,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> StepStats:
    """One optimiser update over ``batches`` of (images, labels) (whole batches of every process;
    gradient accumulation when more than one). A non-finite loss or gradient leaves the weights
    and the optimiser's state as they were, decided on the device: the step never waits for it.
    Every process sees the same loss and gradients, so all of them skip together.

    Each process draws t and eps (and, for a class-conditional model, which labels to drop) for
    the whole batch from the same generator on the device and keeps its own rows, so N
    processes with B/N images each make the update one process makes with B.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    dc = config.diffusion
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    total = torch.zeros((), device=device)
    num_classes = config.model.num_classes
    t_probs = timestep_probs(schedule, dc.timestep_sampling, log_sigma_mean=dc.log_sigma_mean,
                             log_sigma_std=dc.log_sigma_std)
    for i, (x0, y) in enumerate(batches):
        t, eps = draw_t_eps(schedule, x0.shape, generator, t_probs,
                            continuous=dc.timestep_sampling == "continuous")
        rows = slice(rank * x0.shape[0] // world, (rank + 1) * x0.shape[0] // world)
        denoiser: Callable[..., torch.Tensor] = model
        if num_classes:
            # Ho & Salimans 2022, Algorithm 1, line 3: c <- null with probability p_uncond.
            drop = torch.rand(x0.shape[0], generator=generator, device=generator.device)
            y = torch.where(drop < config.train.class_dropout, num_classes, y.to(drop.device))
            denoiser = functools.partial(model, y=y[rows].to(device))
        if config.superres.low is not None:  # the low-res input, augmented (superres.py)
            c = training_conditioning(config.superres, schedule, x0, generator)
            denoiser = functools.partial(denoiser, cond=c.cond[rows].to(device, memory_format=memory_format),
                                         cond_level=c.cond_level[rows].to(device))
        denoiser = precondition(denoiser, schedule, dc.preconditioning, sigma_data=dc.sigma_data,
                                prediction_type=dc.prediction_type)
        # Gradients are averaged across processes once per update, after the last micro-batch.
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with autocast(device, precision):
                x = x0[rows].to(device, memory_format=memory_format, non_blocking=True)
                loss = training_loss(denoiser, schedule, x, t=t[rows], eps=eps[rows],
                                     loss=dc.loss, prediction_type=dc.prediction_type,
                                     weighting=dc.loss_weighting, min_snr_gamma=dc.min_snr_gamma,
                                     sigma_data=dc.sigma_data,
                                     learn_variance=config.model.learn_variance)
            scaled = loss / len(batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total = total + loss.detach().float() / len(batches)
    if world > 1:  # the loss of the whole batch, for the log and the check below
        total = accelerator.reduce(total.reshape(1), "mean")[0]
    if scaler is not None:
        scaler.unscale_(optimizer)  # the norm and the clip are of the true gradients
    params = [p for p in model.parameters()]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
    updated = torch.isfinite(total) & torch.isfinite(grad_norm)
    if scaler is not None:
        # The scaler skips a step with non-finite gradients itself while lowering the scale,
        # which it must see, so it is called for those steps too; an overflow is routine there,
        # and only a non-finite loss counts as a fault.
        scaler.step(optimizer)
        scaler.update()
        faulty = ~torch.isfinite(total)
    else:
        _step_unless(optimizer, updated)
        faulty = ~updated
    return StepStats(total, grad_norm, updated, faulty)


def _step_unless(optimizer: torch.optim.Optimizer, updated: torch.Tensor) -> None:
    """``optimizer.step()``, a no-op where ``updated`` is False. A fused AdamW takes the answer
    as a tensor (its ``found_inf``, as for fp16's scaler) and skips the whole update on the
    device, its step count included; another optimiser waits for the device to answer."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # an attribute fused AdamW reads but torch.optim.Optimizer does not declare
        optimizer.found_inf = (~updated).float()  # type: ignore[attr-defined]
        optimizer.step()
    elif bool(updated):
        optimizer.step()
