"""Score-based generative modelling through SDEs (Song et al. 2021), as views of a trained model.

A forward SDE dx = f(t) x dt + g(t) dw on t in [0, 1] whose marginals are Gaussian can be written
x_t = s(t) (x_0 + sigma(t) eps) (Karras et al. 2022, sec. 4), with f = d log s / dt and g^2 =
2 s^2 sigma d sigma / dt. The three of Song et al.:

- **VP** (their eq. 11), DDPM's schedule in continuous time: log alpha_bar(t) the monotone
  cubic through alpha_bar((i + 1) / T) = alpha_bar_i for the table's step i (the paper's i + 1)
  and alpha_bar(0) = 1; s = sqrt(alpha_bar), sigma^2 = (1 - alpha_bar) / alpha_bar, so f =
  -beta(t) / 2 and g^2 = beta(t), with beta(t) = -d log alpha_bar / dt, continuous. (Linear
  pieces would match the steps as well, but their beta jumps at every step, and an adaptive
  solver's error estimate misses such jumps: the likelihood of a Gaussian then drifted by 1e-3
  nats as the tolerance tightened.)
- **sub-VP** (eq. 12): the same alpha_bar(t), s = sqrt(alpha_bar) and s sigma = 1 - alpha_bar:
  f = -beta / 2 and g^2 = beta (1 - alpha_bar^2).
- **VE** (eq. 9), NCSN's noise scales (Song & Ermon 2019) made continuous: s = 1 and sigma
  geometric from sigma_min to sigma_max, g^2 = 2 sigma^2 log(sigma_max / sigma_min).

A trained network is a denoiser at every noise level sigma (log-SNR -2 log sigma) whatever the
SDE, so one model can be read through any of them: the score of the SDE's marginal at x is the
model's eps at x / s and noise level sigma, over -s sigma (``samplers.score_function``, the one
conversion). The samplers that walk these SDEs live with the others in :mod:`ddpm.samplers`;
this module holds the SDEs, the adaptive ODE solver, Hutchinson's divergence estimate and the
probability-flow ODE's exact log-likelihood (Song et al. 2021, sec. 4.3 and appendix D.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .schedules import NoiseSchedule

SDES = ("vp", "subvp", "ve")
# the forward processes a model is trained under ('ddpm train --sde'); any of SDES reads it
TRAINING_SDES = ("vp", "ve")
PROBES = ("rademacher", "gaussian")
# score(x [B, ...], t) -> grad_x log p_t(x) [B, ...] at SDE time t in [0, 1]
Score = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True, eq=False)
class SDE:
    """One forward SDE, with its time t in [0, 1] tied to a model's noise levels.

    ``log_alpha_bar`` is the VP and sub-VP SDEs' knot table, float64 ``[T + 1]``: 0 at t = 0, then
    the schedule's log alpha_bar_i at t = (i + 1) / T; ``slopes`` its monotone cubic's
    derivatives there. VE uses ``sigma_min`` and ``sigma_max``."""

    kind: str
    log_alpha_bar: torch.Tensor | None = None
    slopes: tuple[float, ...] = ()
    sigma_min: float = 0.0
    sigma_max: float = 0.0

    # --- the coefficients --------------------------------------------------------------------

    def _log_alpha_bar_and_beta(self, t: float) -> tuple[float, float]:
        """log alpha_bar(t) and beta(t) = -d log alpha_bar / dt: the monotone cubic (Hermite,
        Fritsch & Carlson 1980) through the knots, so that alpha_bar is DDPM's at every step,
        beta is continuous (the drift has no jumps for an ODE solver to trip on) and never
        negative (a natural spline overshoots, to beta < 0, where a schedule's beta leaps)."""
        assert self.log_alpha_bar is not None
        table, slopes = self.log_alpha_bar, self.slopes
        segments = table.shape[0] - 1
        h = 1.0 / segments
        position = min(max(t, 0.0), 1.0) * segments
        i = min(int(position), segments - 1)  # the segment [i, i + 1] holding t
        u = position - i
        y0, y1, d0, d1 = float(table[i]), float(table[i + 1]), slopes[i], slopes[i + 1]
        value = ((2 * u**3 - 3 * u**2 + 1) * y0 + (u**3 - 2 * u**2 + u) * h * d0
                 + (3 * u**2 - 2 * u**3) * y1 + (u**3 - u**2) * h * d1)
        slope = ((6 * u**2 - 6 * u) * (y0 - y1) / h + (3 * u**2 - 4 * u + 1) * d0
                 + (3 * u**2 - 2 * u) * d1)
        return value, -slope

    def _alpha_bar_and_beta(self, t: float) -> tuple[float, float]:
        log_alpha_bar, beta = self._log_alpha_bar_and_beta(t)
        return math.exp(log_alpha_bar), beta

    def scale_sigma(self, t: float) -> tuple[float, float]:
        """(s(t), sigma(t)): x_t = s (x_0 + sigma eps)."""
        if self.kind == "ve":
            return 1.0, self.sigma_min * (self.sigma_max / self.sigma_min) ** min(max(t, 0.0), 1.0)
        log_alpha_bar, _ = self._log_alpha_bar_and_beta(t)
        s = math.exp(log_alpha_bar / 2)
        one_minus = -math.expm1(log_alpha_bar)  # 1 - alpha_bar, exact where alpha_bar is near 1
        if self.kind == "vp":
            return s, math.sqrt(one_minus) / s  # sigma^2 = (1 - ab) / ab
        return s, one_minus / s  # sub-VP: s sigma = 1 - alpha_bar

    def drift_diffusion(self, t: float) -> tuple[float, float]:
        """(f(t), g(t)^2) of dx = f x dt + g dw."""
        if self.kind == "ve":
            _, sigma = self.scale_sigma(t)
            return 0.0, 2 * sigma**2 * math.log(self.sigma_max / self.sigma_min)
        alpha_bar, beta = self._alpha_bar_and_beta(t)
        if self.kind == "vp":
            return -beta / 2, beta
        return -beta / 2, beta * (1 - alpha_bar**2)

    def time_at_sigma(self, sigma: float) -> float:
        """The SDE time t in [0, 1] whose sigma(t) is ``sigma`` (clamped to the SDE's range)."""
        if self.kind == "ve":
            t = math.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
            return min(max(t, 0.0), 1.0)
        if self.kind == "vp":
            log_alpha_bar = -math.log1p(sigma**2)  # sigma^2 = (1 - ab) / ab
        else:  # sub-VP: sigma sqrt(ab) = 1 - ab, a quadratic in sqrt(ab)
            root = (-sigma + math.sqrt(sigma**2 + 4)) / 2
            log_alpha_bar = 2 * math.log(root)
        assert self.log_alpha_bar is not None
        table = self.log_alpha_bar  # falls strictly with t, and so does the spline between knots
        segments = table.shape[0] - 1
        k = int(torch.searchsorted(-table, torch.tensor(-log_alpha_bar, dtype=torch.float64)))
        i = min(max(k - 1, 0), segments - 1)  # table[i] >= log_alpha_bar >= table[i + 1]
        lo, hi = i / segments, (i + 1) / segments
        for _ in range(60):  # bisection within the segment, to float precision
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._log_alpha_bar_and_beta(mid)[0] > log_alpha_bar else (lo, mid)
        return min(max((lo + hi) / 2, 0.0), 1.0)

    # --- the marginal and the prior ----------------------------------------------------------

    def marginal(self, t: float) -> tuple[float, float]:
        """(mean coefficient, standard deviation) of x_t given x_0: N(s x_0, (s sigma)^2 I)."""
        s, sigma = self.scale_sigma(t)
        return s, s * sigma

    def prior_std(self) -> float:
        """The standard deviation of the prior p_1 = N(0, std^2 I): the marginal at t = 1 of data
        of unit variance, s(1) sqrt(1 + sigma(1)^2) (exactly 1 for VP; sigma_max for VE, up to
        1 / sigma_max^2)."""
        s, sigma = self.scale_sigma(1.0)
        return s * math.sqrt(1 + sigma**2)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per sample ``[B]``, in nats."""
        std = self.prior_std()
        d = z[0].numel()
        return (-0.5 * d * math.log(2 * math.pi * std**2)
                - 0.5 * z.flatten(1).double().pow(2).sum(1) / std**2)


def make_sde(kind: str, schedule: NoiseSchedule, *, sigma_min: float | None = None,
             sigma_max: float | None = None) -> SDE:
    """The SDE ``kind`` over ``schedule``'s noise levels: VP and sub-VP on its alpha_bar; VE
    geometric between ``sigma_min`` and ``sigma_max`` (default: the schedule's own extremes, so
    that a model trained on it is queried only at levels it learned)."""
    if kind not in SDES:
        raise ValueError(f"unknown SDE {kind!r}; choose one of {', '.join(SDES)}")
    alpha_bar = schedule.alphas_cumprod
    if float(alpha_bar[-1]) <= 0:
        raise ValueError("this model's schedule reaches zero terminal SNR, where every SDE's "
                         "prior is infinitely wide; use the ddim, dpm++ or ddpm sampler for it")
    if kind == "ve":
        levels = ((1 - alpha_bar) / alpha_bar).sqrt()
        lo = float(levels[0]) if sigma_min is None else sigma_min
        hi = float(levels[-1]) if sigma_max is None else sigma_max
        if not 0 < lo < hi:
            raise ValueError(f"the VE SDE needs 0 < sigma_min < sigma_max, got {lo:g} and {hi:g}")
        return SDE("ve", sigma_min=lo, sigma_max=hi)
    table = torch.cat([torch.zeros(1, dtype=torch.float64), alpha_bar.double().log()])
    return SDE(kind, log_alpha_bar=table, slopes=_monotone_slopes(table.tolist()))


def _monotone_slopes(y: list[float]) -> tuple[float, ...]:
    """Fritsch & Carlson's derivatives at the knots (j / n, y_j) of strictly decreasing data, as
    scipy's PchipInterpolator takes them: inside, the harmonic mean of the two secants; at the
    ends, the three-point one-sided formula, kept within three times its secant and of its sign."""
    n = len(y) - 1
    secant = [(y[j + 1] - y[j]) * n for j in range(n)]
    if n == 1:
        return (secant[0], secant[0])
    inner = [2 / (1 / secant[j - 1] + 1 / secant[j]) for j in range(1, n)]

    def end(near: float, far: float) -> float:
        d = (3 * near - far) / 2
        if d * near <= 0:
            return 0.0
        return 3 * near if abs(d) > 3 * abs(near) else d

    return (end(secant[0], secant[1]), *inner, end(secant[-1], secant[-2]))


# --- the adaptive solver ------------------------------------------------------------------------

# Dormand & Prince 1980, RK5(4)7FM: the nodes, the stages' weights, the fifth-order weights and the
# difference between the fifth- and fourth-order weights (the local error estimate).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


class Solution(NamedTuple):
    y: torch.Tensor  # the state at t1
    evaluations: int  # calls of the right-hand side
    steps: int  # accepted steps


def solve_ode(fn: Callable[[float, torch.Tensor], torch.Tensor], t0: float, t1: float,
              y0: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
              max_evaluations: int = 100_000) -> Solution:
    """dy/dt = fn(t, y) from ``t0`` to ``t1`` (either direction) by Dormand-Prince RK45 with
    adaptive steps, as scipy's ``solve_ivp(method="RK45")`` takes them: a step is kept when the
    RMS over all elements of its error estimate / (atol + rtol max(|y|, |y_new|)) is at most 1,
    and the next step is 0.9 err^(-1/5) times this one, within [0.2, 10] times. The first step
    follows Hairer, Norsett & Wanner's rule (Solving ODEs I, II.4). One batch, one step size."""
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"the ODE solver's tolerances must be positive, got rtol {rtol:g} and "
                         f"atol {atol:g}")
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    y, t = y0, t0
    f = fn(t, y)
    evaluations = 1
    if span == 0:
        return Solution(y, evaluations, 0)

    def rms(v: torch.Tensor) -> float:
        return float(v.double().pow(2).mean().sqrt())

    # Hairer et al.'s initial step: h0 from the sizes of y and f, refined by a trial Euler step.
    scale = atol + rtol * y.abs()
    d0, d1 = rms(y / scale), rms(f / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = fn(t + direction * h0, y + direction * h0 * f)
    evaluations += 1
    d2 = rms((f1 - f) / scale) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h0, h1, span)
    steps = 0
    while direction * (t1 - t) > 0:
        if evaluations >= max_evaluations:
            raise ValueError(f"the ODE solver took {evaluations} evaluations without reaching "
                             f"t = {t1:g} (at {t:g}); loosen its tolerances (--ode-rtol, "
                             f"--ode-atol)")
        h = min(h, abs(t1 - t))
        k = [f]
        for c, a in zip(_C[1:], _A[1:], strict=True):
            stage = y + direction * h * sum(w * ki for w, ki in zip(a, k, strict=False))
            k.append(fn(t + direction * h * c, stage))
        y_new = y + direction * h * sum(w * ki for w, ki in zip(_B, k, strict=True))
        f_new = fn(t + direction * h, y_new)
        k.append(f_new)
        evaluations += 6
        error = direction * h * sum(w * ki for w, ki in zip(_E, k, strict=True))
        err = rms(error / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err ** (-1 / 5)))
        if err <= 1:
            reached = abs(t1 - (t + direction * h)) < 1e-12 * max(1.0, abs(t1))
            t = t1 if reached else t + direction * h
            y, f = y_new, f_new
            steps += 1
        h *= factor if err <= 1 else min(factor, 1.0)
    return Solution(y, evaluations, steps)


# --- the divergence and the likelihood ------------------------------------------------------------


def draw_probes(shape: tuple[int, ...], kind: str, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Hutchinson's probes v of ``shape``: Rademacher (+-1 with equal odds) or standard Gaussian;
    either has E[v v^T] = I, so E[v^T J v] = tr J."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    noise_device = generator.device if generator is not None else device
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=noise_device).to(device)
    bits = torch.randint(0, 2, shape, generator=generator, device=noise_device)
    return (bits * 2 - 1).to(device, torch.float32)


def value_and_divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and Hutchinson-Skilling's estimate of its divergence per sample, the mean over the
    ``probes`` ``[K, *x.shape]`` of v^T (d fn / d x) v (Hutchinson 1989; Skilling 1989), each
    v^T J one vector-Jacobian product of the graph built once."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        estimates = []
        for i, v in enumerate(probes):
            (vjp,) = torch.autograd.grad(y, x, v.to(y.dtype), retain_graph=i < len(probes) - 1)
            estimates.append((vjp * v).flatten(1).sum(1))
    return y.detach(), torch.stack(estimates).mean(0)


class Likelihood(NamedTuple):
    log_prob: torch.Tensor  # [B] log p_{t_start}(x) in nats, float64
    z: torch.Tensor  # [B, ...] the ODE's image of x at t = 1
    evaluations: int  # network evaluations per image


def probability_flow_log_prob(score: Score, sde: SDE, x: torch.Tensor, *, t_start: float,
                              probes: torch.Tensor, rtol: float = 1e-5,
                              atol: float = 1e-5) -> Likelihood:
    """The exact log-density of the SDE's marginal at ``t_start`` at ``x`` under the model,
    through its probability-flow ODE dx/dt = f x - g^2 score / 2 (Song et al. 2021, eq. 13):
    log p_{t_start}(x) = log p_1(x(1)) + integral from t_start to 1 of div(dx/dt) dt (their
    eq. 39, the instantaneous change of variables of Chen et al. 2018), the divergence estimated
    by Hutchinson-Skilling with the same ``probes`` ``[K, *x.shape]`` along the whole path."""
    batch = x.shape[0]

    def drift(x_t: torch.Tensor, t: float) -> torch.Tensor:
        f, g2 = sde.drift_diffusion(t)
        return f * x_t - 0.5 * g2 * score(x_t, t)

    def augmented(t: float, state: torch.Tensor) -> torch.Tensor:
        x_t = state[:, :-1].reshape(x.shape).to(x.dtype)
        dx, div = value_and_divergence(lambda v: drift(v, t), x_t, probes)
        return torch.cat([dx.flatten(1).to(state.dtype), div[:, None].to(state.dtype)], dim=1)

    state = torch.cat([x.flatten(1), x.new_zeros(batch, 1)], dim=1)
    solution = solve_ode(augmented, t_start, 1.0, state, rtol=rtol, atol=atol)
    z = solution.y[:, :-1].reshape(x.shape)
    delta = solution.y[:, -1].double()
    return Likelihood(sde.prior_log_prob(z) + delta, z, solution.evaluations)


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit images ``[B, C, H, W]`` (uint8) as continuous data in [-1, 1]: (k + u) / 256 with u
    uniform on [0, 1), mapped to [-1, 1] (Song et al.'s likelihood.py; Theis et al. 2016: the
    density of the dequantised data bounds the 8-bit probabilities from below)."""
    noise_device = generator.device if generator is not None else images.device
    u = torch.rand(images.shape, generator=generator, device=noise_device).to(images.device)
    return 2 * (images.float() + u) / 256 - 1


def bits_per_dim(log_prob: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits per dimension of 8-bit data from the log-density of its dequantised version on
    [-1, 1] ``[B]``: -log p / (D ln 2) + 7, the 7 being log2(256) for the 256 levels less 1 for
    [-1, 1]'s width of 2 (Song et al.'s likelihood.py, its offset)."""
    return -log_prob / (dims * math.log(2)) + 7


def largest_pairwise_distance(images: torch.Tensor, *, chunk: int = 1024) -> float:
    """max_{i,j} ||x_i - x_j||_2 over a batch ``[N, ...]``: Song & Ermon 2020's technique 1 sets
    the VE process's sigma_max to it. Exact, in float64 blocks of ``chunk`` rows, by
    ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b."""
    flat = images.flatten(1).to(torch.float64)
    if flat.shape[0] < 2:
        raise ValueError(f"the largest distance between images needs at least 2, got {flat.shape[0]}")
    squares = (flat * flat).sum(1)  # [N]
    largest = 0.0
    for start in range(0, flat.shape[0], chunk):
        block = flat[start : start + chunk]
        d2 = squares[start : start + chunk, None] + squares[None, :] - 2 * block @ flat.T
        largest = max(largest, float(d2.max()))
    return math.sqrt(max(largest, 0.0))
