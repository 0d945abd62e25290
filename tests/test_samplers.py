"""Sampler exactness without any network: closed-form optimal denoisers for known data.

For data x0 ~ N(mu, s^2 I), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps is Gaussian and the optimal
epsilon-predictor is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). For a
mixture, it is the responsibility-weighted sum of the components' predictors.

Tolerances: the sampler with the optimal denoiser is linear for Gaussian data, so the exact mean
and variance of its output follow from a scalar recursion (``exact_output_moments``); the empirical
moments must match those within 5 standard errors, and the recursion itself must be within the
discretisation bias of 1000-step ancestral sampling of the data (below 1% in std for s = 0.5).
"""

import math

import pytest
import torch

from ddpm.samplers import ancestral_sample, initial_noise, make_timesteps
from ddpm.schedules import make_schedule


def gaussian_denoiser(schedule, mu, s):
    ab_all = schedule.alphas_cumprod

    def denoiser(x_t, t):
        ab = ab_all[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)

    return denoiser


def mixture_denoiser(schedule, weights, means, stds):
    """Image-level mixture: component k draws a whole image from N(means[k] 1, stds[k]^2 I)."""
    ab_all = schedule.alphas_cumprod

    def denoiser(x_t, t):
        ab = ab_all[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        dims = x_t[0].numel()
        log_r, preds = [], []
        for w, m, s in zip(weights, means, stds):
            var = ab * s**2 + 1 - ab  # [B, 1, 1, 1]
            diff = x_t - ab.sqrt() * m
            log_r.append(math.log(w) - 0.5 * (diff**2).flatten(1).sum(1) / var.flatten()
                         - 0.5 * dims * var.flatten().log())
            preds.append((1 - ab).sqrt() * diff / var)
        r = torch.softmax(torch.stack(log_r, 1), dim=1)  # [B, K] posterior responsibilities
        return sum(r[:, k].reshape(-1, 1, 1, 1) * preds[k] for k in range(len(weights)))

    return denoiser


def exact_output_moments(schedule, timesteps, mu, s, variance):
    """Mean and variance of the ancestral sampler's output with the optimal Gaussian denoiser."""
    ab = schedule.alphas_cumprod.tolist()
    m, v = 0.0, 1.0
    ts = list(timesteps)
    for t, tp in zip(ts, ts[1:] + [-1]):
        a, ap = ab[t], (ab[tp] if tp >= 0 else 1.0)
        beta = 1 - a / ap
        d = a * s * s + 1 - a
        c1, c2 = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
        gain = c1 * (1 - (1 - a) / d) / math.sqrt(a) + c2
        shift = c1 * (1 - a) / d * mu
        noise = 0.0 if tp < 0 else (beta * (1 - ap) / (1 - a) if variance == "posterior" else beta)
        m, v = gain * m + shift, gain * gain * v + noise
    return m, v


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ancestral_reproduces_gaussian_data(name, variance):
    mu, s = 0.3, 0.5
    schedule = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(1)
    x_T = initial_noise((4096, 1, 8, 8), g)
    ts = make_timesteps(1000, 1000)
    x0 = ancestral_sample(gaussian_denoiser(schedule, mu, s), schedule, x_T, ts,
                          generator=g, variance=variance, clip_x0=False)
    n = x0.numel()
    exact_m, exact_v = exact_output_moments(schedule, ts, mu, s, variance)
    # Empirical vs the sampler's exact output law: 5 standard errors.
    assert x0.mean().item() == pytest.approx(exact_m, abs=5 * math.sqrt(exact_v / n))
    assert x0.var().item() == pytest.approx(exact_v, abs=5 * exact_v * math.sqrt(2 / n))
    # The sampler's law vs the data: discretisation bias only.
    assert exact_m == pytest.approx(mu, abs=1e-4)
    assert math.sqrt(exact_v) == pytest.approx(s, rel=0.01)


def test_ancestral_reproduces_mixture_weights_and_components():
    weights, means, stds = (0.3, 0.7), (-0.5, 0.5), (0.2, 0.2)
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(2)
    n_images = 4000
    x_T = initial_noise((n_images, 1, 4, 4), g)
    x0 = ancestral_sample(mixture_denoiser(schedule, weights, means, stds), schedule, x_T,
                          make_timesteps(1000, 1000), generator=g, clip_x0=False)
    image_means = x0.flatten(1).mean(1)
    first = image_means < 0  # component means -0.5 / +0.5, image-mean std 0.05: no overlap
    frac = first.float().mean().item()
    # Binomial standard error sqrt(w (1 - w) / N) = 0.0072; allow 4 of them.
    assert frac == pytest.approx(weights[0], abs=4 * math.sqrt(0.21 / n_images))
    for k, sel in enumerate([first, ~first]):
        pixels = x0[sel]
        se = stds[k] / math.sqrt(pixels.numel())
        assert pixels.mean().item() == pytest.approx(means[k], abs=5 * se + 1e-3)
        # ancestral sampling's discretisation shrinks std by ~2% at s = 0.2 (see the recursion)
        assert pixels.std().item() == pytest.approx(stds[k], rel=0.04)


def test_respaced_ancestral_also_converges():
    """100 respaced steps still sample Gaussian data closely (betas recomputed from alpha_bar)."""
    mu, s = -0.2, 0.6
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(3)
    ts = make_timesteps(1000, 100)
    x0 = ancestral_sample(gaussian_denoiser(schedule, mu, s), schedule,
                          initial_noise((4096, 1, 8, 8), g), ts, generator=g, clip_x0=False,
                          variance="beta")
    exact_m, exact_v = exact_output_moments(schedule, ts, mu, s, "beta")
    n = x0.numel()
    assert x0.mean().item() == pytest.approx(exact_m, abs=5 * math.sqrt(exact_v / n))
    assert x0.var().item() == pytest.approx(exact_v, abs=5 * exact_v * math.sqrt(2 / n))
    assert math.sqrt(exact_v) == pytest.approx(s, rel=0.03)


def test_same_seed_same_samples_and_callback_sees_every_step():
    schedule = make_schedule("linear", 50)
    den = gaussian_denoiser(schedule, 0.0, 0.5)
    seen = []

    def run(seed, callback=None):
        g = torch.Generator().manual_seed(seed)
        return ancestral_sample(den, schedule, initial_noise((2, 1, 4, 4), g),
                                make_timesteps(50, 50), generator=g, callback=callback)

    a = run(7, callback=lambda i, t, x_t, x0: seen.append((i, t, x0.shape)))
    assert torch.equal(a, run(7)) and not torch.equal(a, run(8))
    assert [t for _, t, _ in seen] == list(range(49, -1, -1))
    assert [i for i, _, _ in seen] == list(range(50))


def test_timesteps_are_validated():
    assert make_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert make_timesteps(1000, 1) == [999]
    ts = make_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10
    with pytest.raises(ValueError, match="between 1 and the 1000"):
        make_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="strictly descending"):
        ancestral_sample(lambda x, t: x, make_schedule("linear", 10), torch.zeros(1, 1, 2, 2),
                         [3, 5, 1])
