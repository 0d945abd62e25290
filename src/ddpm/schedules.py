"""Beta schedules and the frozen noise schedule every other module reads from.

Notation (Ho et al. 2020): ``beta_t`` is the variance added at step t, ``alpha_t = 1 - beta_t`` and
``alpha_bar_t = prod_{s<=t} alpha_s``. Index ``i`` of every ``[T]`` tensor holds the value at the
paper's time ``t = i + 1``, so ``t`` is an int64 in ``0 .. T-1`` throughout the package.

Everything is computed once in float64 and cast only where it is used, so that products like
``alpha_bar`` (which reach 4e-5 at T = 1000) keep their precision.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")

# Ho et al. 2020, section 4: beta_1 = 1e-4 ... beta_T = 0.02 at T = 1000.
_LINEAR_START = 1e-4
_LINEAR_END = 0.02
# Nichol & Dhariwal 2021, eq. 17: offset s and the clip that avoids a singularity at t = T.
_COSINE_S = 0.008
_MAX_BETA = 0.999


def linear_betas(num_train_timesteps: int) -> torch.Tensor:
    """Ho et al. 2020's linear betas, rescaled by 1000/T so any T spans the same total noise."""
    scale = 1000.0 / num_train_timesteps
    return torch.linspace(
        scale * _LINEAR_START, scale * _LINEAR_END, num_train_timesteps, dtype=torch.float64
    )


def quadratic_betas(num_train_timesteps: int) -> torch.Tensor:
    """Betas whose square roots are linear between the linear schedule's endpoints."""
    scale = 1000.0 / num_train_timesteps
    root = torch.linspace(
        math.sqrt(scale * _LINEAR_START),
        math.sqrt(scale * _LINEAR_END),
        num_train_timesteps,
        dtype=torch.float64,
    )
    return root**2


def _betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) from a ``[T+1]`` alpha_bar on 0..T, clipped."""
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=_MAX_BETA)


def cosine_alpha_bar(u: torch.Tensor, s: float = _COSINE_S) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(u) = f(u) / f(0), f(u) = cos^2((u + s)/(1 + s) pi/2).

    ``u = t / T`` in [0, 1].
    """
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(num_train_timesteps: int) -> torch.Tensor:
    u = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return _betas_from_alpha_bar(cosine_alpha_bar(u))


def sigmoid_betas(
    num_train_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """Sigmoid alpha_bar schedule (Jabri et al. 2022, as in denoising-diffusion-pytorch).

    alpha_bar(u) falls from 1 to 0 along a sigmoid over [start, end]; suits images above 64 px.
    """
    u = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(alpha_bar)


_BETA_FUNCTIONS = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "quadratic": quadratic_betas,
}


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Every quantity of the forward process and posterior, ``[T]`` float64 tensors on the CPU.

    Build it with :func:`make_schedule`; read values at a batch of steps with :func:`extract`,
    at real-valued steps with :meth:`alpha_bar_at`, and at one step with :meth:`alpha_bar_scalar`.
    The dataclass is frozen and nothing in the package writes to its tensors.
    """

    name: str
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor  # alpha_bar_t
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{t-1}, with alpha_bar_0 = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta-tilde_t, eq. 7
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # multiplies x0 in eq. 7
    posterior_mean_coef2: torch.Tensor  # multiplies x_t in eq. 7
    log_snr: torch.Tensor  # log(alpha_bar / (1 - alpha_bar))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with its tensors on ``device``, still float64: training reads values
        at a batch of steps drawn on the device (:func:`extract`) without a round trip to the
        host. The samplers keep the CPU schedule, whose values they read as Python floats."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    def alpha_bar_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """alpha_bar at real-valued t in [0, T-1], float64: log-SNR is interpolated linearly
        between the integer steps, so ODE samplers can visit any noise level in between."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t - lo
        log_snr = (1 - frac) * self.log_snr[lo] + frac * self.log_snr[hi]
        # at integer t take the value itself (0 * -inf would be nan under zero terminal SNR)
        log_snr = torch.where(frac == 0, self.log_snr[lo], log_snr)
        return torch.sigmoid(log_snr)

    def alpha_bar_scalar(self, t: float) -> float:
        """alpha_bar at one step ``t`` as a Python float, for the samplers' scalar arithmetic: the
        table's value at integer t, :meth:`alpha_bar_at` between integers, and 1 for t < 0 (the
        samplers' t = -1 after their last step: the paper's t = 0, the data itself)."""
        if t < 0:
            return 1.0
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        return float(self.alpha_bar_at(t))

    def sigma_scalar(self, t: float) -> float:
        """The noise level at one step ``t`` as a Python float: sigma = sqrt((1 - alpha_bar) /
        alpha_bar), that of x_t / sqrt(alpha_bar) = x0 + sigma eps (EDM's and the score SDEs'
        variable)."""
        alpha_bar = self.alpha_bar_scalar(t)
        return math.sqrt((1 - alpha_bar) / alpha_bar)

    def t_at_log_snr(self, log_snr: torch.Tensor | float) -> torch.Tensor:
        """The real-valued t whose interpolated log-SNR is ``log_snr`` (inverse of
        :meth:`alpha_bar_at` in log-SNR terms), clamped to [0, T-1]."""
        target = torch.as_tensor(log_snr, dtype=torch.float64)
        descending = self.log_snr  # falls strictly with t
        ascending = descending.flip(0)
        idx = torch.searchsorted(ascending, target).clamp(1, self.num_train_timesteps - 1)
        # ascending[idx-1] <= target < ascending[idx]; map back to t (t = T-1 - index)
        hi_val, lo_val = ascending[idx], ascending[idx - 1]
        frac = ((target - lo_val) / (hi_val - lo_val)).clamp(0, 1)
        t_of_lo = self.num_train_timesteps - 1 - (idx - 1)
        return (t_of_lo - frac).clamp(0, self.num_train_timesteps - 1)


def ve_schedule(num_train_timesteps: int, sigma_min: float, sigma_max: float) -> NoiseSchedule:
    """The variance-exploding process of NCSN (Song & Ermon 2019; Song et al. 2021's VE SDE) as
    a schedule: noise levels sigma_i = sigma_min (sigma_max / sigma_min)^(i / (T - 1)), geometric
    from ``sigma_min`` to ``sigma_max``, each written in DDPM's variables. x = x0 + sigma eps is
    x_t = x / sqrt(1 + sigma^2) = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps with alpha_bar =
    1 / (1 + sigma^2), so the samplers, the loss and the network's input are those of any other
    schedule. Log-SNR = -2 ln sigma is linear in i, so :meth:`NoiseSchedule.alpha_bar_at` between
    the steps is the continuous geometric sigma exactly."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"the VE noise levels need 0 < sigma_min < sigma_max, got sigma_min = "
                         f"{sigma_min:g} and sigma_max = {sigma_max:g}")
    u = torch.linspace(0, 1, num_train_timesteps, dtype=torch.float64)
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    alpha_bar = 1.0 / (1.0 + sigma**2)
    # beta_i = 1 - alpha_bar_i / alpha_bar_{i-1}, with alpha_bar_{-1} = 1 (the data itself)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    return schedule_from_betas("ve", 1.0 - alpha_bar / previous)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that it keeps its first
    value and reaches exactly 0 at t = T (zero terminal SNR: the last step is pure noise)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """The betas whose alpha_bar is :func:`rescale_zero_terminal_snr` of ``betas``' (the last
    beta becomes 1: x_T is pure noise)."""
    alpha_bar = rescale_zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
    return 1.0 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])


def make_schedule(
    name: str = "linear", num_train_timesteps: int = 1000, *, zero_terminal_snr: bool = False
) -> NoiseSchedule:
    """Build the frozen float64 schedule ``name`` with ``num_train_timesteps`` steps, optionally
    rescaled to zero terminal SNR (then the network must predict v or x0, not eps)."""
    if name not in _BETA_FUNCTIONS:
        raise ValueError(
            f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}"
        )
    if num_train_timesteps < 2:
        raise ValueError(
            f"num_train_timesteps must be at least 2, got {num_train_timesteps}"
        )
    betas = _BETA_FUNCTIONS[name](num_train_timesteps)
    if betas.max() >= 1.0:  # the 1000/T rescaling of linear and quadratic overshoots at small T
        raise ValueError(
            f"the {name} schedule at T = {num_train_timesteps} has betas up to "
            f"{betas.max().item():.3g}, but each must be below 1; use more timesteps (T >= 21) "
            f"or the cosine or sigmoid schedule"
        )
    if zero_terminal_snr:
        betas = zero_terminal_snr_betas(betas)
    return schedule_from_betas(name, betas)


def schedule_from_betas(name: str, betas: torch.Tensor) -> NoiseSchedule:
    """The frozen schedule of given betas ``[T]`` (float64, each in (0, 1], the last may be 1
    under zero terminal SNR): every derived quantity of the forward process and posterior."""
    betas = betas.to(torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    # Eq. 7: beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t.
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta-tilde_1 = 0; its log is clipped to beta-tilde_2's, as in Ho et al.'s code.
    posterior_log_variance_clipped = torch.log(
        torch.cat([posterior_variance[1:2], posterior_variance[1:]])
    )
    return NoiseSchedule(
        name=name,
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
        sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
        sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        # Eq. 7: mu-tilde = coef1 * x0 + coef2 * x_t.
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        log_snr=torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod),
    )


def broadcast_per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape one value per sample, ``[B]``, as ``[B, 1, ..., 1]`` to broadcast against ``like``
    ``[B, C, H, W]`` (or any ``[B, ...]``), in ``like``'s dtype and device. The one place in the
    package that reshapes a per-sample value for broadcasting."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))  # [B] -> [B, 1, ..., 1]


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Take ``values[t]`` of a ``[T]`` schedule tensor for a batch of integer steps ``t`` ``[B]``,
    shaped ``[B, 1, ..., 1]`` to broadcast against ``like`` (see :func:`broadcast_per_sample`).
    The lookup happens where ``values`` lives (``NoiseSchedule.to``)."""
    return broadcast_per_sample(values[t.to(values.device)], like)
