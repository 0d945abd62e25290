"""The forward process, its posterior and the training loss (Ho et al. 2020).

All functions are pure: the schedule and any randomness come in as arguments. Shapes: ``x0``,
``x_t`` and ``eps`` are ``[B, C, H, W]``; ``t`` is int64 ``[B]`` in ``0 .. T-1``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule, extract

LOSSES = ("mse", "l1", "huber")

# A denoiser maps (x_t [B, C, H, W], t [B]) to the predicted noise eps [B, C, H, W].
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Sample q(x_t | x0) in closed form."""
    # Eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps
    )


def q_posterior(
    schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0); the variance is ``[B, 1, 1, 1]``."""
    # Eq. 7: mu-tilde_t = coef1 x0 + coef2 x_t, beta-tilde_t.
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t) * x_t
    )
    variance = extract(schedule.posterior_variance, t, x_t)
    return mean, variance


def predict_x0_from_eps(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Invert eq. 4 for x0: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def _elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if loss == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss == "huber":
        return F.smooth_l1_loss(pred, target, reduction="none")
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def training_loss(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    loss: str = "mse",
) -> torch.Tensor:
    """The simplified objective L_simple (Algorithm 1), a scalar averaged over the batch.

    t ~ Uniform{0..T-1}, eps ~ N(0, I), loss(eps, eps_theta(x_t, t)) with x_t from eq. 4.
    """
    # Draw on the generator's device so a run is reproducible from the generator alone.
    device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    t, eps = t.to(x0.device), eps.to(x0.device)
    x_t = q_sample(schedule, x0, t, eps)
    eps_pred = denoiser(x_t, t)
    # Eq. 14: || eps - eps_theta(sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, t) ||^2.
    return _elementwise_loss(eps_pred.float(), eps, loss).mean()
