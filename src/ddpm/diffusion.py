"""The forward process, its posterior, the variational bound and the training loss.

Ho et al. 2020 (the forward process, eq. 4; the posterior, eq. 7; L_simple, eq. 14; the bound,
eq. 5, with its discretised decoder, eq. 13) and Nichol & Dhariwal 2021 (learned variances,
eq. 15, trained by L_hybrid = L_simple + lambda L_vlb, eq. 16).

All functions are pure: the schedule and any randomness come in as arguments. Shapes: ``x0``,
``x_t`` and ``eps`` are ``[B, C, H, W]``; ``t`` is int64 ``[B]`` in ``0 .. T-1``. A network
that learns its variances outputs ``[B, 2C, H, W]``: its prediction, then the interpolation
(:func:`split_variance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .schedules import NoiseSchedule, broadcast_per_sample, extract

LOSSES = ("mse", "l1", "huber")

# A denoiser maps (x_t [B, C, H, W], t [B]) to its prediction [B, C, H, W] of eps, x0 or v
# (``prediction_type``); eps_x0_from_prediction turns any of them into both eps and x0.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def q_sample(
    schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """Sample q(x_t | x0) in closed form, at integer steps or real-valued ones (continuous
    time: :meth:`NoiseSchedule.alpha_bar_at`)."""
    # Eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.
    if t.is_floating_point():
        alpha_bar = broadcast_per_sample(alpha_bar_of(schedule, t), x0)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps
    )


def alpha_bar_of(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at a batch of steps ``t`` ``[B]``: the table's at integer steps, the interpolated
    one (:meth:`NoiseSchedule.alpha_bar_at`) at real-valued steps; float64 ``[B]`` on the
    schedule's device."""
    steps = t.to(schedule.alphas_cumprod.device)
    return schedule.alpha_bar_at(steps) if steps.is_floating_point() else schedule.alphas_cumprod[steps]


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


# --- the reverse process's variance and the variational bound -----------------------------------

# sigma_t^2 of p(x_{t-1} | x_t): beta-tilde_t (eq. 7), beta_t (Ho et al.'s two fixed choices), or
# learned between them (Nichol & Dhariwal 2021, eq. 15).
VARIANCES = ("posterior", "beta", "learned")
# lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1).
VLB_WEIGHT = 1e-3


def split_variance(
    output: torch.Tensor, channels: int, learned: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network's output as (prediction ``[B, C, H, W]``, variance interpolation ``[B, C, H, W]``
    or None): a network that learns its variances outputs ``[B, 2C, H, W]``, the two stacked."""
    expected = 2 * channels if learned else channels
    if output.shape[1] != expected:
        raise ValueError(
            f"the network gave {output.shape[1]} channels for {channels}-channel images, but "
            f"{'a model that learns its variances gives 2C' if learned else 'expected C'} = "
            f"{expected}; was it built with the same learn_variance?")
    if not learned:
        return output, None
    return output[:, :channels], output[:, channels:]


def interpolated_log_variance(
    interpolation: torch.Tensor, log_beta: torch.Tensor | float, log_beta_tilde: torch.Tensor | float
) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 15: log Sigma = v log beta_t + (1 - v) log beta-tilde_t, with
    v = (output + 1) / 2, so an output in [-1, 1] spans the range (their code's convention, and
    diffusers' ``learned_range``); zero, the initial output, is the geometric mean."""
    v = (interpolation + 1) / 2
    return v * log_beta + (1 - v) * log_beta_tilde


def model_log_variance(
    schedule: NoiseSchedule,
    t: torch.Tensor,
    like: torch.Tensor,
    variance: str,
    interpolation: torch.Tensor | None = None,
) -> torch.Tensor:
    """log sigma_t^2 of p(x_{t-1} | x_t) at integer steps ``t`` ``[B]``: ``[B, 1, 1, 1]`` for the
    fixed choices, ``[B, C, H, W]`` learned. At t = 0 (the decoder, eq. 13) beta-tilde is 0, so
    its log is clipped to the next step's, and the fixed beta choice takes it too (as in Nichol &
    Dhariwal's code): the two fixed choices share their decoder."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    log_beta_tilde = extract(schedule.posterior_log_variance_clipped, t, like)
    if variance == "posterior":
        return log_beta_tilde
    log_beta = extract(schedule.betas.log(), t, like)
    if variance == "beta":
        return torch.where(broadcast_per_sample(t == 0, like).bool(), log_beta_tilde, log_beta)
    if interpolation is None:
        raise ValueError("variance 'learned' needs the network's variance interpolation, and this "
                         "network has none: sample it with variance posterior or beta")
    return interpolated_log_variance(interpolation, log_beta, log_beta_tilde)


def normal_kl(
    mean_1: torch.Tensor, log_var_1: torch.Tensor, mean_2: torch.Tensor, log_var_2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_1, e^log_var_1) || N(mean_2, e^log_var_2)) per element, in nats:
    (log_var_2 - log_var_1 + (var_1 + (mean_1 - mean_2)^2) / var_2 - 1) / 2."""
    return 0.5 * (log_var_2 - log_var_1 + torch.exp(log_var_1 - log_var_2)
                  + (mean_1 - mean_2) ** 2 * torch.exp(-log_var_2) - 1.0)


def _log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, without rounding Phi to 1: on the side of
    zero where both CDF values are small (Phi(u) - Phi(l) = Phi(-l) - Phi(-u)), then
    log Phi(a) + log(1 - Phi(b) / Phi(a))."""
    mirror = lower > 0
    a = torch.where(mirror, -lower, upper)
    b = torch.where(mirror, -upper, lower)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def discretized_gaussian_log_likelihood(
    x0: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor
) -> torch.Tensor:
    """Ho et al. 2020, eq. 13: log p(x0 | x_1) per element, in nats, for data on the 256 levels
    of [-1, 1]: the Gaussian's mass over the level's bin [x - 1/255, x + 1/255], the lowest bin
    open to -inf and the highest to +inf, so the 256 masses of a pixel sum to 1."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x0 + 1.0 / 255 - mean) * inv_std
    lower = (x0 - 1.0 / 255 - mean) * inv_std
    return torch.where(
        x0 < -0.999, torch.special.log_ndtr(upper),  # Phi(upper) - Phi(-inf)
        torch.where(x0 > 0.999, torch.special.log_ndtr(-lower),  # Phi(inf) - Phi(lower)
                    _log_normal_mass(lower, upper)))


def _bits_per_dim(per_element_nats: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` nats per element -> ``[B]`` bits per dimension."""
    return per_element_nats.flatten(1).mean(1) / math.log(2.0)


def vlb_term(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mean: torch.Tensor,
    log_var: torch.Tensor,
) -> torch.Tensor:
    """The bound's term at step t for p(x_{t-1} | x_t) = N(mean, e^log_var), per sample ``[B]``
    in bits per dimension (Ho et al. 2020, eq. 5):
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 (the paper's t > 1), and
    L_0 = -log p(x0 | x_1), the discretised decoder of eq. 13, at t = 0."""
    true_mean, _ = q_posterior(schedule, x0, x_t, t)
    true_log_var = extract(schedule.posterior_log_variance_clipped, t, x_t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var)
    decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, log_var)
    return _bits_per_dim(torch.where(broadcast_per_sample(t == 0, x0).bool(), decoder_nll, kl))


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample ``[B]`` in bits per dimension (eq. 5): no
    parameters, and near 0 when alpha_bar_T is (exactly 0 at zero terminal SNR)."""
    t_last = torch.full((x0.shape[0],), schedule.num_train_timesteps - 1, dtype=torch.long)
    alpha_bar = extract(schedule.alphas_cumprod, t_last, x0)
    mean = alpha_bar.sqrt() * x0
    log_var = torch.log1p(-alpha_bar).expand_as(x0)
    return _bits_per_dim(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0)))


def p_mean_log_variance(
    schedule: NoiseSchedule,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    prediction_type: str,
    variance: str,
    learned: bool,
    x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t) from the network's ``output`` at integer steps
    ``t`` ``[B]``: the posterior mean (eq. 7) at the predicted x0 (after ``x0_transform``), and
    the ``variance`` of :func:`model_log_variance` (``learned``: the output carries it)."""
    prediction, interpolation = split_variance(output, x_t.shape[1], learned)
    alpha_bar = extract(schedule.alphas_cumprod, t, x_t)
    _, x0_pred = eps_x0_from_prediction(prediction, x_t, alpha_bar, prediction_type)
    if x0_transform is not None:
        x0_pred = x0_transform(x0_pred)
    mean, _ = q_posterior(schedule, x0_pred, x_t, t)
    return mean, model_log_variance(schedule, t, x_t, variance, interpolation)


PREDICTION_TYPES = ("eps", "x0", "v")
PRECONDITIONINGS = ("none", "edm")
LOSS_WEIGHTINGS = ("uniform", "min-snr", "edm")
TIMESTEP_SAMPLINGS = ("uniform", "log-normal", "continuous")


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


def precondition(network: Callable[..., torch.Tensor], schedule: NoiseSchedule,
                 preconditioning: str, *, sigma_data: float, prediction_type: str
                 ) -> Callable[..., torch.Tensor]:
    """The denoiser that the samplers and the loss call, made of the ``network``: the network
    itself for ``"none"``; for ``"edm"`` Karras et al. 2022's preconditioning (sec. 5, Table 1).

    In EDM's variables x = x_t / sqrt(alpha_bar) = x0 + sigma eps, sigma^2 = (1 - alpha_bar) /
    alpha_bar, the network F sees c_in x and the denoised image is D = c_skip x + c_out F, with
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2): for data of standard deviation
    ``sigma_data`` both F's input and its ideal output have unit variance at every noise level.
    Written in x_t with d = 1 - alpha_bar + sigma_data^2 alpha_bar (= alpha_bar (sigma^2 +
    sigma_data^2)): the input is x_t / sqrt(d) and D = sigma_data^2 sqrt(alpha_bar) x_t / d +
    sigma_data sqrt(1 - alpha_bar) F / sqrt(d), finite at alpha_bar = 0 (zero terminal SNR).
    D is returned as ``prediction_type``'s quantity, so the samplers, the loss and its weights
    (all stated on the x0-error) need nothing else; with sigma_data = 1 and v it is v = -F.
    c_noise stays the step t itself: Table 1's choice for a VP schedule, (M - 1) t.

    The network is called as ``network(x_t, t, *args)`` with t int64 (the table's steps) or
    real-valued (:meth:`NoiseSchedule.alpha_bar_at`); a ``[B, 2C, H, W]`` output (learned
    variances) keeps its second half as it is.
    """
    if preconditioning == "none":
        return network
    if preconditioning != "edm":
        raise ValueError(f"unknown preconditioning {preconditioning!r}; choose one of "
                         f"{', '.join(PRECONDITIONINGS)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of "
                         f"{', '.join(PREDICTION_TYPES)}")

    def preconditioned(x_t: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        ab = alpha_bar_of(schedule, t)  # float64 [B]
        s, r, d = ab.sqrt(), (1 - ab).sqrt(), 1 - ab + sigma_data**2 * ab
        # The prediction is a x_t + b F. x0: D itself; eps: eq. 4 solved for eps; v: sqrt(ab) eps
        # - sqrt(1 - ab) x0. Each written out so that none divides by sqrt(1 - ab).
        a, b = {"x0": (sigma_data**2 * s / d, sigma_data * r / d.sqrt()),
                "eps": (r / d, -sigma_data * s / d.sqrt()),
                "v": ((1 - sigma_data**2) * s * r / d, -sigma_data / d.sqrt())}[prediction_type]
        c_in, a, b = (broadcast_per_sample(c, x_t) for c in (d.rsqrt(), a, b))
        output = network(x_t * c_in, t, *args, **kwargs)
        channels = x_t.shape[1]
        prediction = a * x_t + b * output[:, :channels].to(x_t.dtype)
        if output.shape[1] == channels:
            return prediction
        return torch.cat([prediction, output[:, channels:].to(x_t.dtype)], dim=1)

    return preconditioned


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


def _on_target(weight_x0: torch.Tensor, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A weight on the x0-error, carried onto the error of the network's own target.

    From eq. 4, ||x0 - x0_pred||^2 = ||eps - eps_pred||^2 / SNR, and from v's definition
    ||x0 - x0_pred||^2 = ||v - v_pred||^2 / (SNR + 1)."""
    if prediction_type == "eps":
        return weight_x0 / snr
    if prediction_type == "v":
        return weight_x0 / (snr + 1)
    return weight_x0


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Hang et al. 2023: weight min(SNR, gamma) on the x0-error, expressed for each target:
    min(SNR, gamma) / SNR on eps, min(SNR, gamma) / (SNR + 1) on v."""
    return _on_target(snr.clamp(max=gamma), snr, prediction_type)


def edm_weight(snr: torch.Tensor, sigma_data: float, prediction_type: str) -> torch.Tensor:
    """Karras et al. 2022, Table 1: lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    on the x0-error, at the noise level sigma^2 = (1 - alpha_bar) / alpha_bar = 1 / SNR, that is
    SNR + 1 / sigma_data^2; expressed for each target. (With sigma_data = 1 it is the uniform
    weight on v: v-prediction is EDM's preconditioning for data of unit variance.)"""
    return _on_target(snr + sigma_data ** -2, snr, prediction_type)


def timestep_probs(schedule: NoiseSchedule, sampling: str, *, log_sigma_mean: float = -1.2,
                   log_sigma_std: float = 1.2) -> torch.Tensor | None:
    """The law of t in training, ``[T]`` float64 on the schedule's device, or None for
    Algorithm 1's t ~ Uniform{0..T-1}.

    ``"log-normal"``: Karras et al. 2022, sec. 5 and Table 1, ln(sigma) ~ N(P_mean, P_std^2) for
    the noise level sigma = sqrt((1 - alpha_bar) / alpha_bar) = exp(-log_snr / 2) of x_t /
    sqrt(alpha_bar) = x0 + sigma eps. Each step takes the normal's mass between the midpoints of
    its ln(sigma) and its neighbours' (the first and the last step take the tails), so training
    spends its samples at the middle noise levels that decide the images.

    ``"continuous"`` (also None here: :func:`draw_t_eps` draws it): t ~ Uniform[0, T-1] real-valued,
    continuous time (Song et al. 2021), every level between the table's steps as likely.
    """
    if sampling in ("uniform", "continuous"):
        return None
    if sampling != "log-normal":
        raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of "
                         f"{', '.join(TIMESTEP_SAMPLINGS)}")
    log_sigma = -0.5 * schedule.log_snr  # [T], rising with t (+inf at a zero-SNR last step)
    edges = (log_sigma[1:] + log_sigma[:-1]) / 2  # [T - 1]
    cdf = torch.special.ndtr((edges - log_sigma_mean) / log_sigma_std)
    cdf = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])
    return cdf.diff()


def _elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if loss == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss == "huber":
        return F.smooth_l1_loss(pred, target, reduction="none")
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")


def draw_t_eps(
    schedule: NoiseSchedule, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
    probs: torch.Tensor | None = None, *, continuous: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's draws for a batch of ``shape``: t ~ Uniform{0..T-1} (or t ~ ``probs``, from
    :func:`timestep_probs`) and eps ~ N(0, I), on the generator's device, so a run is
    reproducible from the generator alone. With ``continuous``, t ~ Uniform[0, T-1] real-valued
    (float32, as the samplers give the network its steps between the table's)."""
    device = generator.device if generator is not None else None
    if continuous:
        t = torch.rand(shape[0], generator=generator, device=device) * (schedule.num_train_timesteps - 1)
    elif probs is None:
        t = torch.randint(0, schedule.num_train_timesteps, (shape[0],), generator=generator,
                          device=device)
    else:
        t = torch.multinomial(probs.to(device), shape[0], replacement=True, generator=generator)
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
    sigma_data: float = 0.5,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    learn_variance: bool = False,
) -> torch.Tensor:
    """The simplified objective L_simple (Algorithm 1), a scalar averaged over the batch, or
    with ``learn_variance`` L_hybrid (Nichol & Dhariwal 2021).

    t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t from eq. 4, and loss(target, network(x_t, t)) with the
    target eps (eq. 14), x0 or v; ``weighting="min-snr"`` weights each sample by min-SNR-gamma,
    ``"edm"`` by EDM's lambda(sigma) for data of standard deviation ``sigma_data``.
    ``t`` and ``eps`` may be given (a process's share of draws made for a whole batch); otherwise
    they are drawn here, from ``generator``. A network that learns its variances (``[B, 2C, H,
    W]`` out) adds lambda L_vlb, which trains the variance only.
    """
    if t is None and eps is None:
        t, eps = draw_t_eps(schedule, x0.shape, generator)
    elif t is None or eps is None:
        raise ValueError("give both t and eps, or neither")
    t, eps = t.to(x0.device), eps.to(x0.device, x0.dtype)
    x_t = q_sample(schedule, x0, t, eps)
    output = denoiser(x_t, t).float()
    prediction, interpolation = split_variance(output, x0.shape[1], learn_variance)
    table = alpha_bar_of(schedule, t)  # float64 [B]
    alpha_bar = broadcast_per_sample(table, x0)
    target = training_target(prediction_type, x0, eps, alpha_bar)
    # Eq. 14 for eps: || eps - eps_theta(sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, t) ||^2.
    per_sample = _elementwise_loss(prediction, target, loss).flatten(1).mean(1)  # [B]
    if weighting in ("min-snr", "edm"):
        snr = broadcast_per_sample(table / (1 - table), x0).flatten()
        per_sample = per_sample * (min_snr_weight(snr, min_snr_gamma, prediction_type)
                                   if weighting == "min-snr" else
                                   edm_weight(snr, sigma_data, prediction_type))
    elif weighting != "uniform":
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    if interpolation is not None:  # learn_variance
        if t.is_floating_point():
            raise ValueError("learned variances are trained on the table's steps (L_vlb's terms "
                             "are the posterior's at integer t); use --timestep-sampling uniform "
                             "with them")
        # Nichol & Dhariwal 2021, sec. 3.1: L_vlb reaches the variance only; the mean's gradient
        # is stopped, so L_simple alone shapes it.
        frozen = torch.cat([prediction.detach(), interpolation], dim=1)
        mean, log_var = p_mean_log_variance(schedule, frozen, x_t, t, learned=True,
                                            prediction_type=prediction_type, variance="learned")
        vlb = vlb_term(schedule, x0, x_t, t, mean, log_var)  # [B] bits/dim
        # Eq. 16, L_hybrid = L_simple + lambda L_vlb, with L_vlb = sum_t L_t estimated by T L_t.
        per_sample = per_sample + VLB_WEIGHT * schedule.num_train_timesteps * vlb
    return per_sample.mean()
