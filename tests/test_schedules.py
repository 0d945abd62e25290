"""schedules.py: the beta schedules and the frozen float64 NoiseSchedule derived from them."""

import math

import pytest
import torch

from ddpm.schedules import SCHEDULES, broadcast_per_sample, extract, make_schedule


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 350])
def test_endpoints_and_monotonicity(name, T):
    s = make_schedule(name, T)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    ac = s.alphas_cumprod
    assert (ac[1:] < ac[:-1]).all(), "alpha_bar must fall strictly"
    assert ac[0] > 0.99, "the first step adds little noise"
    assert ac[-1] < 1e-2, "the last step is (almost) pure noise"
    assert torch.allclose(s.alphas_cumprod_prev[1:], ac[:-1]) and s.alphas_cumprod_prev[0] == 1
    assert (s.log_snr[1:] < s.log_snr[:-1]).all()


def test_linear_matches_ho_et_al_at_1000():
    s = make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    i = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.betas, 1e-4 + i * (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)


def test_linear_rescaled_for_other_T():
    s = make_schedule("linear", 350)
    assert s.betas[0].item() == pytest.approx(1e-4 * 1000 / 350)
    assert s.betas[-1].item() == pytest.approx(0.02 * 1000 / 350)


def test_quadratic_is_square_of_linear_roots():
    s = make_schedule("quadratic", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    roots = s.betas.sqrt()
    assert torch.allclose(roots[1:] - roots[:-1], (roots[1] - roots[0]).expand(999), atol=1e-12)


@pytest.mark.parametrize("T", [1000, 350])
def test_cosine_alpha_bar_closed_form(T):
    s = make_schedule("cosine", T)

    def f(t):  # Nichol & Dhariwal 2021, eq. 17, written out independently
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    # index i holds t = i + 1; the final beta is clipped to 0.999, so compare all but the last.
    expected = torch.tensor([f(i + 1) / f(0) for i in range(T - 1)], dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod[:-1], expected, rtol=1e-10, atol=1e-14)
    assert s.betas[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize("T", [1000, 350])
def test_sigmoid_alpha_bar_is_a_sigmoid(T):
    s = make_schedule("sigmoid", T)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731

    def alpha_bar(t):  # the sigmoid over [-3, 3] at u = t / T, rescaled to fall from 1 to 0
        return (sig(3) - sig(6 * t / T - 3)) / (sig(3) - sig(-3))

    # index i holds t = i + 1; the final beta is clipped to 0.999, so compare all but the last.
    expected = torch.tensor([alpha_bar(i + 1) for i in range(T - 1)], dtype=torch.float64)
    assert torch.allclose(s.alphas_cumprod[:-1], expected, rtol=1e-10, atol=1e-14)
    assert s.betas[-1].item() == pytest.approx(0.999)
    assert s.alphas_cumprod[T // 2 - 1].item() == pytest.approx(0.5, abs=1e-12)  # the midpoint


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_agrees_with_bayes_rule(name):
    """q(x_{t-1} | x_t, x0) from Bayes' rule on two 1-D Gaussians, computed independently."""
    s = make_schedule(name, 1000)
    for t in [1, 2, 10, 250, 999]:
        a_t = 1 - s.betas[t].item()
        ab_prev = math.prod(1 - b for b in s.betas[:t].tolist())
        # prior x_{t-1} | x0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev); likelihood x_t | x_{t-1}
        # ~ N(sqrt(a_t) x_{t-1}, 1 - a_t). Product of Gaussians in x_{t-1}:
        precision = 1 / (1 - ab_prev) + a_t / (1 - a_t)
        var = 1 / precision
        coef_x0 = var * math.sqrt(ab_prev) / (1 - ab_prev)
        coef_xt = var * math.sqrt(a_t) / (1 - a_t)
        assert s.posterior_variance[t].item() == pytest.approx(var, rel=1e-9)
        assert s.posterior_mean_coef1[t].item() == pytest.approx(coef_x0, rel=1e-9)
        assert s.posterior_mean_coef2[t].item() == pytest.approx(coef_xt, rel=1e-9)
    # t = 1 of the paper (index 0): x_{t-1} is x0 itself.
    assert s.posterior_variance[0].item() == 0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    assert s.posterior_mean_coef2[0].item() == 0


def test_extract_broadcasts_and_casts():
    s = make_schedule("linear", 1000)
    x = torch.zeros(3, 2, 5, 5, dtype=torch.float32)
    out = extract(s.betas, torch.tensor([0, 10, 999]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out[2, 0, 0, 0].item() == pytest.approx(0.02)


def test_broadcast_per_sample_shapes_and_casts():
    values = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    out = broadcast_per_sample(values, torch.zeros(3, 2, 5, 5, dtype=torch.float32))
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert torch.equal(out.flatten(), values.float())
    assert broadcast_per_sample(values, torch.zeros(3, 7)).shape == (3, 1)  # any rank of ``like``


def test_alpha_bar_scalar_reads_the_table_interpolates_and_knows_the_data():
    s = make_schedule("cosine", 1000)
    for t in (0, 10, 10.0, 999):
        value = s.alpha_bar_scalar(t)
        assert isinstance(value, float) and value == s.alphas_cumprod[int(t)].item()
    between = s.alpha_bar_scalar(10.5)
    assert between == s.alpha_bar_at(10.5).item()
    assert s.alphas_cumprod[11].item() < between < s.alphas_cumprod[10].item()
    assert s.alpha_bar_scalar(-1) == 1.0  # the samplers' step after the last one: the data


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'.*linear, cosine"):
        make_schedule("cosin", 1000)


def test_linear_rescaled_past_beta_one_is_refused():
    """0.02 * 1000 / T reaches 1 below T = 21: refuse rather than train on negative alphas."""
    with pytest.raises(ValueError, match=r"linear schedule at T = 8 has betas up to 2.5.*T >= 21"):
        make_schedule("linear", 8)
    assert make_schedule("linear", 21).betas.max() < 1
    assert make_schedule("cosine", 8).betas.max() < 1
