"""Samplers: pure functions that walk an explicit, descending array of timesteps.

Every sampler has the signature ``sampler(denoiser, schedule, x_T, timesteps, *, prediction_type,
x0_transform, generator, callback, **options) -> x0`` where

- ``denoiser(x_t [B, C, H, W], t [B]) -> prediction [B, C, H, W]`` is the network (``t`` is int64
  at integer steps and float32 between them, for the ODE samplers' noise levels); a network that
  learned its variances returns ``[B, 2C, H, W]``, the prediction and the variance interpolation
  (``diffusion.split_variance``), which ``ddpm`` and ``ddim`` with eta > 0 use and the others drop;
- ``timesteps`` are the descending steps at which the network is evaluated, e.g. ``[999, ..., 0]``
  (real-valued for ``karras`` spacing); after the last one each sampler steps to the data;
- ``prediction_type`` says whether the network predicts eps, x0 or v;
- ``x0_transform`` (e.g. clipping to [-1, 1]) is applied to every predicted x0.

They keep no state between calls; all randomness comes from the ``generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .diffusion import (
    VARIANCES,
    Denoiser,
    eps_x0_from_prediction,
    interpolated_log_variance,
    split_variance,
)
from .schedules import NoiseSchedule, broadcast_per_sample
from .sde import SDE, make_sde, solve_ode
from .timesteps import check_timesteps

# callback(step_index, t, x_t, x0_pred): called once per step, after the network evaluation.
StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]
X0Transform = Callable[[torch.Tensor], torch.Tensor]
# grad(x_t [B, C, H, W], t [B]) -> s grad_x log p(y | x_t, t) [B, C, H, W]: a classifier's guidance
# (Dhariwal & Nichol 2021), scale s included.
GuidanceGrad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- shared pieces ------------------------------------------------------------------------------


def clip_x0(x0: torch.Tensor) -> torch.Tensor:
    """Static thresholding: clip the predicted x0 to the data range [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Saharia et al. 2022, sec. 2.3: s = max(1, the ``percentile`` of |x0| per image); clip x0 to
    [-s, s] and divide by s, pulling saturated pixels inwards instead of flattening them."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0)  # [B]
    s = broadcast_per_sample(s, x0)  # [B, 1, 1, 1], in x0's dtype
    return x0.clamp(-s, s) / s


def _split_output(output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance interpolation or None) of a denoiser's output at x_t: a network
    that learned its variances gives 2C channels for C (the module docstring)."""
    return split_variance(output, x_t.shape[1], output.shape[1] == 2 * x_t.shape[1])


def _sqrt(value: float | torch.Tensor) -> float | torch.Tensor:
    """sqrt(max(value, 0)) of a fixed variance (a float) or a learned one (a tensor)."""
    if isinstance(value, torch.Tensor):
        return value.clamp(min=0).sqrt()
    return math.sqrt(max(0.0, value))


def _t_batch(x_t: torch.Tensor, t: float) -> torch.Tensor:
    """Step t for each of the batch ``[B]``: int64 at integer steps, float32 between them."""
    integral = float(t).is_integer()
    return torch.full((x_t.shape[0],), int(t) if integral else t, device=x_t.device,
                      dtype=torch.long if integral else torch.float32)


def _predict(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: float,
    prediction_type: str,
    x0_transform: X0Transform | None,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
    """Evaluate the network at step t; return (eps, x0, alpha_bar_t, variance interpolation or
    None) with x0 transformed and eps made consistent with it through eq. 4."""
    alpha_bar = schedule.alpha_bar_scalar(t)
    output = denoiser(x_t, _t_batch(x_t, t)).to(x_t.dtype)
    prediction, interpolation = _split_output(output, x_t)
    eps, x0 = eps_x0_from_prediction(prediction, x_t, alpha_bar, prediction_type)
    if x0_transform is not None:
        x0 = x0_transform(x0)
        eps = (x_t - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
    return eps, x0, alpha_bar, interpolation


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _half_log_snr(sqrt_alpha_bar: float, sqrt_one_minus_alpha_bar: float) -> float:
    """lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)), half the log-SNR; -inf where
    alpha_bar = 0 (zero terminal SNR)."""
    if sqrt_alpha_bar > 0:
        return math.log(sqrt_alpha_bar / sqrt_one_minus_alpha_bar)
    return -math.inf


# --- the samplers ---------------------------------------------------------------------------------


@torch.no_grad()
def ancestral_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    variance: str = "posterior",
    guidance_grad: GuidanceGrad | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over any descending sub-sequence of steps.

    For a sub-sequence the betas are recomputed from alpha_bar between consecutive steps
    (respacing, Nichol & Dhariwal 2021, section 4); with every step 0..T-1 they are the schedule's.
    ``variance`` is sigma_t^2 = beta_t or the posterior beta-tilde_t (the paper's two choices), or
    ``learned`` between the two by the network (Nichol & Dhariwal 2021, eq. 15), over the
    respaced pair. ``guidance_grad`` (s grad log p(y | x_t)) shifts each step's mean by sigma_t^2
    times it (Dhariwal & Nichol 2021, Algorithm 1).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    x_t = x_T
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1.0], strict=True)):
        _, x0_pred, alpha_bar_t, interpolation = _predict(
            denoiser, schedule, x_t, t, prediction_type, x0_transform)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        alpha_bar_prev = schedule.alpha_bar_scalar(t_prev)
        beta_t = 1.0 - alpha_bar_t / alpha_bar_prev  # respaced beta between t_prev and t
        # Eq. 7: mu-tilde = sqrt(alpha_bar_prev) beta / (1 - alpha_bar) x0
        #                   + sqrt(1 - beta) (1 - alpha_bar_prev) / (1 - alpha_bar) x_t.
        coef_x0 = math.sqrt(alpha_bar_prev) * beta_t / (1.0 - alpha_bar_t)
        coef_xt = math.sqrt(1.0 - beta_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        mean = coef_x0 * x0_pred + coef_xt * x_t
        if t_prev < 0:
            return mean  # Algorithm 2, line 4: no noise on the last step
        # Algorithm 2's sigma_t^2: beta-tilde_t (eq. 7), beta_t, or learned between them (eq. 15).
        beta_tilde_t = beta_t * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        noise_variance: float | torch.Tensor  # fixed (a float) or learned (a tensor)
        if variance == "posterior":
            noise_variance = beta_tilde_t
        elif variance == "beta":
            noise_variance = beta_t
        else:
            noise_variance = _learned_variance(interpolation, beta_t, beta_tilde_t)
        if guidance_grad is not None:
            # Dhariwal & Nichol 2021, Algorithm 1: x_{t-1} ~ N(mu + s Sigma grad log p(y | x_t), Sigma).
            mean = mean + noise_variance * guidance_grad(x_t, _t_batch(x_t, t)).to(mean.dtype)
        # Algorithm 2, line 4: x_{t-1} = mu + sigma_t z.
        x_t = mean + _sqrt(noise_variance) * _noise_like(x_t, generator)
    return x_t


def _learned_variance(
    interpolation: torch.Tensor | None, beta_t: float, beta_tilde_t: float
) -> torch.Tensor:
    """Sigma = exp(eq. 15) over a (respaced) pair beta_t, beta-tilde_t, per element."""
    if interpolation is None:
        raise ValueError("variance 'learned' needs a network that learned its variances (trained "
                         "with --learn-variance); use variance posterior or beta for this one")
    return interpolated_log_variance(interpolation, math.log(beta_t), math.log(beta_tilde_t)).exp()


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): eta = 0 is deterministic, eta = 1 is DDPM-like.

    With a network that learned its variances, eta > 0 takes sigma_t^2 = eta^2 Sigma_theta (Nichol
    & Dhariwal 2021, eq. 15, over the respaced pair) in place of eq. 16's eta^2 beta-tilde_t."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    x_t = x_T
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1.0], strict=True)):
        eps, x0_pred, alpha_bar_t, interpolation = _predict(
            denoiser, schedule, x_t, t, prediction_type, x0_transform)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        alpha_bar_prev = schedule.alpha_bar_scalar(t_prev)
        # Eq. 16: sigma_t^2 = eta^2 (1 - ab_prev) / (1 - ab) (1 - ab / ab_prev), eta^2 beta-tilde_t.
        beta_t = 1 - alpha_bar_t / alpha_bar_prev
        beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
        noise_variance: float | torch.Tensor  # fixed (a float) or learned (a tensor)
        if eta > 0 and interpolation is not None and t_prev >= 0:
            noise_variance = eta**2 * _learned_variance(interpolation, beta_t, beta_tilde_t)
        else:
            noise_variance = (eta * math.sqrt(beta_tilde_t)) ** 2
        # Eq. 12: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma_t^2) eps + sigma_t z.
        x_t = math.sqrt(alpha_bar_prev) * x0_pred + _sqrt(1 - alpha_bar_prev - noise_variance) * eps
        if isinstance(noise_variance, torch.Tensor) or noise_variance > 0:
            x_t = x_t + _sqrt(noise_variance) * _noise_like(x_t, generator)
    return x_t


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, multistep.

    The paper's alpha_t and sigma_t are sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t). With
    lambda = log(sqrt(alpha_bar) / sqrt(1 - alpha_bar)), h = lambda_prev - lambda_t and
    r = h_last / h (h_last: the previous iteration's h):
    x_prev = (sqrt(1 - ab_prev) / sqrt(1 - ab_t)) x_t - sqrt(ab_prev) (e^{-h} - 1) D, where D is
    the x0 prediction on the first step (first order) and (1 + 1/(2r)) x0_pred - 1/(2r) x0_last
    after it. The final step to the data (1 - ab_prev = 0) is first order, D = x0 (the paper's
    lower-order final step).
    """
    del generator  # deterministic; accepted for the shared signature
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    x_t = x_T
    last: tuple[torch.Tensor, float] | None = None  # the previous iteration's x0_pred and h
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1.0], strict=True)):
        _, x0_pred, alpha_bar_t, _ = _predict(
            denoiser, schedule, x_t, t, prediction_type, x0_transform)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        if t_prev < 0:
            return x0_pred  # 1 - ab_prev = 0: x_prev = D, first order
        alpha_bar_prev = schedule.alpha_bar_scalar(t_prev)
        sqrt_alpha_bar_t = math.sqrt(alpha_bar_t)
        sqrt_one_minus_alpha_bar_t = math.sqrt(1 - alpha_bar_t)
        sqrt_alpha_bar_prev = math.sqrt(alpha_bar_prev)
        sqrt_one_minus_alpha_bar_prev = math.sqrt(1 - alpha_bar_prev)
        # h = lambda_prev - lambda_t; lambda_t = -inf at zero terminal SNR gives h = inf, where the
        # update tends to sqrt(1 - ab_prev) x_t + sqrt(ab_prev) D (e^{-h} - 1 -> -1), as below.
        h = (_half_log_snr(sqrt_alpha_bar_prev, sqrt_one_minus_alpha_bar_prev)
             - _half_log_snr(sqrt_alpha_bar_t, sqrt_one_minus_alpha_bar_t))
        if last is None:
            d = x0_pred  # first step: DPM-Solver++(1), i.e. DDIM
        else:
            x0_last, h_last = last
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_last
        x_t = ((sqrt_one_minus_alpha_bar_prev / sqrt_one_minus_alpha_bar_t) * x_t
               - sqrt_alpha_bar_prev * math.expm1(-h) * d)
        last = x0_pred, h
    return x_t


def _edm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str,
    x0_transform: X0Transform | None,
    callback: StepCallback | None,
    second_order: bool,
    churn: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Euler / Heun on the probability-flow ODE in Karras et al. 2022's parametrisation:
    x_hat = x_t / sqrt(alpha_bar), noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) and
    d x_hat / d sigma = (x_hat - D(x_hat; sigma)) / sigma (eq. 3 with s(t) = 1, sigma(t) = t).

    With ``churn`` > 0 it is their stochastic sampler (Algorithm 2): before each step whose
    sigma lies in [CHURN_SIGMA_MIN, CHURN_SIGMA_MAX], the noise level is raised by the factor
    1 + gamma, gamma = min(churn / N, sqrt(2) - 1), by adding fresh noise of variance
    sigma_hat^2 - sigma^2, and the step starts from sigma_hat (a network evaluation at the real-
    valued t of that noise level). The added noise is what the ODE then removes, so each step
    corrects part of the errors that earlier steps made."""
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    if not churn >= 0 or not math.isfinite(churn):
        raise ValueError(f"churn must be a finite number >= 0, got {churn}")

    def derivative(
        x_hat: torch.Tensor, t: float, noise_level: float, i: int | None
    ) -> torch.Tensor:
        alpha_bar = 1 / (1 + noise_level**2)
        x_t = x_hat * math.sqrt(alpha_bar)
        _, x0_pred, _, _ = _predict(denoiser, schedule, x_t, t, prediction_type, x0_transform)
        if callback is not None and i is not None:
            callback(i, t, x_t, x0_pred)
        return (x_hat - x0_pred) / noise_level

    alpha_bar_T = schedule.alpha_bar_scalar(ts[0])
    if alpha_bar_T == 0:
        raise ValueError(
            "euler and heun integrate x / sqrt(alpha_bar), which is infinite at zero terminal "
            "SNR; sample this model with ddim, dpm++ or ddpm"
        )
    gamma = min(churn / len(ts), math.sqrt(2) - 1)  # Algorithm 2, line 4
    top = schedule.sigma_scalar(schedule.num_train_timesteps - 1)  # the schedule has no noisier step
    x_hat = x_T / math.sqrt(alpha_bar_T)
    for i, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1.0], strict=True)):
        noise_level = schedule.sigma_scalar(t)
        noise_level_prev = schedule.sigma_scalar(t_prev) if t_prev >= 0 else 0.0
        if gamma > 0 and CHURN_SIGMA_MIN <= noise_level <= CHURN_SIGMA_MAX:
            # Algorithm 2, lines 5-6: sigma_hat = (1 + gamma) sigma, and
            # x_hat += sqrt(sigma_hat^2 - sigma^2) eps, which puts x_hat at noise level sigma_hat.
            raised = min((1 + gamma) * noise_level, top)
            x_hat = x_hat + math.sqrt(raised**2 - noise_level**2) * _noise_like(x_hat, generator)
            noise_level = raised
            t = float(schedule.t_at_log_snr(-2 * math.log(raised)))  # sigma^2 = 1 / SNR
        d = derivative(x_hat, t, noise_level, i)
        # Euler step (Karras et al., Alg. 1, line 5): x_hat_prev = x_hat + (sigma_prev - sigma) d.
        x_hat_prev = x_hat + (noise_level_prev - noise_level) * d
        if second_order and noise_level_prev > 0:
            # Heun's correction (Alg. 1, lines 7-8): average the slopes at both ends.
            d_prev = derivative(x_hat_prev, t_prev, noise_level_prev, None)
            x_hat_prev = x_hat + (noise_level_prev - noise_level) * 0.5 * (d + d_prev)
        x_hat = x_hat_prev
    return x_hat  # noise level 0: x_hat is x0


#: The noise levels at which ``churn`` adds noise (Karras et al. 2022, S_tmin and S_tmax of their
#: Table 5, the values they used on ImageNet-64): not at the largest sigmas, where the step is
#: mostly noise already, nor at the smallest, where new noise would blur detail.
CHURN_SIGMA_MIN, CHURN_SIGMA_MAX = 0.05, 50.0


@torch.no_grad()
def euler_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    churn: float = 0.0,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022), first order; with
    ``churn`` > 0, noise is added before each step (their Algorithm 2's churn, Euler's step)."""
    return _edm_sample(denoiser, schedule, x_T, timesteps, prediction_type=prediction_type,
                       x0_transform=x0_transform, callback=callback, second_order=False,
                       churn=churn, generator=generator)


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    churn: float = 0.0,
) -> torch.Tensor:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1), second order;
    2n - 1 network evaluations for n steps (the last step is Euler's). With ``churn`` > 0 it is
    their stochastic sampler, Algorithm 2 (S_churn = ``churn``, S_noise = 1)."""
    return _edm_sample(denoiser, schedule, x_T, timesteps, prediction_type=prediction_type,
                       x0_transform=x0_transform, callback=callback, second_order=True,
                       churn=churn, generator=generator)


# --- the SDE samplers (Song et al. 2021; Song & Ermon 2019) -------------------------------------


def _sde_start(schedule: NoiseSchedule, view: SDE, ts: list[float], x_T: torch.Tensor
               ) -> tuple[list[float], torch.Tensor]:
    """The timesteps' noise levels as times of the SDE ``view``, and x_T ~ N(0, I) scaled to the
    marginal at the first of them of unit-variance data, s sqrt(1 + sigma^2)."""
    times = [view.time_at_sigma(schedule.sigma_scalar(t)) for t in ts]
    s0, sigma0 = view.scale_sigma(times[0])
    return times, x_T * (s0 * math.sqrt(1 + sigma0**2))


def _sde_predict(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sde: SDE,
    x: torch.Tensor,
    time: float,
    prediction_type: str,
    x0_transform: X0Transform | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The network read at the SDE's x at time ``time``: (score, x0, x_t, t). x = s (x0 + sigma
    eps) is x_t = sqrt(alpha_bar) (x0 + sigma eps) at the model's step t of that sigma (alpha_bar
    = 1 / (1 + sigma^2)), so eps is the network's at x_t and grad_x log p(x) = -eps / (s sigma)."""
    s, sigma = sde.scale_sigma(time)
    t = float(schedule.t_at_log_snr(-2 * math.log(sigma)))
    t = float(round(t)) if abs(t - round(t)) < 1e-9 else t  # a table step: the network's own t
    x_t = x * (math.sqrt(schedule.alpha_bar_scalar(t)) / s)
    eps, x0, _, _ = _predict(denoiser, schedule, x_t, t, prediction_type, x0_transform)
    return -eps / (s * sigma), x0, x_t, t


def score_function(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sde: SDE,
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = None,
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """score(x, time) = grad_x log p_time(x) of ``sde``'s marginal, from a network trained to
    predict eps, x0 or v (EDM-preconditioned or not: ``denoiser`` is what the samplers call)."""

    def score(x: torch.Tensor, time: float) -> torch.Tensor:
        return _sde_predict(denoiser, schedule, sde, x, time, prediction_type, x0_transform)[0]

    return score


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return broadcast_per_sample(v.flatten(1).norm(dim=1), v)


def langevin_correct(
    score: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    snr: float,
    steps: int,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Song et al. 2021, Algorithm 4 (VE) and 5 (VP): ``steps`` Langevin steps at one noise level,
    x <- x + e score(x) + sqrt(2 e) z, the step e = 2 alpha (snr |z| / |score|)^2 chosen so that
    the signal-to-noise ratio of the update is ``snr`` (norms per image, so that an image's
    sample does not depend on the others in its batch). snr 0 leaves x as it is."""
    for _ in range(steps):
        grad = score(x)
        z = _noise_like(x, generator)
        step = 2 * alpha * (snr * _per_sample_norm(z) / _per_sample_norm(grad).clamp(min=1e-12)) ** 2
        x = x + step * grad + (2 * step).sqrt() * z
    return x


@torch.no_grad()
def pc_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    sde: str = "vp",
    predictor: str = "reverse-diffusion",
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> torch.Tensor:
    """Predictor-corrector sampling of the reverse SDE (Song et al. 2021, Algorithm 1): at each
    of the timesteps' noise levels, ``corrector_steps`` Langevin steps (:func:`langevin_correct`,
    skipped at 0), then a predictor step to the next level:

    - ``reverse-diffusion`` (their eq. 47): with the forward step between the two levels x =
      a x_next + G z, a = s / s_next and G^2 = (s sigma)^2 - a^2 (s_next sigma_next)^2,
      x_next = x - (a - 1) x + G^2 score + G z;
    - ``euler-maruyama``: x_next = x - (f x - g^2 score) dt + g sqrt(dt) z, dt the SDE time
      between the levels.

    x_T ~ N(0, I) is scaled to the SDE's prior at the first level; the last level's x0 prediction
    is returned (Tweedie's formula: the last step's noise removed, as Song et al.'s ``denoise``).
    ``sde`` is the view (:mod:`ddpm.sde`): vp, subvp or ve over the model's noise levels."""
    if not snr >= 0 or not math.isfinite(snr):
        raise ValueError(f"the corrector's snr must be a finite number >= 0, got {snr}")
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    view = make_sde(sde, schedule)
    times, x = _sde_start(schedule, view, check_timesteps(timesteps, schedule.num_train_timesteps), x_T)

    def predict(x: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        return _sde_predict(denoiser, schedule, view, x, time, prediction_type, x0_transform)

    for i, time in enumerate(times):
        time_next = times[i + 1] if i + 1 < len(times) else None
        s, sigma = view.scale_sigma(time)
        s_next, sigma_next = view.scale_sigma(time_next) if time_next is not None else (s, sigma)
        if corrector_steps and snr > 0:
            def score_now(v: torch.Tensor, level: float = time) -> torch.Tensor:
                return predict(v, level)[0]

            x = langevin_correct(score_now, x, snr=snr, steps=corrector_steps,
                                 alpha=(s / s_next) ** 2, generator=generator)
        grad, x0_pred, x_t, t = predict(x, time)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        if time_next is None:
            return x0_pred
        if predictor == "reverse-diffusion":
            a = s / s_next
            g2 = max((s * sigma) ** 2 - (a * s_next * sigma_next) ** 2, 0.0)
            mean = x - (a - 1) * x + g2 * grad
        else:
            dt = time - time_next
            f, g2_rate = view.drift_diffusion(time)
            g2 = g2_rate * dt
            mean = x - (f * x - g2_rate * grad) * dt
        x = mean + math.sqrt(g2) * _noise_like(x, generator)
    raise AssertionError("unreachable: the last level returns")


def langevin_step_size(ratio: float, steps: int) -> float:
    """Song & Ermon 2020 (Improved Techniques, technique 4): e / sigma_L^2 for annealed Langevin
    dynamics with ``steps`` steps a level and levels falling by ``ratio`` = sigma_{i-1} /
    sigma_i: the x = e / sigma_L^2 that brings (1 - x)^(2T) (ratio^2 - 2 / (2 - x)) + 2 / (2 - x),
    a sample's variance after a level's T steps over that level's (their eq. 6 in x), nearest 1.
    Found on a log grid over (0, 1), then refined by golden-section search between the grid
    points either side of the best. (CIFAR-10's NCSNv2, ratio 5000^(1/231) and T = 5: x = 0.062,
    their e = 6.2e-6 at sigma_L = 0.01.)"""
    if not ratio > 1:
        raise ValueError(f"the noise levels must fall from one level to the next (ratio > 1), got {ratio}")
    if steps < 1:
        raise ValueError(f"langevin_steps must be at least 1, got {steps}")

    def distance(x: float) -> float:
        return abs((1 - x) ** (2 * steps) * (ratio**2 - 2 / (2 - x)) + 2 / (2 - x) - 1)

    grid = [2.0 ** (k / 64) for k in range(-64 * 40, 0)]  # 2^-40 .. just under 1
    best = min(range(len(grid)), key=lambda k: distance(grid[k]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        lo, hi = (lo, b) if distance(a) <= distance(b) else (a, hi)
    return (lo + hi) / 2


@torch.no_grad()
def langevin_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    langevin_steps: int = 5,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), NCSN's own sampler, in the
    noise-level variable x = x0 + sigma eps: for each of the timesteps' noise levels sigma_i,
    ``langevin_steps`` steps x <- x + a_i score(x) + sqrt(2 a_i) z with a_i = e sigma_i^2 /
    sigma_L^2 (Song & Ermon 2020's Algorithm 1, whose a is half the 2019 paper's), e by
    :func:`langevin_step_size` for the levels' mean ratio; then the last level's x0 prediction
    (Tweedie's formula; Song & Ermon 2020's final denoising step). The rule assumes geometric
    levels, hence the default logsnr spacing. ``langevin_steps`` x levels + 1 network
    evaluations."""
    if langevin_steps < 1:
        raise ValueError(f"langevin_steps must be at least 1, got {langevin_steps}")
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    sigmas = [schedule.sigma_scalar(t) for t in ts]
    view = make_sde("ve", schedule)  # s = 1: x is the noise-level variable itself
    ratio = (sigmas[0] / sigmas[-1]) ** (1 / (len(sigmas) - 1)) if len(sigmas) > 1 else 2.0
    epsilon = langevin_step_size(max(ratio, 1 + 1e-9), langevin_steps) * sigmas[-1] ** 2
    times, x = _sde_start(schedule, view, ts, x_T)
    for i, (sigma, time) in enumerate(zip(sigmas, times, strict=True)):
        a = epsilon * sigma**2 / sigmas[-1] ** 2
        for _ in range(langevin_steps):
            grad, x0_pred, x_t, t = _sde_predict(denoiser, schedule, view, x, time,
                                                 prediction_type, x0_transform)
            x = x + a * grad + math.sqrt(2 * a) * _noise_like(x, generator)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
    _, x0_pred, _, _ = _sde_predict(denoiser, schedule, view, x, times[-1], prediction_type,
                                    x0_transform)
    return x0_pred


@torch.no_grad()
def ode_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    prediction_type: str = "eps",
    x0_transform: X0Transform | None = clip_x0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    sde: str = "vp",
    ode_rtol: float = 1e-5,
    ode_atol: float = 1e-5,
) -> torch.Tensor:
    """The probability-flow ODE dx/dt = f x - g^2 score / 2 (Song et al. 2021, eq. 13) of the
    SDE view ``sde``, solved by adaptive RK45 (:func:`ddpm.sde.solve_ode`, tolerances
    ``ode_rtol`` and ``ode_atol``) from the first timestep's noise level to the last, through each
    timestep in between (where ``callback`` sees x_t and x0); then the last level's x0
    prediction. The timesteps fix where it starts, stops and reports, not its steps: the solver
    spends as many network evaluations as its tolerances need."""
    del generator  # deterministic; accepted for the shared signature
    view = make_sde(sde, schedule)
    times, x = _sde_start(schedule, view, check_timesteps(timesteps, schedule.num_train_timesteps), x_T)
    for i, (time, time_next) in enumerate(zip(times, times[1:] + [None], strict=True)):
        first = True

        def velocity(time_now: float, x_now: torch.Tensor, index: int = i) -> torch.Tensor:
            nonlocal first
            grad, x0_pred, x_t, t = _sde_predict(denoiser, schedule, view, x_now, time_now,
                                                 prediction_type, x0_transform)
            if first and callback is not None:
                callback(index, t, x_t, x0_pred)  # once per timestep, at its first evaluation
            first = False
            f, g2 = view.drift_diffusion(time_now)
            return f * x_now - 0.5 * g2 * grad

        if time_next is None:
            _, x0_pred, x_t, t = _sde_predict(denoiser, schedule, view, x, time, prediction_type,
                                              x0_transform)
            if callback is not None:
                callback(i, t, x_t, x0_pred)
            return x0_pred
        x = solve_ode(velocity, time, time_next, x, rtol=ode_rtol, atol=ode_atol).y
    raise AssertionError("unreachable: the last level returns")


PREDICTORS = ("reverse-diffusion", "euler-maruyama")


@dataclass(frozen=True)
class SamplerSpec:
    """Everything ddpm knows of one sampler, in one record: the pipeline, the command line's
    checks, the web page and the time forecasts all read it, so adding a sampler is adding one.

    ``options`` are the :class:`~ddpm.config.SampleConfig` settings the function takes, under
    the same names; ``second_order`` samplers evaluate the network twice a step but the last."""

    name: str
    function: Callable[..., torch.Tensor]
    default_spacing: str
    options: tuple[str, ...] = ()
    second_order: bool = False
    # network evaluations per image from (steps, options), where not one per step
    count: Callable[[int, dict[str, Any]], int] | None = None
    adaptive: bool = False  # steps chosen by an error estimate: computed in fp32, count estimated

    def evaluations(self, steps: int, options: dict[str, Any] | None = None) -> int:
        """Network evaluations per image for ``steps`` timesteps and the sampler's ``options``
        (Heun: 2n - 1, the last step being Euler's; an adaptive solver's, an estimate)."""
        if self.count is not None:
            return self.count(steps, options or {})
        return 2 * steps - 1 if self.second_order else steps


def _pc_evaluations(steps: int, options: dict[str, Any]) -> int:
    return steps * (1 + options.get("corrector_steps", 1))


def _langevin_evaluations(steps: int, options: dict[str, Any]) -> int:
    return steps * options.get("langevin_steps", 5) + 1


#: What the forecasts and the progress bar count for the adaptive ODE solver, whose count is
#: known only afterwards: Song et al. 2021 report about 140 evaluations for their CIFAR-10 models
#: at tolerance 1e-5 (their Table 2's NFE of the probability-flow ODE sampler).
ODE_EVALUATIONS_ESTIMATE = 140


def _ode_evaluations(steps: int, options: dict[str, Any]) -> int:
    return ODE_EVALUATIONS_ESTIMATE


SAMPLER_SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddpm", ancestral_sample, "linspace", options=("variance",)),
    SamplerSpec("ddim", ddim_sample, "linspace", options=("eta",)),
    # DPM-Solver++ steps evenly in lambda = log-SNR / 2 (Lu et al. 2022, sec. 3.3): with uneven h
    # its multistep extrapolation is far less accurate (BENCHMARKS.md, sampler order table).
    SamplerSpec("dpm++", dpmpp_2m_sample, "logsnr"),
    SamplerSpec("euler", euler_sample, "karras", options=("churn",)),
    SamplerSpec("heun", heun_sample, "karras", options=("churn",), second_order=True),
    # the score SDEs walk even steps of SDE time in Song et al. 2021; over a DDPM schedule that
    # is linspace spacing of the VP SDE, the closest of ours for every view
    SamplerSpec("pc", pc_sample, "linspace",
                options=("sde", "predictor", "snr", "corrector_steps"), count=_pc_evaluations),
    SamplerSpec("langevin", langevin_sample, "logsnr", options=("langevin_steps",),
                count=_langevin_evaluations),
    SamplerSpec("ode", ode_sample, "linspace", options=("sde", "ode_rtol", "ode_atol"),
                count=_ode_evaluations, adaptive=True),
)}
SAMPLERS = tuple(SAMPLER_SPECS)
# the settings some sampler takes; each is refused with a sampler that does not
SAMPLER_OPTIONS = frozenset(option for spec in SAMPLER_SPECS.values() for option in spec.options)


def sampler_spec(name: str) -> SamplerSpec:
    if name not in SAMPLER_SPECS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLER_SPECS[name]


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function of ``name`` (:func:`sampler_spec`)."""
    return sampler_spec(name).function


def initial_noise(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` ``[B, C, H, W]``, drawn from ``generator`` and moved to ``device``."""
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)
