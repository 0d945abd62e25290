"""Samplers: pure functions that walk an explicit, descending array of timesteps.

A sampler takes a denoiser ``(x_t [B, C, H, W], t [B]) -> eps_pred``, the frozen schedule, the
starting noise ``x_T`` and the timesteps at which to evaluate the network, e.g. ``[999, ..., 0]``.
It keeps no state between calls; all randomness comes from the ``generator`` passed in.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .diffusion import Denoiser
from .schedules import NoiseSchedule

VARIANCES = ("posterior", "beta")
SPACINGS = ("linspace",)

# callback(step_index, t, x_t, x0_pred): called once per network evaluation, before the update.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def make_timesteps(
    num_train_timesteps: int, num_sample_steps: int, spacing: str = "linspace"
) -> list[int]:
    """The descending steps a sampler evaluates the network at, ``num_sample_steps`` of them.

    ``linspace`` spreads them evenly over 0 .. T-1 (always including T-1 and 0).
    """
    if not 1 <= num_sample_steps <= num_train_timesteps:
        raise ValueError(
            f"the number of sampling steps must be between 1 and the {num_train_timesteps} "
            f"training timesteps, got {num_sample_steps}"
        )
    if spacing != "linspace":
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if num_sample_steps == 1:
        return [num_train_timesteps - 1]
    step = (num_train_timesteps - 1) / (num_sample_steps - 1)
    return [round(i * step) for i in range(num_sample_steps - 1, -1, -1)]


def _check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty; pass at least one step, e.g. [T - 1, ..., 0]")
    if any(a <= b for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:8]}...")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(
            f"timesteps must lie in 0..{num_train_timesteps - 1}, got {ts[0]}..{ts[-1]}"
        )
    return ts


@torch.no_grad()
def ancestral_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    variance: str = "posterior",
    clip_x0: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over any descending sub-sequence of steps.

    For a sub-sequence the betas are recomputed from alpha_bar between consecutive steps
    (respacing, Nichol & Dhariwal 2021, section 4); with every step 0..T-1 they are the schedule's.
    ``variance`` is sigma_t^2 = beta_t or the posterior beta-tilde_t (the paper's two choices).
    ``clip_x0`` clips the predicted x0 to [-1, 1] before forming the posterior mean.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    ts = _check_timesteps(timesteps, schedule.num_train_timesteps)
    alpha_bar = schedule.alphas_cumprod.tolist()
    noise_device = generator.device if generator is not None else x_T.device
    x_t = x_T
    batch = x_T.shape[0]
    # -1 stands for t = 0 of the paper, the data, where alpha_bar = 1.
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1])):
        alpha_bar_t = alpha_bar[t]
        alpha_bar_prev = alpha_bar[t_prev] if t_prev >= 0 else 1.0
        beta_t = 1.0 - alpha_bar_t / alpha_bar_prev  # respaced beta between t_prev and t

        t_batch = torch.full((batch,), t, dtype=torch.long, device=x_t.device)
        eps_pred = denoiser(x_t, t_batch).to(x_t.dtype)
        # Eq. 4 inverted: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).
        x0_pred = (x_t - math.sqrt(1.0 - alpha_bar_t) * eps_pred) / math.sqrt(alpha_bar_t)
        if clip_x0:
            x0_pred = x0_pred.clamp(-1.0, 1.0)
        if callback is not None:
            callback(i, t, x_t, x0_pred)

        # Eq. 7: mu-tilde = sqrt(alpha_bar_prev) beta / (1 - alpha_bar) x0
        #                   + sqrt(1 - beta) (1 - alpha_bar_prev) / (1 - alpha_bar) x_t.
        coef_x0 = math.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t)
        coef_xt = math.sqrt(1.0 - beta_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        mean = coef_x0 * x0_pred + coef_xt * x_t
        if t_prev < 0:
            x_t = mean  # Algorithm 2, line 4: no noise on the last step
            break
        if variance == "posterior":
            sigma2 = beta_t * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)  # beta-tilde, eq. 7
        else:
            sigma2 = beta_t
        z = torch.randn(x_t.shape, generator=generator, device=noise_device, dtype=x_t.dtype)
        # Algorithm 2, line 4: x_{t-1} = mu + sigma_t z.
        x_t = mean + math.sqrt(sigma2) * z.to(x_t.device)
    return x_t


def initial_noise(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` ``[B, C, H, W]``, drawn from ``generator`` and moved to ``device``."""
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)
