"""The timesteps a sampler walks: explicit, descending arrays over the training steps 0..T-1, by
one of the spacings, and the check every sampler makes of the array it is given."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .schedules import NoiseSchedule

SPACINGS = ("linspace", "leading", "trailing", "karras", "logsnr")


def karras_noise_levels(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0..n-1, descending."""
    if n == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]


def make_timesteps(
    num_train_timesteps: int,
    num_sample_steps: int,
    spacing: str = "linspace",
    *,
    schedule: NoiseSchedule | None = None,
    rho: float = 7.0,
) -> list[float]:
    """The descending steps a sampler evaluates the network at, ``num_sample_steps`` of them.

    - ``linspace``: evenly over 0..T-1, always including T-1 and 0;
    - ``leading``: 0, k, 2k, ... with k = T // n (DDIM's original choice), highest first;
    - ``trailing``: T-1, T-1-T/n, ... (Lin et al. 2024, table 2), never reaching 0 unless n = T;
    - ``karras``: rho-spaced noise levels between the schedule's extremes (needs ``schedule``);
    - ``logsnr``: evenly spaced log-SNR between the schedule's extremes (needs ``schedule``).
    The last two give real-valued steps.
    """
    T, n = num_train_timesteps, num_sample_steps
    if not 1 <= n <= T:
        raise ValueError(
            f"the number of sampling steps must be between 1 and the {T} training timesteps, got {n}"
        )
    if spacing == "linspace":
        if n == 1:
            return [T - 1]
        return [round(i * (T - 1) / (n - 1)) for i in range(n - 1, -1, -1)]
    if spacing == "leading":
        return [i * (T // n) for i in range(n - 1, -1, -1)]
    if spacing == "trailing":
        return [round(T - i * T / n) - 1 for i in range(n)]
    if spacing in ("karras", "logsnr"):
        if schedule is None:
            raise ValueError(f"{spacing} spacing needs the noise schedule to find its noise levels")
        finite = schedule.log_snr[torch.isfinite(schedule.log_snr)]
        lo, hi = finite[-1].item(), finite[0].item()  # zero terminal SNR: the last finite level
        if spacing == "karras":
            if not math.isfinite(schedule.log_snr[-1].item()):
                raise ValueError(
                    "karras spacing (euler, heun) needs a finite largest noise level, but this "
                    "schedule has zero terminal SNR; use --spacing trailing, or the ddim, dpm++ "
                    "or ddpm sampler"
                )
            # Karras' noise level sigma = sqrt((1 - ab) / ab) = exp(-log_snr / 2)
            karras = karras_noise_levels(math.exp(-hi / 2), math.exp(-lo / 2), n, rho)
            noise_levels = torch.tensor(karras, dtype=torch.float64)
            log_snrs = -2 * noise_levels.log()
        else:
            log_snrs = torch.linspace(lo, hi, n, dtype=torch.float64)
        ts = schedule.t_at_log_snr(log_snrs).tolist()
        ts[0] = float(T - 1)  # pin the ends exactly: the inverse interpolation may round
        if n > 1:
            ts[-1] = 0.0
        return ts
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def check_timesteps(timesteps: Sequence[float], num_train_timesteps: int) -> list[float]:
    """``timesteps`` as floats, or ValueError unless they are non-empty, strictly descending and
    within 0..T-1."""
    ts = [float(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty; pass at least one step, e.g. [T - 1, ..., 0]")
    if any(a <= b for a, b in zip(ts[:-1], ts[1:], strict=True)):
        raise ValueError(f"timesteps must be strictly descending, got {ts[:8]}...")
    if ts[0] > num_train_timesteps - 1 or ts[-1] < 0:
        raise ValueError(
            f"timesteps must lie in 0..{num_train_timesteps - 1}, got {ts[0]}..{ts[-1]}"
        )
    return ts
