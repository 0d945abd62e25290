"""The variational bound and learned variances (Ho et al. 2020, eq. 5 and 13; Nichol & Dhariwal
2021, eq. 15 and 16), against closed forms and independent computations in float64."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import (
    VLB_WEIGHT,
    discretized_gaussian_log_likelihood,
    interpolated_log_variance,
    model_log_variance,
    normal_kl,
    p_mean_log_variance,
    prior_bpd,
    q_sample,
    training_loss,
    vlb_term,
)
from ddpm.samplers import ancestral_sample, ddim_sample, make_timesteps
from ddpm.schedules import extract, make_schedule
from ddpm.toy import gaussian_denoiser, gaussian_reverse_variance

SQRT2 = math.sqrt(2.0)


def _cdf(z: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF from erf, in float64 (independent of torch.special.ndtr)."""
    return 0.5 * (1 + torch.erf(z / SQRT2))


# --- the bound's pieces ---------------------------------------------------------------------------


def test_normal_kl_is_the_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(500, generator=g, dtype=torch.float64) for _ in range(4))
    got = normal_kl(m1, lv1, m2, lv2)
    v1, v2 = lv1.exp(), lv2.exp()
    # KL(N1 || N2) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2
    closed = torch.log(v2.sqrt() / v1.sqrt()) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5
    torch.testing.assert_close(got, closed, rtol=1e-12, atol=1e-12)
    reference = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                                  torch.distributions.Normal(m2, v2.sqrt()))
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-12)
    assert (got >= 0).all() and normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


@pytest.mark.parametrize("mean, std", [(0.0, 0.1), (0.3, 0.01), (-0.98, 0.05), (0.5, 2.0),
                                       (0.99, 0.003)])
def test_decoder_bins_sum_to_one_and_match_the_normal_cdf(mean, std):
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values of [-1, 1]
    mean_t = torch.full_like(levels, mean)
    log_var = torch.full_like(levels, 2 * math.log(std))
    log_p = discretized_gaussian_log_likelihood(levels, mean_t, log_var)
    probs = log_p.exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)
    # Independently: the mass of N(mean, std^2) on each bin, edges at the midpoints, the
    # outermost bins open.
    edges = torch.cat([torch.tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2,
                       torch.tensor([math.inf])]).double()
    mass = _cdf((edges[1:] - mean) / std) - _cdf((edges[:-1] - mean) / std)
    big = mass > 1e-6  # where the erf difference itself is accurate
    torch.testing.assert_close(probs[big], mass[big], rtol=1e-8, atol=1e-12)
    assert torch.isfinite(log_p).all()  # far tails too: log-probabilities, never log 0


def test_decoder_far_tail_is_finite_and_exact():
    # A level 40 standard deviations from the mean: Phi differences round to 0 in a naive
    # computation; the log of the mass must still be right: log(Phi(-a) - Phi(-b)) for
    # a = 40 -> close to log phi(40) - log 40 (Mills' ratio), within the bin's width.
    x = torch.tensor([0.0], dtype=torch.float64)
    std = 0.001
    mean = x - 40 * std - 1 / 255
    got = discretized_gaussian_log_likelihood(x, mean, torch.tensor([2 * math.log(std)]).double())
    a = 40.0  # the bin's lower edge, in standard deviations
    mills = -a * a / 2 - math.log(a * math.sqrt(2 * math.pi)) + math.log1p(-1 / a**2)
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(mills, abs=1e-3)


def test_prior_term_is_the_kl_to_the_standard_normal():
    schedule = make_schedule("linear", 1000)
    x0 = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    ab = schedule.alphas_cumprod[-1].item()
    kl = 0.5 * (-math.log(1 - ab) + (1 - ab) + ab * x0**2 - 1)
    assert prior_bpd(schedule, x0).item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-12)
    zero = make_schedule("linear", 1000, zero_terminal_snr=True)
    assert prior_bpd(zero, x0).item() == 0.0


# --- the bound on the Gaussian toy ------------------------------------------------------------------

MU, S = 0.1, 0.4  # the toy's law, N(MU, S^2) per pixel, discretised to the 256 levels


def _toy_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (MU + S * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1  # on the grid of 256 levels


def _toy_entropy_bits() -> float:
    """The exact entropy of the discretised toy law per pixel (what no model can beat)."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    edges = torch.cat([torch.tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2,
                       torch.tensor([math.inf])]).double()
    p = _cdf((edges[1:] - MU) / S) - _cdf((edges[:-1] - MU) / S)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def _bound_by_hand(schedule, x0, variance):
    """The whole bound per image, written out independently of diffusion.py: torch.distributions
    for every KL, the normal CDF for the decoder, the posterior of eq. 6-7 from the betas."""
    T = schedule.num_train_timesteps
    betas = schedule.betas
    ab = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(7)
    dims = x0[0].numel()
    total = torch.zeros(len(x0), dtype=torch.float64)
    ab_T = ab[-1]
    prior = torch.distributions.kl_divergence(
        torch.distributions.Normal(ab_T.sqrt() * x0, (1 - ab_T).sqrt()),
        torch.distributions.Normal(0.0, 1.0))
    total += prior.flatten(1).sum(1)
    for t in range(T):
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        # the optimal x0 predictor for N(MU, S^2) data: E[x0 | x_t]
        x0_hat = MU + ab[t].sqrt() * S**2 * (x_t - ab[t].sqrt() * MU) / (ab[t] * S**2 + 1 - ab[t])
        x0_hat = x0_hat.clamp(-1, 1)
        c1 = ab_prev.sqrt() * betas[t] / (1 - ab[t])
        c2 = (1 - betas[t]).sqrt() * (1 - ab_prev) / (1 - ab[t])
        mean = c1 * x0_hat + c2 * x_t
        beta_tilde = betas * torch.cat([torch.ones(1).double(), ab[:-1]]).neg().add(1) / (1 - ab)
        var = (beta_tilde[t] if t > 0 else beta_tilde[1]) if variance == "posterior" else \
            (betas[t] if t > 0 else beta_tilde[1])
        if t == 0:
            edges_lo = torch.where(x0 < -0.999, torch.tensor(-math.inf).double(), x0 - 1 / 255)
            edges_hi = torch.where(x0 > 0.999, torch.tensor(math.inf).double(), x0 + 1 / 255)
            p = _cdf((edges_hi - mean) / var.sqrt()) - _cdf((edges_lo - mean) / var.sqrt())
            total += -p.log().flatten(1).sum(1)
        else:
            true_mean = (ab_prev.sqrt() * betas[t] / (1 - ab[t])) * x0 + c2 * x_t
            true_posterior = torch.distributions.Normal(true_mean, beta_tilde[t].sqrt())
            model_posterior = torch.distributions.Normal(mean, var.sqrt())
            kl = torch.distributions.kl_divergence(true_posterior, model_posterior)
            total += kl.flatten(1).sum(1)
    return total / dims / math.log(2)


def _bound_by_code(schedule, x0, variance):
    """The same bound through diffusion.py, with the same draws."""
    T = schedule.num_train_timesteps
    g = torch.Generator().manual_seed(7)
    denoiser = gaussian_denoiser(schedule, MU, S, prediction_type="eps")
    total = prior_bpd(schedule, x0)
    for step in range(T):
        t = torch.full((len(x0),), step, dtype=torch.long)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = q_sample(schedule, x0, t, eps)
        mean, log_var = p_mean_log_variance(schedule, denoiser(x_t, t), x_t, t, prediction_type="eps",
                                            variance=variance, learned=False,
                                            x0_transform=lambda x: x.clamp(-1, 1))
        total = total + vlb_term(schedule, x0, x_t, t, mean, log_var)
    return total


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_toy_bound_equals_an_independent_computation(variance):
    schedule = make_schedule("linear", 200)
    x0 = _toy_images(64, seed=0)
    torch.testing.assert_close(_bound_by_code(schedule, x0, variance),
                               _bound_by_hand(schedule, x0, variance), rtol=1e-9, atol=1e-9)


def test_toy_bound_is_never_below_the_exact_nll():
    schedule = make_schedule("linear", 200)
    x0 = _toy_images(2000, seed=1)
    entropy = _toy_entropy_bits()  # E[-log2 p_data(x0)] per pixel: below any model's NLL
    for variance in ("posterior", "beta"):
        bound = _bound_by_code(schedule, x0, variance)
        se = bound.std().item() / math.sqrt(len(bound))
        assert bound.mean().item() > entropy - 3 * se, (variance, bound.mean().item(), entropy)
    # and the optimal model's bound is close to it (a bound that says nothing would pass above)
    assert bound.mean().item() < entropy + 0.1


# --- learned variances ------------------------------------------------------------------------------


def test_model_log_variance_spans_beta_tilde_to_beta():
    schedule = make_schedule("linear", 100)
    t = torch.tensor([0, 1, 50, 99])
    like = torch.zeros(4, 1, 2, 2)
    lo = model_log_variance(schedule, t, like, "posterior")
    hi = model_log_variance(schedule, t, like, "beta")
    torch.testing.assert_close(model_log_variance(schedule, t, like, "learned", -torch.ones_like(like)),
                               lo.expand_as(like))
    torch.testing.assert_close(model_log_variance(schedule, t, like, "learned", torch.ones_like(like))[1:],
                               hi.expand_as(like)[1:])
    # eq. 15 at v = 1/2 (output 0): the geometric mean
    mid = interpolated_log_variance(torch.zeros(1), math.log(0.02), math.log(0.01))
    assert mid.exp().item() == pytest.approx(math.sqrt(0.02 * 0.01), rel=1e-6)
    with pytest.raises(ValueError, match="learned.*posterior or beta"):
        model_log_variance(schedule, t, like, "learned")


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


def test_hybrid_loss_trains_the_variance_and_leaves_the_mean_to_l_simple():
    schedule = make_schedule("linear", 100)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    output = torch.randn(8, 2, 4, 4, requires_grad=True)
    t, eps = torch.randint(0, 100, (8,)), torch.randn(8, 1, 4, 4)
    hybrid = training_loss(lambda x, tt: output, schedule, x0, t=t, eps=eps, learn_variance=True)
    hybrid.backward()
    grad_hybrid = output.grad.clone()
    output.grad = None
    simple_output = output[:, :1].detach().requires_grad_()
    simple = training_loss(lambda x, tt: simple_output, schedule, x0, t=t, eps=eps)
    simple.backward()
    # the mean's channels get L_simple's gradient alone (eq. 16: stop-gradient on the mean in L_vlb)
    torch.testing.assert_close(grad_hybrid[:, :1], simple_output.grad)
    assert grad_hybrid[:, 1:].abs().sum() > 0  # and the variance is trained by L_vlb
    assert hybrid.item() > simple.item()
    with pytest.raises(ValueError, match="2C"):
        training_loss(lambda x, tt: output[:, :1], schedule, x0, t=t, eps=eps, learn_variance=True)


class _VarianceNet(nn.Module):
    """The toy's exact eps with a learned interpolation v(t): a small MLP of t alone, which is
    all the optimal variance of Gaussian data depends on."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.mlp = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
        self.eps = gaussian_denoiser(schedule, MU, S)

    def forward(self, x_t, t):
        v = self.mlp((t.float() / self.schedule.num_train_timesteps)[:, None])  # [B, 1]
        return torch.cat([self.eps(x_t, t), v[:, :, None, None].expand_as(x_t)], 1)


def test_a_small_network_learns_the_optimal_variance_with_l_hybrid():
    torch.manual_seed(0)
    schedule = make_schedule("linear", 100)
    net = _VarianceNet(schedule)
    opt = torch.optim.Adam(net.mlp.parameters(), lr=3e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 800)
    g = torch.Generator().manual_seed(0)
    for _ in range(800):
        x0 = MU + S * torch.randn(512, 1, 2, 2, generator=g)
        loss = training_loss(net, schedule, x0, generator=g, learn_variance=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    # The KL term's optimum over sigma^2 is beta-tilde + E[(mu-tilde - mu_theta)^2], that is
    # Var(x_{t-1} | x_t) in closed form (toy.gaussian_reverse_variance). Its gradient is a KL's,
    # 1/4 (log Sigma - log Sigma*)^2 per pixel near the optimum, averaged over 512 x 4 draws per
    # step: 800 Adam steps (cosine decay) bring log Sigma within 0.05 (5% in variance) at every t >= 1, where
    # the fixed choices are up to 2.3 (beta-tilde) and 0.7 (beta) away in log.
    t = torch.arange(1, 100)
    with torch.no_grad():
        interp = net(torch.zeros(len(t), 1, 2, 2), t)[:, 1:]
    learned = model_log_variance(schedule, t, interp, "learned", interp)[:, 0, 0, 0].double()
    exact = torch.tensor([math.log(gaussian_reverse_variance(schedule, S, s, s - 1)) for s in t.tolist()],
                         dtype=torch.float64)
    fixed = extract(schedule.posterior_log_variance_clipped, t, interp).flatten().double()
    assert (learned - exact).abs().max().item() < 0.05
    assert (fixed - exact).abs().max().item() > 0.5  # beta-tilde is far from it: the test can fail


def test_the_hybrid_loss_adds_lambda_t_times_the_bound_term():
    # Eq. 16 of Nichol & Dhariwal 2021: L_hybrid = L_simple + lambda L_vlb, lambda = 0.001, with
    # L_vlb = sum_t L_t estimated by T L_t at the drawn t
    schedule = make_schedule("linear", 100)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    output = torch.randn(8, 2, 4, 4)
    t, eps = torch.randint(0, 100, (8,)), torch.randn(8, 1, 4, 4)
    hybrid = training_loss(lambda x, tt: output, schedule, x0, t=t, eps=eps, learn_variance=True)
    simple = training_loss(lambda x, tt: output[:, :1], schedule, x0, t=t, eps=eps)
    x_t = q_sample(schedule, x0, t, eps)
    mean, log_var = p_mean_log_variance(schedule, output, x_t, t, learned=True,
                                        prediction_type="eps", variance="learned")
    bound = vlb_term(schedule, x0, x_t, t, mean, log_var).mean()
    torch.testing.assert_close(hybrid - simple, 0.001 * 100 * bound)
    assert VLB_WEIGHT == 0.001


# --- the bound of a whole model: Pipeline.bits_per_dim ---------------------------------------------


class _ToyNet(nn.Module):
    """The toy's optimal eps-predictor as a network the pipeline can hold."""

    def __init__(self, schedule):
        super().__init__()
        self.eps = gaussian_denoiser(schedule, MU, S)

    def forward(self, x_t, t, y=None):
        return self.eps(x_t, t)


def _toy_pipeline(schedule, variance="posterior"):
    from ddpm.config import DiffusionConfig, RunConfig, SampleConfig
    from ddpm.models import UNetConfig
    from ddpm.pipeline import Pipeline
    config = RunConfig(model=UNetConfig(in_channels=1, image_size=4),
                       diffusion=DiffusionConfig(num_train_timesteps=schedule.num_train_timesteps),
                       sample=SampleConfig(variance=variance, x0_transform="clip", num_sample_steps=10))
    return Pipeline(_ToyNet(schedule), schedule, config, 0, torch.device("cpu"))


def test_bits_per_dim_of_a_model_is_the_bound_and_its_stratified_estimate_is_unbiased():
    schedule = make_schedule("linear", 200)
    x0 = _toy_images(400, seed=2)
    images = ((x0 + 1) * 127.5).round().to(torch.uint8)
    pipe = _toy_pipeline(schedule)
    exact = pipe.bits_per_dim(images, timesteps=None, seed=0, batch_size=100)
    assert set(exact) >= {"bits_per_dim", "bits_per_dim_se", "n"} and exact["n"] == 400
    assert exact["timesteps"] == 199
    total = exact["prior_bpd"] + exact["diffusion_bpd"] + exact["decoder_bpd"]
    assert total == pytest.approx(exact["bits_per_dim"], rel=1e-12)
    by_code = _bound_by_code(schedule, x0, "posterior")  # the same images, other draws of x_t
    assert abs(by_code.mean().item() - exact["bits_per_dim"]) < 4 * exact["bits_per_dim_se"]
    estimates = [pipe.bits_per_dim(images, timesteps=10, seed=s, batch_size=100) for s in range(3)]
    for est in estimates:
        assert est["timesteps"] == 10
        spread = math.hypot(est["bits_per_dim_se"], exact["bits_per_dim_se"])
        assert abs(est["bits_per_dim"] - exact["bits_per_dim"]) < 4 * spread
    assert len({e["bits_per_dim"] for e in estimates}) == 3  # the seed draws other steps
    again = pipe.bits_per_dim(images, timesteps=10, seed=0, batch_size=100)
    assert again == estimates[0]  # and the same seed the same ones
    with pytest.raises(ValueError, match="between 1 and 199"):
        pipe.bits_per_dim(images, timesteps=200)


# --- the command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, fake_fashion):
    from conftest import ddpm_in_process as cli
    out = tmp_path_factory.mktemp("learned") / "run"
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--learn-variance",
            "--prediction-type", "v", "--steps", "4", "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    return out


def test_learned_variance_run_samples_with_its_variance_and_resumes(learned_run, fake_fashion, tmp_path):
    from ddpm.pipeline import load_pipeline

    from conftest import ddpm_in_process as cli
    pipe = load_pipeline(learned_run)
    assert pipe.config.model.learn_variance and pipe.config.sample.variance == "learned"
    assert pipe.model.conv_out.out_channels == 2
    # ancestral at full T and respaced, DDIM with eta: every one uses the learned variance
    full = pipe.generate(4, seed=0, num_sample_steps=100)
    respaced = pipe.generate(4, seed=0, num_sample_steps=10)
    fixed = pipe.generate(4, seed=0, num_sample_steps=10, variance="posterior")
    assert full.shape == respaced.shape == (4, 1, 28, 28)
    assert not torch.equal(respaced, fixed)
    ddim = pipe.generate(4, seed=0, sampler="ddim", num_sample_steps=10, eta=1.0)
    assert torch.isfinite(ddim).all()
    for sampler in ("dpm++", "euler", "heun"):
        assert torch.isfinite(pipe.generate(2, seed=0, sampler=sampler, num_sample_steps=5)).all()
    r = cli("sample", learned_run, "--n", "4", "--steps", "10", "--out", tmp_path / "g.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--resume", learned_run, "--steps", "6", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert load_pipeline(learned_run).step == 6


def test_learned_variance_on_a_fixed_model_is_refused(world, tmp_path):
    from conftest import ddpm_in_process as cli
    r = cli("sample", world / "run", "--variance", "learned", "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "--learn-variance" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


def test_eval_nll_reports_bits_per_dim_for_fixed_and_learned_variances(learned_run, world):
    from conftest import ddpm_in_process as cli
    results = {}
    for name, run, extra in (("learned", learned_run, []), ("posterior", world / "run", []),
                             ("beta", world / "run", ["--variance", "beta"])):
        r = cli("eval", run, "--nll", "--n", "8", "--nll-timesteps", "4", "--json", "--no-progress", *extra)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["n"] == 8 and out["split"] == "test" and out["variance"] == name
        assert out["bits_per_dim"] > 0 and out["bits_per_dim_se"] > 0 and out["timesteps"] == 4
        results[name] = out["bits_per_dim"]
    assert results["posterior"] != results["beta"]
    r = cli("eval", world / "run", "--nll", "--n", "4", "--nll-timesteps", "all", "--no-progress")
    assert r.returncode == 0 and "bits/dim" in r.stdout and "all terms" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--nll-timesteps", "0"], "--nll-timesteps"),
    (["--nll-timesteps", "5000"], "middle terms"),
    (["--sampler", "ddim"], "only apply to FID"),
    (["--n", "100000"], "holds"),
])
def test_bad_nll_requests_are_one_line_errors(world, args, message):
    from conftest import ddpm_in_process as cli
    r = cli("eval", world / "run", "--nll", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
