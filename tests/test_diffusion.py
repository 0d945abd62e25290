"""diffusion.py: the forward process, the posterior and the conversions between predictions
(Ho et al. 2020); the training objectives (each prediction type and loss weighting, min-SNR);
the variational bound and learned variances (Ho et al. 2020, eq. 5 and 13; Nichol & Dhariwal
2021, eq. 15 and 16); EDM's log-normal noise levels, loss weights and preconditioning (Karras et
al. 2022). Against closed forms and independent computations in float64."""

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import (
    VLB_WEIGHT,
    discretized_gaussian_log_likelihood,
    draw_t_eps,
    edm_weight,
    eps_x0_from_prediction,
    interpolated_log_variance,
    min_snr_weight,
    model_log_variance,
    normal_kl,
    p_mean_log_variance,
    precondition,
    prior_bpd,
    q_posterior,
    q_sample,
    timestep_probs,
    training_loss,
    v_from_eps_x0,
    vlb_term,
)
from ddpm.models.unet import timestep_embedding
from ddpm.samplers import get_sampler, initial_noise, sampler_spec
from ddpm.schedules import extract, make_schedule
from ddpm.timesteps import make_timesteps
from ddpm.toy import gaussian_denoiser, gaussian_reverse_variance

from conftest import MU, S, _bound_by_code, _table_1, _toy_images

N_DRAWS = 40_000


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t_value", [0, 100, 500, 999])
def test_q_sample_moments(name, t_value):
    """For one fixed x0 and many noise draws, x_t has mean sqrt(ab) x0 and variance 1 - ab (eq. 4)."""
    s = make_schedule(name, 1000)
    g = torch.Generator().manual_seed(t_value)
    x0 = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4).expand(N_DRAWS, 1, 4, 4)
    t = torch.full((N_DRAWS,), t_value)
    x_t = q_sample(s, x0, t, torch.randn(x0.shape, generator=g))
    ab = s.alphas_cumprod[t_value].item()
    mean, var = x_t.mean(0), x_t.var(0)
    # Standard errors: of a mean sqrt(var / N); of a Gaussian variance var * sqrt(2 / (N - 1)).
    se_mean = math.sqrt((1 - ab) / N_DRAWS)
    se_var = (1 - ab) * math.sqrt(2 / (N_DRAWS - 1))
    assert torch.allclose(mean, math.sqrt(ab) * x0[0], atol=5 * se_mean + 1e-6)
    assert torch.allclose(var, torch.full_like(var, 1 - ab), atol=5 * se_var + 1e-9)


def test_posterior_at_the_first_step_is_x0():
    """At the paper's t = 1 (index 0), q(x_0 | x_1, x0) is a point mass at x0."""
    s = make_schedule("linear", 1000)
    x0 = torch.randn(2, 1, 4, 4)
    x_t = torch.randn(2, 1, 4, 4)
    mean, var = q_posterior(s, x0, x_t, torch.tensor([0, 0]))
    assert torch.allclose(mean, x0) and (var == 0).all()


def test_predict_x0_inverts_q_sample():
    s = make_schedule("cosine", 1000)
    x0, eps = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 998])
    x_t = q_sample(s, x0, t, eps)
    _, x0_back = eps_x0_from_prediction(eps, x_t, extract(s.alphas_cumprod, t, x_t), "eps")
    assert torch.allclose(x0_back, x0, atol=1e-9)


@pytest.mark.parametrize(
    "loss, expected",
    # For eps ~ N(0, 1) and a zero prediction: E[eps^2] = 1, E|eps| = sqrt(2/pi),
    # E[huber(eps)] = E[eps^2/2; |eps|<1] + E[|eps| - 1/2; |eps|>=1], evaluated below.
    [("mse", 1.0), ("l1", math.sqrt(2 / math.pi)), ("huber", None)],
)
def test_training_loss_of_a_zero_predictor(loss, expected):
    if expected is None:
        phi = math.exp(-0.5) / math.sqrt(2 * math.pi)  # N(0,1) density at 1
        p_out = math.erfc(1 / math.sqrt(2))  # P(|eps| >= 1)
        e_sq_in = (1 - p_out) - 2 * phi  # E[eps^2; |eps| < 1]
        e_abs_out = 2 * phi  # E[|eps|; |eps| >= 1]
        expected = 0.5 * e_sq_in + e_abs_out - 0.5 * p_out
    s = make_schedule("linear", 1000)
    x0 = torch.zeros(2000, 1, 8, 8)
    value = training_loss(lambda x, t: torch.zeros_like(x), s, x0,
                          generator=torch.Generator().manual_seed(0), loss=loss)
    assert value.item() == pytest.approx(expected, rel=0.01)


def test_training_loss_is_algorithm_1():
    """Replaying the generator: the loss is the MSE between the drawn eps and the prediction."""
    s = make_schedule("linear", 1000)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    seen = {}

    def denoiser(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return 0.5 * x_t

    value = training_loss(denoiser, s, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(seen["t"], t)
    x_t = q_sample(s, x0, t, eps)
    assert torch.allclose(seen["x_t"], x_t)
    assert value.item() == pytest.approx(((0.5 * x_t - eps) ** 2).mean().item(), rel=1e-6)


# --- training objectives: each prediction type and loss weighting learns a toy mixture ------------


WEIGHTS, MEANS, STD = (0.3, 0.7), (-0.6, 0.5), 0.1


class ToyDenoiser(nn.Module):
    """A small MLP on one-pixel images [B, 1, 1, 1]: input x_t and a time embedding."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(33, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 1))

    def forward(self, x_t, t):
        h = torch.cat([x_t.flatten(1), timestep_embedding(t, 32)], dim=1)  # [B, 1 + 32]
        return self.net(h).reshape(x_t.shape)


def toy_batch(n, g):
    first = torch.rand(n, generator=g) < WEIGHTS[0]
    centre = torch.where(first, MEANS[0], MEANS[1])
    return (centre + STD * torch.randn(n, generator=g)).reshape(n, 1, 1, 1)


@pytest.fixture
def one_thread():
    """Tiny MLP steps run 5x faster on one thread than on two fighting over small matrices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("prediction_type, weighting",
                         [("eps", "uniform"), ("x0", "uniform"), ("v", "uniform"), ("x0", "min-snr"),
                          ("v", "min-snr")])
def test_small_model_learns_the_mixture(prediction_type, weighting, one_thread):
    torch.manual_seed(0)
    schedule = make_schedule("cosine", 200)
    model = ToyDenoiser()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        loss = training_loss(model, schedule, toy_batch(1024, g), generator=g,
                             prediction_type=prediction_type, weighting=weighting)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for sampler, steps in (("ddim", 50), ("dpm++", 20)):
        ts = make_timesteps(200, steps, sampler_spec(sampler).default_spacing, schedule=schedule)
        with torch.no_grad():
            x = get_sampler(sampler)(model, schedule, initial_noise((4000, 1, 1, 1), g), ts,
                                     prediction_type=prediction_type).flatten()
        first = x < (MEANS[0] + MEANS[1]) / 2
        # A learned model is not exact: 0.05 on the weight (its binomial SE is 0.007), 0.1 on
        # the component means and 0.06 on their std (0.1) bound the model's error, not the maths.
        assert first.float().mean().item() == pytest.approx(WEIGHTS[0], abs=0.05), sampler
        assert x[first].mean().item() == pytest.approx(MEANS[0], abs=0.1), sampler
        assert x[~first].mean().item() == pytest.approx(MEANS[1], abs=0.1), sampler
        assert x[~first].std().item() == pytest.approx(STD, abs=0.06), sampler


def test_min_snr_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 100.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.1, 1.0, 5.0, 5.0]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.05]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v"), torch.tensor([0.1 / 1.1, 0.5, 5 / 6, 5 / 101]))


@pytest.mark.parametrize("loss", ["mse", "l1", "huber"])
@pytest.mark.parametrize("weighting", ["uniform", "min-snr"])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_loss_matches_its_closed_form(prediction_type, weighting, loss):
    """With t and eps fixed and the network x_t -> x_t / 2, the loss written out by hand in
    float64 from the betas: x_t (eq. 4), the target (eps, x0 or v = sqrt(ab) eps - sqrt(1 - ab) x0,
    Salimans & Ho 2022), the elementwise loss, min-SNR-5 weights (Hang et al. 2023) and the mean."""
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 2, 2, generator=g)
    eps = torch.randn(5, 1, 2, 2, generator=g)
    t = torch.tensor([0, 1, 40, 500, 999])
    value = training_loss(lambda x_t, t: 0.5 * x_t, schedule, x0, t=t, eps=eps, loss=loss,
                          prediction_type=prediction_type, weighting=weighting)

    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]  # Ho et al.'s linear betas

    def elementwise(d):
        if loss == "mse":
            return d * d
        if loss == "l1":
            return abs(d)
        return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5  # Huber with threshold 1

    per_sample = []
    for b, step in enumerate(t.tolist()):
        ab = math.prod(1 - beta for beta in betas[:step + 1])  # index step holds t = step + 1
        errors = []
        for x, e in zip(x0[b].flatten().tolist(), eps[b].flatten().tolist(), strict=True):
            x_t = math.sqrt(ab) * x + math.sqrt(1 - ab) * e
            target = {"eps": e, "x0": x, "v": math.sqrt(ab) * e - math.sqrt(1 - ab) * x}
            errors.append(elementwise(0.5 * x_t - target[prediction_type]))
        weight = 1.0
        if weighting == "min-snr":
            snr = ab / (1 - ab)
            weight = min(snr, 5.0) / {"eps": snr, "x0": 1.0, "v": snr + 1}[prediction_type]
        per_sample.append(weight * sum(errors) / len(errors))
    assert value.item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)


# --- the variational bound's pieces (Ho et al. 2020, eq. 5 and 13) --------------------------------


SQRT2 = math.sqrt(2.0)


def _cdf(z: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF from erf, in float64 (independent of torch.special.ndtr)."""
    return 0.5 * (1 + torch.erf(z / SQRT2))


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


# --- the bound on the Gaussian toy (conftest's MU, S, _toy_images, _bound_by_code) ----------------


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


# --- learned variances (Nichol & Dhariwal 2021, eq. 15 and 16) ------------------------------------


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


# --- EDM's noise levels and weights (Karras et al. 2022) ------------------------------------------


def test_log_normal_timestep_law_is_the_normal_mass_of_each_steps_log_sigma_bin():
    schedule = make_schedule("linear", 1000)
    probs = timestep_probs(schedule, "log-normal", log_sigma_mean=-1.2, log_sigma_std=1.2)
    assert probs.dtype == torch.float64 and probs.shape == (1000,)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12) and (probs >= 0).all()
    ab = schedule.alphas_cumprod.tolist()
    log_sigma = [0.5 * math.log((1 - a) / a) for a in ab]
    cdf = lambda x: 0.5 * (1 + math.erf((x + 1.2) / (1.2 * math.sqrt(2))))  # noqa: E731
    for t in (0, 1, 57, 300, 999):
        lo = cdf((log_sigma[t - 1] + log_sigma[t]) / 2) if t > 0 else 0.0
        hi = cdf((log_sigma[t] + log_sigma[t + 1]) / 2) if t < 999 else 1.0
        assert float(probs[t]) == pytest.approx(hi - lo, rel=1e-9, abs=1e-15)
    # the draws follow it: the share below the median step within 4 standard errors
    gen = torch.Generator().manual_seed(0)
    t, _ = draw_t_eps(schedule, (20_000, 1, 2, 2), gen, probs)
    median = int(torch.searchsorted(probs.cumsum(0), torch.tensor(0.5, dtype=torch.float64)))
    share = float((t <= median).double().mean())
    assert abs(share - float(probs[:median + 1].sum())) < 4 * math.sqrt(0.25 / 20_000)
    assert timestep_probs(schedule, "uniform") is None
    # uniform draws are Algorithm 1's, as before (old runs reproduce)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t1, e1 = draw_t_eps(schedule, (8, 1, 2, 2), g1)
    t2 = torch.randint(0, 1000, (8,), generator=g2)
    assert torch.equal(t1, t2) and torch.equal(e1, torch.randn(8, 1, 2, 2, generator=g2))
    with pytest.raises(ValueError, match="timestep sampling"):
        timestep_probs(schedule, "beta")


def test_edm_weight_is_lambda_sigma_on_x0_and_uniform_on_v_for_unit_data():
    snr = torch.tensor([0.01, 0.3, 1.0, 7.0, 400.0], dtype=torch.float64)
    sigma = snr.rsqrt()
    for sigma_data in (0.5, 1.0):
        lam = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2  # Karras et al. Table 1
        torch.testing.assert_close(edm_weight(snr, sigma_data, "x0"), lam)
        torch.testing.assert_close(edm_weight(snr, sigma_data, "eps"), lam / snr)
        torch.testing.assert_close(edm_weight(snr, sigma_data, "v"), lam / (snr + 1))
    torch.testing.assert_close(edm_weight(snr, 1.0, "v"), torch.ones_like(snr))
    # the conversion between targets is the one min-SNR uses
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "v") * (snr + 1), snr.clamp(max=5.0))


def test_training_loss_with_edm_weights_weights_each_sample_by_lambda():
    schedule = make_schedule("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0, 5, 20, 50, 80, 99])
    eps = torch.randn(6, 1, 4, 4, generator=gen)
    net = lambda x, t: 0.3 * x  # noqa: E731
    ab = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    per_sample = ((0.3 * x_t - v_from_eps_x0(eps, x0, ab)) ** 2).flatten(1).mean(1)
    snr = (ab / (1 - ab)).flatten().double()
    expected = (per_sample.double() * edm_weight(snr, 0.5, "v")).mean()
    got = training_loss(net, schedule, x0, t=t, eps=eps, prediction_type="v", weighting="edm",
                        sigma_data=0.5)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


# --- EDM's preconditioning (Karras et al. 2022, sec. 5 and Table 1; conftest's _table_1) ----------


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_edm_preconditioning_is_table_1_in_edms_variables(prediction_type):
    schedule = make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    seen = {}

    def network(x, t):
        seen["input"] = x
        return torch.sin(3 * x) + 0.1 * t.view(-1, 1, 1, 1)

    for t, ab in ((torch.tensor([0, 10, 300, 700, 999]), None),
                  (torch.tensor([0.0, 10.5, 299.25, 700.75, 998.5], dtype=torch.float64), None)):
        ab = (schedule.alpha_bar_at(t) if t.is_floating_point() else schedule.alphas_cumprod[t])
        ab = ab.view(-1, 1, 1, 1)
        c_in, c_skip, c_out = _table_1(ab, 0.5)
        x = x_t / ab.sqrt()  # EDM's x = x0 + sigma eps
        expected_x0 = c_skip * x + c_out * network(c_in * x, t)
        prediction = precondition(network, schedule, "edm", sigma_data=0.5,
                                  prediction_type=prediction_type)(x_t, t)
        torch.testing.assert_close(seen["input"], c_in * x)
        _, x0 = eps_x0_from_prediction(prediction, x_t, ab, prediction_type)
        torch.testing.assert_close(x0, expected_x0)


def test_edm_preconditioning_denoises_gaussian_data_optimally_with_a_zero_network():
    """For x0 ~ N(0, sigma_data^2), c_skip x alone is E[x0 | x_t] (F* = 0), and both the
    network's input c_in x and its ideal output (x0 - c_skip x) / c_out have unit variance."""
    schedule = make_schedule("linear", 1000)
    sigma_data = 0.6
    gen = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 50, 250, 500, 999]).repeat_interleave(100_000)
    ab = schedule.alphas_cumprod[t].view(-1, 1)
    x0 = sigma_data * torch.randn(len(t), 1, generator=gen, dtype=torch.float64)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(len(t), 1, generator=gen, dtype=torch.float64)
    denoised = precondition(lambda x, t: torch.zeros_like(x), schedule, "edm", sigma_data=sigma_data,
                            prediction_type="x0")(x_t, t)
    posterior_mean = ab.sqrt() * sigma_data ** 2 / (ab * sigma_data ** 2 + 1 - ab) * x_t
    torch.testing.assert_close(denoised, posterior_mean)
    c_in, c_skip, c_out = _table_1(ab, sigma_data)
    x = x_t / ab.sqrt()
    for j in range(5):
        rows = slice(j * 100_000, (j + 1) * 100_000)
        assert float((c_in * x)[rows].var()) == pytest.approx(1.0, abs=0.02)
        assert float(((x0 - c_skip * x) / c_out)[rows].var()) == pytest.approx(1.0, abs=0.02)


def test_edm_preconditioning_at_unit_data_std_is_v_prediction():
    schedule = make_schedule("cosine", 100)
    x_t = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 33, 66, 99])
    network = lambda x, t: x ** 2 - 0.5  # noqa: E731
    out = precondition(network, schedule, "edm", sigma_data=1.0, prediction_type="v")(x_t, t)
    torch.testing.assert_close(out, -network(x_t, t))  # c_in = 1, v = -F
    assert precondition(network, schedule, "none", sigma_data=0.5, prediction_type="v") is network


def test_edm_preconditioning_keeps_learned_variances_and_is_finite_at_zero_terminal_snr():
    schedule = make_schedule("linear", 100, zero_terminal_snr=True)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 99])
    network = lambda x, t: torch.cat([x, torch.full_like(x, 0.25)], dim=1)  # noqa: E731
    out = precondition(network, schedule, "edm", sigma_data=0.5, prediction_type="v")(x_t, t)
    assert out.shape == (2, 2, 4, 4) and bool(torch.isfinite(out).all())
    assert bool((out[:, 1:] == 0.25).all())  # the interpolation passes unchanged
    # at alpha_bar = 0 the input is x_t itself and x0 = sigma_data F
    _, x0 = eps_x0_from_prediction(out[1:, :1], x_t[1:], 0.0, "v")
    torch.testing.assert_close(x0, 0.5 * x_t[1:])


def test_edm_weights_through_the_preconditioning_are_a_uniform_loss_on_f():
    """EDM's lambda(sigma) = 1 / c_out^2 on the x0-error: the loss through the preconditioned
    network is the plain mean of (F - F_target)^2, F_target = (x0 - c_skip x) / c_out."""
    schedule = make_schedule("linear", 1000)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(8, 1, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 3, 40, 200, 450, 600, 850, 999])
    network = lambda x, t: 0.2 * x - 0.1  # noqa: E731
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    c_in, c_skip, c_out = _table_1(ab, 0.5)
    x = x0 + ((1 - ab) / ab).sqrt() * eps
    f_target = (x0 - c_skip * x) / c_out
    expected = ((network(c_in * x, t) - f_target) ** 2).mean()
    for prediction_type in ("eps", "x0", "v"):
        denoiser = precondition(network, schedule, "edm", sigma_data=0.5,
                                prediction_type=prediction_type)
        got = training_loss(denoiser, schedule, x0, t=t, eps=eps, prediction_type=prediction_type,
                            weighting="edm", sigma_data=0.5)
        assert float(got) == pytest.approx(float(expected), rel=1e-4), prediction_type


def test_log_normal_sampling_with_learned_variances_is_refused():
    from ddpm.config import RunConfig, with_overrides
    config = with_overrides(RunConfig(), {"model": {"learn_variance": True},
                                          "diffusion": {"timestep_sampling": "log-normal"}})
    with pytest.raises(ValueError, match="uniform with --learn-variance"):
        config.validate()
