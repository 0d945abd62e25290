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

# A denoiser maps (x_t [B, C, H, W], t [B]) to its prediction [B, C, H, W] of eps, x0 or v
# (``prediction_type``); eps_x0_from_prediction turns any of them into both eps and x0.
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


PREDICTION_TYPES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min-snr")


def v_from_eps_x0(eps: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Salimans & Ho 2022, sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=eps.dtype, device=eps.device)
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def eps_x0_from_prediction(
    prediction: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output of ``prediction_type`` into both (eps, x0) at x_t.

    ``alpha_bar`` is a float or a tensor broadcasting against ``x_t`` (e.g. ``[B, 1, 1, 1]``).
    Eq. 4 ties them: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; v adds v = sqrt(ab) eps - sqrt(1-ab) x0.
    """
    ab = torch.as_tensor(alpha_bar, dtype=x_t.dtype, device=x_t.device)
    sqrt_ab, sqrt_1m_ab = ab.sqrt(), (1 - ab).sqrt()
    if prediction_type == "eps":
        eps = prediction
        x0 = (x_t - sqrt_1m_ab * eps) / sqrt_ab
    elif prediction_type == "x0":
        x0 = prediction
        eps = (x_t - sqrt_ab * x0) / sqrt_1m_ab
    elif prediction_type == "v":
        # x0 = sqrt(ab) x_t - sqrt(1 - ab) v;  eps = sqrt(1 - ab) x_t + sqrt(ab) v
        x0 = sqrt_ab * x_t - sqrt_1m_ab * prediction
        eps = sqrt_1m_ab * x_t + sqrt_ab * prediction
    else:
        raise ValueError(
            f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
        )
    return eps, x0


def training_target(
    prediction_type: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """What the network learns to output: eps, x0 or v."""
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":
        return v_from_eps_x0(eps, x0, alpha_bar)
    raise ValueError(
        f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
    )


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Hang et al. 2023: weight min(SNR, gamma) on the x0-error, expressed for each target.

    With the eps target the x0-error is scaled by SNR, so the weight is min(SNR, gamma) / SNR;
    with v by SNR + 1, giving min(SNR, gamma) / (SNR + 1).
    """
    clipped = snr.clamp(max=gamma)
    if prediction_type == "eps":
        return clipped / snr
    if prediction_type == "v":
        return clipped / (snr + 1)
    return clipped


def _elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if loss == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss == "huber":
        return F.smooth_l1_loss(pred, target, reduction="none")
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def draw_t_eps(
    schedule: NoiseSchedule, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's draws for a batch of ``shape``: t ~ Uniform{0..T-1} and eps ~ N(0, I), on the
    generator's device, so a run is reproducible from the generator alone."""
    device = generator.device if generator is not None else None
    t = torch.randint(0, schedule.num_train_timesteps, (shape[0],), generator=generator, device=device)
    return t, torch.randn(shape, generator=generator, device=device)


def training_loss(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    loss: str = "mse",
    prediction_type: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The simplified objective L_simple (Algorithm 1), a scalar averaged over the batch.

    t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t from eq. 4, and loss(target, network(x_t, t)) with the
    target eps (eq. 14), x0 or v; ``weighting="min-snr"`` weights each sample by min-SNR-gamma.
    ``t`` and ``eps`` may be given (a process's share of draws made for a whole batch); otherwise
    they are drawn here, from ``generator``.
    """
    if (t is None) != (eps is None):
        raise ValueError("give both t and eps, or neither")
    if t is None:
        t, eps = draw_t_eps(schedule, x0.shape, generator)
    t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
    x_t = q_sample(schedule, x0, t, eps)
    prediction = denoiser(x_t, t)
    alpha_bar = extract(schedule.alphas_cumprod, t, x0)
    target = training_target(prediction_type, x0, eps, alpha_bar)
    # Eq. 14 for eps: || eps - eps_theta(sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, t) ||^2.
    per_sample = _elementwise_loss(prediction.float(), target, loss).flatten(1).mean(1)  # [B]
    if weighting == "min-snr":
        snr = extract(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod), t, x0).flatten()
        per_sample = per_sample * min_snr_weight(snr, min_snr_gamma, prediction_type)
    elif weighting != "uniform":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    return per_sample.mean()
