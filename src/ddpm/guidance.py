"""Guidance: a sampler walks a guided denoiser as it walks the network.

* :func:`classifier_free_guidance`: the conditional and unconditional predictions of one network
  mixed (Ho & Salimans 2022);
* :func:`classifier_guidance`: the prediction shifted by a classifier's gradient (Dhariwal &
  Nichol 2021, Algorithm 2), for the deterministic samplers; the ancestral sampler shifts its
  mean instead (``ancestral_sample(guidance_grad=)``, their Algorithm 1);
* :func:`classifier_log_prob_grad`: that gradient, grad_x sum_i log p_phi(y_i | x_t_i, t_i), of a
  noise-aware classifier (:mod:`ddpm.noisy_classifier`), callable from the samplers, which run
  under ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .diffusion import Denoiser, eps_x0_from_prediction, split_variance, training_target
from .samplers import GuidanceGrad
from .schedules import NoiseSchedule, broadcast_per_sample

# A class-conditional network: (x_t [B, C, H, W], t [B], y [B]) -> prediction [B, C, H, W].
ConditionalDenoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    model: ConditionalDenoiser, labels: torch.Tensor, null_label: int, scale: float
) -> Denoiser:
    """The guided denoiser every sampler can walk (Ho & Salimans 2022, eq. 6):
    eps~(z, c) = (1 + w) eps(z, c) - w eps(z), with w = ``scale`` and eps(z) the network given
    ``null_label``. The same mix is right for x0 and v predictions, since each is affine in eps
    with weights that sum to one at fixed x_t and t. w = 0 is the conditional model alone (one
    evaluation per step); otherwise both evaluations run as one batch of 2B."""
    if scale < 0:
        raise ValueError(f"the guidance scale must be 0 or more, got {scale}")

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = labels.to(x_t.device)
        if scale == 0:
            return model(x_t, t, y)
        null = torch.full_like(y, null_label)
        cond, uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        c = x_t.shape[1]  # a learned variance (channels C..2C) is the conditional model's, unmixed
        guided = cond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])  # = (1 + w) cond - w uncond
        return torch.cat([guided, cond[:, c:]], dim=1) if cond.shape[1] > c else guided

    return denoiser


def classifier_guidance(
    denoiser: Denoiser, schedule: NoiseSchedule, grad: GuidanceGrad, prediction_type: str
) -> Denoiser:
    """Dhariwal & Nichol 2021, Algorithm 2, for the deterministic samplers (and DDIM at any eta):
    eps-hat = eps - sqrt(1 - alpha_bar_t) s grad log p(y | x_t), returned as the prediction type
    the network makes (x0 and v follow from eps-hat through eq. 4). A learned variance passes
    through unchanged. At alpha_bar_t = 0 (pure noise) x0 is undefined, and the step is left
    unguided. (Ancestral sampling shifts its mean instead: ``ancestral_sample(guidance_grad=)``.)"""

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = denoiser(x_t, t)
        prediction, interpolation = split_variance(
            output, x_t.shape[1], output.shape[1] == 2 * x_t.shape[1])
        alpha_bar = schedule.alpha_bar_at(t.double().cpu())  # [B], on the host
        if bool((alpha_bar == 0).any()):
            return output
        alpha_bar = broadcast_per_sample(alpha_bar, x_t)  # [B, 1, 1, 1]
        eps, _ = eps_x0_from_prediction(prediction, x_t, alpha_bar, prediction_type)
        eps_hat = eps - (1 - alpha_bar).sqrt() * grad(x_t, t).to(eps.dtype)
        _, x0_hat = eps_x0_from_prediction(eps_hat, x_t, alpha_bar, "eps")  # eq. 4
        prediction = training_target(prediction_type, x0_hat, eps_hat, alpha_bar)
        return prediction if interpolation is None else torch.cat([prediction, interpolation], 1)

    return guided


def classifier_log_prob_grad(clf_model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor,
                             y: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} sum_i log p_phi(y_i | x_t_i, t_i) ``[B, C, H, W]``, where log p_phi is the log
    softmax of the classifier's logits ``[B, K]`` (Dhariwal & Nichol 2021, Algorithms 1 and 2).

    ``t`` ``[B]`` (int64, or float for real-valued steps) is passed on as it is; ``y`` is
    int64 ``[B]``. The gradient is taken in the classifier's dtype (float32 as loaded; float64
    in checks), with autocast off, in a normal autograd context even when called from inside
    ``torch.inference_mode()`` or ``torch.no_grad()``, as the samplers call it. Returns a
    detached tensor in ``x_t``'s dtype and device. Each sample's gradient depends only on
    that sample (the classifier mixes nothing across the batch).
    """
    dtype = next(clf_model.parameters()).dtype
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(x_t.device.type, enabled=False):
        # Clones made here are normal tensors: inference tensors cannot be saved for backward.
        x = x_t.detach().clone().to(dtype).requires_grad_(True)  # [B, C, H, W]
        logits = clf_model(x, t.clone())  # [B, K]
        log_p = torch.log_softmax(logits.to(dtype), dim=1)  # [B, K]
        selected = log_p.gather(1, y.clone().long().to(logits.device)[:, None])  # [B, 1]
        (grad,) = torch.autograd.grad(selected.sum(), x)
    return grad.detach().to(dtype=x_t.dtype, device=x_t.device)
