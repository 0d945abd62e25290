"""samplers.py, timesteps.py and toy.py: sampler exactness without any network, with closed-form
optimal denoisers (toy.py) for known data, on the timestep arrays of timesteps.py.

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

from ddpm.samplers import ancestral_sample, ddim_sample, initial_noise
from ddpm.schedules import broadcast_per_sample, make_schedule
from ddpm.timesteps import make_timesteps
from ddpm.toy import gaussian_denoiser, gaussian_reverse_variance, mixture_denoiser

from conftest import MU, S


def exact_output_moments(schedule, timesteps, mu, s, variance):
    """Mean and variance of the ancestral sampler's output with the optimal Gaussian denoiser."""
    ab = schedule.alphas_cumprod.tolist()
    m, v = 0.0, 1.0
    ts = list(timesteps)
    for t, tp in zip(ts, ts[1:] + [-1], strict=True):
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
    x_T = initial_noise((2048, 1, 8, 8), g)
    ts = make_timesteps(1000, 1000)
    x0 = ancestral_sample(gaussian_denoiser(schedule, mu, s), schedule, x_T, ts,
                          generator=g, variance=variance, x0_transform=None)
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
                          make_timesteps(1000, 1000), generator=g, x0_transform=None)
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
                          initial_noise((4096, 1, 8, 8), g), ts, generator=g, x0_transform=None,
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
        ancestral_sample(lambda x, t: x, make_schedule("linear", 50), torch.zeros(1, 1, 2, 2),
                         [3, 5, 1])


# --- every sampler, against closed forms ---------------------------------------------------------

from ddpm.diffusion import eps_x0_from_prediction, training_target  # noqa: E402
from ddpm.samplers import SAMPLERS, get_sampler, sampler_spec  # noqa: E402
from ddpm.timesteps import SPACINGS  # noqa: E402

# Step counts suited to each sampler and the discretisation tolerance on the output std,
# from the order-of-convergence measurements below (error ~ C / N^p on the linear schedule):
# DDIM and Euler at 100 steps are 3% off, DPM-Solver++(2M) at 20 steps 1.5%, Heun at 20 steps 5%.
# The score-SDE samplers (closer checks in tests/test_sde.py): PC's Langevin corrector sizes
# each image's step from |z| / |score| (Song et al. 2021, Algorithm 5), which widens the law by
# ~2% at its default snr 0.16 in 256 dimensions but by 10-14% in the mixture's 16, where those
# norms vary most from image to image (measured); annealed Langevin keeps 6-7% of excess std at
# 200 levels; the probability-flow ODE is adaptive, its steps set by its tolerances.
STEPS_AND_STD_TOLERANCE = {"ddpm": (1000, 0.01), "ddim": (100, 0.04), "euler": (100, 0.04),
                           "dpm++": (20, 0.02), "heun": (20, 0.06), "pc": (200, 0.12),
                           "langevin": (200, 0.1), "ode": (2, 0.01)}


def _run(name, denoiser, schedule, x_T, n, generator=None, **kw):
    ts = make_timesteps(schedule.num_train_timesteps, n, sampler_spec(name).default_spacing,
                        schedule=schedule)
    return get_sampler(name)(denoiser, schedule, x_T, ts, generator=generator, x0_transform=None, **kw)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_reproduces_gaussian_data(name):
    mu, s = 0.3, 0.5
    n, tol = STEPS_AND_STD_TOLERANCE[name]
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(11)
    x = _run(name, gaussian_denoiser(schedule, mu, s), schedule, initial_noise((1024, 1, 8, 8), g), n, g)
    se_mean = s / math.sqrt(x.numel())
    # x_T ~ N(0, I) rather than the exact marginal at t = T-1 shifts the mean by ~sqrt(ab_T) mu.
    assert x.mean().item() == pytest.approx(mu, abs=5 * se_mean + 2e-3)
    assert x.std().item() == pytest.approx(s, rel=tol + 5 * math.sqrt(1 / (2 * x.numel())))


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_reproduces_mixture_weights(name):
    weights, means, stds = (0.3, 0.7), (-0.5, 0.5), (0.2, 0.2)
    n, tol = STEPS_AND_STD_TOLERANCE[name]
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(12)
    n_images = 3000
    x = _run(name, mixture_denoiser(schedule, weights, means, stds), schedule,
             initial_noise((n_images, 1, 4, 4), g), n, g)
    first = x.flatten(1).mean(1) < 0
    # binomial standard error sqrt(0.21 / N) = 0.0084; 4 of them
    assert first.float().mean().item() == pytest.approx(weights[0], abs=4 * math.sqrt(0.21 / n_images))
    for k, sel in enumerate([first, ~first]):
        assert x[sel].mean().item() == pytest.approx(means[k], abs=0.01)
        assert x[sel].std().item() == pytest.approx(stds[k], rel=tol + 0.03)


def _exact_ode_solution(schedule, x_T, mu, s):
    """The probability-flow ODE for N(mu, s^2) data, solved in closed form: with x_hat = x /
    sqrt(ab) and sigma = sqrt((1 - ab) / ab), x_hat(sigma) = mu + (x_hat_T - mu) sqrt(s^2 + sigma^2)
    / sqrt(s^2 + sigma_T^2). Every sampler ends by denoising from t = 0 (sigma_min) to the data,
    x0 = D(x_hat) = mu + (x_hat - mu) s^2 / (s^2 + sigma_min^2), so that step is applied too."""
    ab_T, ab_0 = schedule.alphas_cumprod[-1].item(), schedule.alphas_cumprod[0].item()
    sigma_T, sigma_min = math.sqrt((1 - ab_T) / ab_T), math.sqrt((1 - ab_0) / ab_0)
    x_hat_min = mu + (x_T / math.sqrt(ab_T) - mu) * math.sqrt(s**2 + sigma_min**2) / math.sqrt(
        s**2 + sigma_T**2)
    return mu + (x_hat_min - mu) * s**2 / (s**2 + sigma_min**2)


@pytest.mark.parametrize("name, order", [("ddim", 1), ("euler", 1), ("dpm++", 2), ("heun", 2)])
def test_order_of_convergence(name, order):
    """Error against the exact ODE solution falls like N^-order over 10..80 steps."""
    mu, s = 0.3, 0.5
    schedule = make_schedule("linear", 1000)
    x_T = initial_noise((64, 1, 4, 4), torch.Generator().manual_seed(5)).double()
    exact = _exact_ode_solution(schedule, x_T, mu, s)
    steps = [10, 20, 40, 80]
    errors = [(_run(name, gaussian_denoiser(schedule, mu, s), schedule, x_T, n) - exact).abs().max().item()
              for n in steps]
    # least-squares slope of log(error) against log(steps)
    xs, ys = [math.log(n) for n in steps], [math.log(e) for e in errors]
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - xm) * (b - ym) for a, b in zip(xs, ys, strict=True)) / sum((a - xm) ** 2 for a in xs)
    assert -slope == pytest.approx(order, abs=0.3), f"errors {errors}"
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), f"errors {errors}"


def churn_output_moments(schedule, timesteps, mu, s, churn, second_order):
    """Mean and variance of Euler/Heun's output with churn (Karras et al. 2022, Algorithm 2)
    and the optimal denoiser of N(mu, s^2) data, written out independently of the sampler.

    In y = x_hat - mu the slope is d = y sigma / (s^2 + sigma^2), since D(x_hat; sigma) = mu +
    y s^2 / (s^2 + sigma^2): every step multiplies y by a number, and the churn adds independent
    noise of variance sigma_hat^2 - sigma^2, so (mean, variance) follow a scalar recursion."""
    from ddpm.samplers import CHURN_SIGMA_MAX, CHURN_SIGMA_MIN

    def sigma(t):
        ab = schedule.alpha_bar_scalar(t) if t >= 0 else 1.0
        return math.sqrt((1 - ab) / ab)

    def slope(level):  # d / y
        return level / (s**2 + level**2)

    ts = list(timesteps)
    gamma = min(churn / len(ts), math.sqrt(2) - 1)
    top = sigma(schedule.num_train_timesteps - 1)
    m, v = -mu, 1 / schedule.alpha_bar_scalar(ts[0])  # x_hat_T = x_T / sqrt(ab_T), x_T ~ N(0, I)
    for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
        level, level_prev = sigma(t), sigma(t_prev)
        if gamma > 0 and CHURN_SIGMA_MIN <= level <= CHURN_SIGMA_MAX:
            raised = min((1 + gamma) * level, top)
            v += raised**2 - level**2
            level = raised
        h = level_prev - level
        gain = 1 + h * slope(level)  # Euler
        if second_order and level_prev > 0:
            gain = 1 + h / 2 * (slope(level) + slope(level_prev) * (1 + h * slope(level)))
        m, v = gain * m, gain**2 * v
    return mu + m, v


@pytest.mark.parametrize("name, n", [("heun", 80), ("euler", 400)])
def test_churn_samples_the_law_its_recursion_says_and_the_data(name, n):
    """Algorithm 2's churn (S_churn = 40) with the optimal Gaussian denoiser: the output's mean
    and variance are those of the scalar recursion above (5 standard errors); and that law
    converges to the data's: its std is within 4% of the data's and its error falls by more than
    1.6x when the steps double (the recursion gives 0.0084 -> 0.0025 from 80 to 160 Heun steps,
    0.0156 -> 0.0081 from 400 to 800 Euler steps; a sampler that stopped converging, or added the
    wrong noise, would not)."""
    mu, s = 0.3, 0.5
    schedule = make_schedule("linear", 1000)
    ts = make_timesteps(1000, n, "karras", schedule=schedule)
    g = torch.Generator().manual_seed(21)
    x_T = initial_noise((2048, 1, 8, 8), g).double()
    x = get_sampler(name)(gaussian_denoiser(schedule, mu, s), schedule, x_T, ts, generator=g,
                          x0_transform=None, churn=40.0)
    exact_m, exact_v = churn_output_moments(schedule, ts, mu, s, 40.0, name == "heun")
    plain_m, plain_v = churn_output_moments(schedule, ts, mu, s, 0.0, name == "heun")
    assert exact_v != pytest.approx(plain_v, rel=1e-3), "the churn must change the law"
    count = x.numel()
    assert x.mean().item() == pytest.approx(exact_m, abs=5 * math.sqrt(exact_v / count))
    assert x.var().item() == pytest.approx(exact_v, rel=5 * math.sqrt(2 / count))
    assert exact_m == pytest.approx(mu, abs=2e-3)  # x_T ~ N(0, I), not the exact marginal
    twice = make_timesteps(1000, 2 * n, "karras", schedule=schedule)
    _, finer_v = churn_output_moments(schedule, twice, mu, s, 40.0, name == "heun")
    error, finer_error = abs(math.sqrt(exact_v) - s), abs(math.sqrt(finer_v) - s)
    assert error < 0.04 * s and finer_error < error / 1.6, (error, finer_error)


def test_zero_churn_is_the_ode_sampler_bit_for_bit_and_churn_needs_its_generator():
    schedule = make_schedule("linear", 1000)
    den = gaussian_denoiser(schedule, 0.3, 0.5)
    ts = make_timesteps(1000, 10, "karras", schedule=schedule)
    x_T = initial_noise((8, 1, 4, 4), torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    for name in ("euler", "heun"):
        plain = get_sampler(name)(den, schedule, x_T, ts)
        zero = get_sampler(name)(den, schedule, x_T, ts, generator=g, churn=0.0)
        assert torch.equal(plain, zero) and torch.equal(g.get_state(), state)  # no draw either
        a = get_sampler(name)(den, schedule, x_T, ts, churn=10.0,
                              generator=torch.Generator().manual_seed(1))
        b = get_sampler(name)(den, schedule, x_T, ts, churn=10.0,
                              generator=torch.Generator().manual_seed(1))
        c = get_sampler(name)(den, schedule, x_T, ts, churn=10.0,
                              generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
        with pytest.raises(ValueError, match="churn must be a finite number >= 0, got -1"):
            get_sampler(name)(den, schedule, x_T, ts, churn=-1.0)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_prediction_conversions_are_exact_inverses(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9999, 0.7, 0.2, 1e-4], dtype=torch.float64).reshape(4, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = training_target(prediction_type, x0, eps, ab)
    eps_back, x0_back = eps_x0_from_prediction(target, x_t, ab, prediction_type)
    assert torch.allclose(eps_back, eps, atol=1e-9) and torch.allclose(x0_back, x0, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["x0", "v"])
def test_samplers_work_with_every_prediction_type(prediction_type):
    """The optimal x0 or v predictor, built from the eps one, samples the same law."""
    mu, s = 0.3, 0.5
    schedule = make_schedule("linear", 1000)
    eps_den = gaussian_denoiser(schedule, mu, s)

    def denoiser(x_t, t):
        ab = broadcast_per_sample(schedule.alpha_bar_at(t.double().cpu()), x_t)  # [B, 1, 1, 1]
        eps = eps_den(x_t, t)
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return training_target(prediction_type, x0, eps, ab)

    # The adaptive ODE solver at its default tolerances (1e-5) may accept a step with one
    # predictor and reject it with the other, and then lands as far apart as its tolerance
    # (2e-5, measured); at 1e-9 both take the same steps.
    options = {"ode": {"ode_rtol": 1e-9, "ode_atol": 1e-9}}
    for name in SAMPLERS:
        n = STEPS_AND_STD_TOLERANCE[name][0] if name != "ddpm" else 100
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        x_T = initial_noise((64, 1, 4, 4), torch.Generator().manual_seed(4)).double()
        a = _run(name, eps_den, schedule, x_T, n, g1, **options.get(name, {}))
        b = _run(name, denoiser, schedule, x_T, n, g2, prediction_type=prediction_type,
                 **options.get(name, {}))
        assert torch.allclose(a, b, atol=1e-6), name


def test_respaced_ancestral_with_all_steps_is_algorithm_2():
    """Ho et al.'s Algorithm 2 written out with the schedule's own betas, independently."""
    schedule = make_schedule("cosine", 200)
    den = gaussian_denoiser(schedule, 0.1, 0.4)
    x_T = initial_noise((16, 1, 4, 4), torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    got = ancestral_sample(den, schedule, x_T, make_timesteps(200, 200), generator=g,
                           x0_transform=None, variance="beta")
    g = torch.Generator().manual_seed(1)
    x = x_T
    for t in range(199, -1, -1):
        beta, ab = schedule.betas[t].item(), schedule.alphas_cumprod[t].item()
        eps = den(x, torch.full((16,), t))
        mean = (x - beta / math.sqrt(1 - ab) * eps) / math.sqrt(1 - beta)  # Algorithm 2, line 4
        x = mean + math.sqrt(beta) * torch.randn(x.shape, generator=g, dtype=x.dtype) if t > 0 else mean
    assert torch.allclose(got, x, atol=1e-10)


def test_ddim_eta_one_matches_ancestral_law():
    """DDIM with eta = 1 has sigma_t^2 = beta-tilde_t: the DDPM posterior sampler (Song et al.)."""
    mu, s = 0.3, 0.5
    schedule = make_schedule("linear", 1000)
    ts = make_timesteps(1000, 50)
    _, v_ddpm = exact_output_moments(schedule, ts, mu, s, "posterior")
    g = torch.Generator().manual_seed(8)
    x = ddim_sample(gaussian_denoiser(schedule, mu, s), schedule, initial_noise((4096, 1, 8, 8), g), ts,
                    generator=g, x0_transform=None, eta=1.0)
    assert x.var().item() == pytest.approx(v_ddpm, rel=5 * math.sqrt(2 / x.numel()) + 1e-3)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing", "karras", "logsnr"])
@pytest.mark.parametrize("n", [1, 7, 50, 1000])
def test_spacings_are_descending_and_in_range(spacing, n):
    schedule = make_schedule("linear", 1000)
    ts = make_timesteps(1000, n, spacing, schedule=schedule)
    assert len(ts) == n and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert 0 <= ts[-1] and ts[0] <= 999
    if spacing == "trailing":
        assert ts[0] == 999
    if spacing == "leading":
        assert ts[-1] == 0


def test_dynamic_thresholding():
    from ddpm.samplers import dynamic_threshold

    x0 = torch.zeros(2, 1, 10, 10)
    x0[0] = 0.5  # inside [-1, 1]: untouched
    x0[1] = torch.linspace(-3, 3, 100).reshape(1, 10, 10)
    out = dynamic_threshold(x0, 0.9)
    assert torch.equal(out[0], x0[0])
    s = torch.quantile(x0[1].abs().flatten(), 0.9)
    assert torch.allclose(out[1], x0[1].clamp(-s, s) / s)
    assert out[1].abs().max() <= 1 + 1e-6


# --- zero terminal SNR (Lin et al. 2024) -----------------------------------------------------------


def test_zero_terminal_snr_schedule():
    plain = make_schedule("linear", 1000)
    z = make_schedule("linear", 1000, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0 and z.betas[-1].item() == pytest.approx(1.0)
    assert z.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert (z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all()
    # Algorithm 1 of Lin et al.: sqrt(ab) is shifted and scaled, i.e. affine in the old one.
    old, new = plain.alphas_cumprod.sqrt(), z.alphas_cumprod.sqrt()
    slope = (new[0] - new[500]) / (old[0] - old[500])
    assert torch.allclose(new, new[0] + slope * (old - old[0]), atol=1e-12)
    assert torch.isfinite(z.alpha_bar_at(torch.tensor([998.0, 998.5, 999.0]))).all()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_samplers_at_zero_terminal_snr(name, prediction_type):
    mu, s = 0.3, 0.5
    schedule = make_schedule("linear", 1000, zero_terminal_snr=True)
    n, tol = STEPS_AND_STD_TOLERANCE[name]
    g = torch.Generator().manual_seed(21)
    x = _run(name, gaussian_denoiser(schedule, mu, s, prediction_type), schedule,
             initial_noise((1024, 1, 8, 8), g), n, g, prediction_type=prediction_type)
    assert torch.isfinite(x).all()
    # x_T ~ N(0, I) is now the exact marginal at t = T-1, so no start-up bias in the mean
    assert x.mean().item() == pytest.approx(mu, abs=5 * s / math.sqrt(x.numel()))
    assert x.std().item() == pytest.approx(s, rel=tol + 5 * math.sqrt(1 / (2 * x.numel())))


def test_zero_terminal_snr_refuses_eps_and_the_ode_samplers():
    from ddpm.config import DiffusionConfig

    with pytest.raises(ValueError, match="use prediction_type v"):
        DiffusionConfig(zero_terminal_snr=True, prediction_type="eps").validate()
    schedule = make_schedule("linear", 1000, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        make_timesteps(1000, 10, "karras", schedule=schedule)
    with pytest.raises(ValueError, match="infinite at zero terminal SNR"):
        get_sampler("euler")(gaussian_denoiser(schedule, 0, 1, "v"), schedule,
                             torch.zeros(1, 1, 2, 2), make_timesteps(1000, 10), prediction_type="v")


def test_each_sampler_record_names_settings_its_function_takes():
    """A sampler's options are SampleConfig settings passed under their own names: a record whose
    option the function does not take, or that no setting declares, would fail only when used."""
    import dataclasses
    import inspect

    from ddpm.config import SampleConfig
    from ddpm.samplers import SAMPLER_SPECS
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    for spec in SAMPLER_SPECS.values():
        parameters = inspect.signature(spec.function).parameters
        for option in spec.options:
            assert option in parameters and option in fields, (spec.name, option)
        assert spec.default_spacing in SPACINGS, spec.name


@pytest.mark.parametrize("name,steps,evaluations", [("heun", 18, 35), ("euler", 18, 18),
                                                     ("dpm++", 20, 20), ("ddpm", 1, 1)])
def test_evaluations_per_image_follow_the_sampler_order(name, steps, evaluations):
    from ddpm.samplers import sampler_spec
    assert sampler_spec(name).evaluations(steps) == evaluations


# --- learned variances (Nichol & Dhariwal 2021, eq. 15) on the toy of conftest's MU, S ------------


def _exact_variance_denoiser(schedule, timesteps):
    """The toy's optimal eps with, as its second C channels, the interpolation that gives the
    true Var(x_{t_prev} | x_t) over the sampler's respaced pair (eq. 15 solved for v)."""
    base = gaussian_denoiser(schedule, MU, S)
    following = dict(zip(timesteps, timesteps[1:] + [-1], strict=True))

    def denoiser(x_t, t):
        eps = base(x_t, t)
        step = int(t[0])
        prev = following[step]
        if prev < 0:
            return torch.cat([eps, torch.zeros_like(eps)], 1)
        ab, ab_prev = schedule.alpha_bar_scalar(step), schedule.alpha_bar_scalar(prev)
        beta = 1 - ab / ab_prev
        beta_tilde = beta * (1 - ab_prev) / (1 - ab)
        var = gaussian_reverse_variance(schedule, S, step, prev)
        v = (math.log(var) - math.log(beta_tilde)) / (math.log(beta) - math.log(beta_tilde))
        return torch.cat([eps, torch.full_like(eps, 2 * v - 1)], 1)

    return denoiser


@pytest.mark.parametrize("steps", [50, 1000])
def test_sampling_with_the_exact_variance_reproduces_the_toy_law(steps):
    schedule = make_schedule("linear", 1000)
    ts = make_timesteps(1000, steps, "linspace")
    n = 8000 * 4  # 8,000 images of 4 independent pixels
    x_T = torch.randn(8000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    out = ancestral_sample(_exact_variance_denoiser(schedule, ts), schedule, x_T, ts,
                           x0_transform=None, variance="learned",
                           generator=torch.Generator().manual_seed(4))
    mean_se, std_se = S / math.sqrt(n), S / math.sqrt(2 * n)
    assert abs(out.mean().item() - MU) < 4 * mean_se
    assert abs(out.std().item() - S) < 4 * std_se
    if steps == 50:  # the fixed variances are wrong at 50 steps: the test can tell
        fixed = ancestral_sample(gaussian_denoiser(schedule, MU, S), schedule, x_T, ts,
                                 x0_transform=None, variance="posterior",
                                 generator=torch.Generator().manual_seed(4))
        assert abs(fixed.std().item() - S) > 10 * std_se


def test_ddim_with_a_learned_variance_at_its_lower_end_is_ddim_eta_one():
    schedule = make_schedule("linear", 1000)
    ts = make_timesteps(1000, 20, "linspace")
    base = gaussian_denoiser(schedule, MU, S)
    low = lambda x, t: torch.cat([base(x, t), -torch.ones_like(x)], 1)  # noqa: E731, v = 0
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    got = ddim_sample(low, schedule, x_T, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    want = ddim_sample(base, schedule, x_T, ts, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    high = lambda x, t: torch.cat([base(x, t), torch.ones_like(x)], 1)  # noqa: E731, beta_t
    assert not torch.allclose(ddim_sample(high, schedule, x_T, ts, eta=1.0,
                                          generator=torch.Generator().manual_seed(1)), want, atol=1e-3)
