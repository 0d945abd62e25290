"""Data whose optimal denoiser is known in closed form: the yardstick for samplers.

For data x0 ~ N(mu, s^2 I), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is Gaussian and the optimal
epsilon-predictor is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). For a
mixture, it is the responsibility-weighted sum of the components' predictors. Both accept real-
valued t (through the schedule's log-SNR interpolation), so the ODE samplers can use them too.
The true reverse variance of the Gaussian (what a learned variance should learn) and the exact
classifier of a mixture's components (what classifier guidance needs) are here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

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


def gaussian_reverse_variance(
    schedule: NoiseSchedule, s: float, t: float, t_prev: float
) -> float:
    """Var(x_{t_prev} | x_t) for data N(mu, s^2 I), per element: (x_{t_prev}, x_t) are jointly
    Gaussian with x_t = sqrt(a) x_{t_prev} + sqrt(1 - a) z, a = ab_t / ab_prev, so
    Var = V_prev - a V_prev^2 / V_t with V = ab s^2 + 1 - ab. The mean E[x_{t_prev} | x_t] is the
    posterior mean (eq. 7) at E[x0 | x_t], so a sampler with this variance walks the exact law."""
    ab_t, ab_prev = schedule.alpha_bar_scalar(t), schedule.alpha_bar_scalar(t_prev)
    var_t = ab_t * s**2 + 1 - ab_t
    var_prev = ab_prev * s**2 + 1 - ab_prev
    return var_prev - (ab_t / ab_prev) * var_prev**2 / var_t


def _mixture_posterior(
    schedule: NoiseSchedule, weights: Sequence[float], means: Sequence[float],
    stds: Sequence[float], x_t: torch.Tensor, t: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """For each component k of the mixture at x_t: the responsibilities p(k | x_t) ``[B, K]``, the
    offsets x_t - sqrt(ab) m_k and the variances ab s_k^2 + 1 - ab ``[B, 1, 1, 1]`` of x_t."""
    ab = _alpha_bar_per_sample(schedule, t, x_t)
    dims = x_t[0].numel()
    log_r, diffs, variances = [], [], []
    for w, m, s in zip(weights, means, stds, strict=True):
        var = ab * s**2 + 1 - ab  # [B, 1, 1, 1]
        diff = x_t - ab.sqrt() * m
        log_r.append(math.log(w) - 0.5 * (diff**2).flatten(1).sum(1) / var.flatten()
                     - 0.5 * dims * var.flatten().log())
        diffs.append(diff)
        variances.append(var)
    return torch.softmax(torch.stack(log_r, 1), dim=1), diffs, variances


def mixture_class_grad(
    schedule: NoiseSchedule, weights: Sequence[float], means: Sequence[float],
    stds: Sequence[float], label: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """grad_x log p(y = label | x_t) of :func:`mixture_denoiser`'s mixture, in closed form: with
    responsibilities r_k and component scores g_k = -(x_t - sqrt(ab) m_k) / (ab s_k^2 + 1 - ab),
    it is g_label - sum_k r_k g_k (Bayes' rule, differentiated)."""

    def grad(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r, diffs, variances = _mixture_posterior(schedule, weights, means, stds, x_t, t)
        scores = [-diff / var for diff, var in zip(diffs, variances, strict=True)]
        mean_score = sum(broadcast_per_sample(r[:, k], x_t) * g for k, g in enumerate(scores))
        return scores[label] - mean_score

    return grad


def mixture_denoiser(
    schedule: NoiseSchedule, weights: Sequence[float], means: Sequence[float], stds: Sequence[float]
) -> Denoiser:
    """The optimal eps-predictor for an image-level mixture: component k draws a whole image from
    N(means[k] 1, stds[k]^2 I) with probability weights[k]."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = _alpha_bar_per_sample(schedule, t, x_t)
        r, diffs, variances = _mixture_posterior(schedule, weights, means, stds, x_t, t)
        # E[eps | x_t] = sum_k r_k sqrt(1 - ab) (x_t - sqrt(ab) m_k) / var_k
        eps_pred = sum(broadcast_per_sample(r[:, k], x_t) * (1 - ab).sqrt() * diff / var
                       for k, (diff, var) in enumerate(zip(diffs, variances, strict=True)))
        return cast(torch.Tensor, eps_pred)  # a sum of tensors (typeshed allows sum()'s start, 0)

    return denoiser
