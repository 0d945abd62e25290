"""Data whose optimal denoiser is known in closed form: the yardstick for samplers.

For data x0 ~ N(mu, s^2 I), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is Gaussian and the optimal
epsilon-predictor is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). For a
mixture, it is the responsibility-weighted sum of the components' predictors. Both accept real-
valued t (through the schedule's log-SNR interpolation), so the ODE samplers can use them too.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .diffusion import Denoiser, training_target
from .schedules import NoiseSchedule, broadcast_per_sample


def _alpha_bar_per_sample(
    schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """alpha_bar at the real-valued steps ``t`` ``[B]`` as ``[B, 1, 1, 1]`` in ``like``'s dtype."""
    return broadcast_per_sample(schedule.alpha_bar_at(t.double().cpu()), like)


def gaussian_denoiser(
    schedule: NoiseSchedule, mu: float, s: float, prediction_type: str = "eps"
) -> Denoiser:
    """The optimal predictor of eps, x0 or v for data N(mu, s^2 I); all three are written without
    dividing by sqrt(alpha_bar), so they hold at zero terminal SNR too."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _alpha_bar_per_sample(schedule, t, x_t)
        residual = (x_t - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)  # x_t's standardised offset
        eps = (1 - ab).sqrt() * residual  # E[eps | x_t]
        x0 = mu + ab.sqrt() * s**2 * residual  # E[x0 | x_t]
        return training_target(prediction_type, x0, eps, ab)

    return denoiser


def mixture_denoiser(
    schedule: NoiseSchedule, weights: Sequence[float], means: Sequence[float], stds: Sequence[float]
) -> Denoiser:
    """The optimal eps-predictor for an image-level mixture: component k draws a whole image from
    N(means[k] 1, stds[k]^2 I) with probability weights[k]."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _alpha_bar_per_sample(schedule, t, x_t)
        dims = x_t[0].numel()
        log_r, preds = [], []
        for w, m, s in zip(weights, means, stds):
            var = ab * s**2 + 1 - ab  # [B, 1, 1, 1]
            diff = x_t - ab.sqrt() * m
            log_r.append(math.log(w) - 0.5 * (diff**2).flatten(1).sum(1) / var.flatten()
                         - 0.5 * dims * var.flatten().log())
            preds.append((1 - ab).sqrt() * diff / var)
        r = torch.softmax(torch.stack(log_r, 1), dim=1)  # [B, K] posterior responsibilities
        return sum(broadcast_per_sample(r[:, k], x_t) * preds[k] for k in range(len(weights)))

    return denoiser
