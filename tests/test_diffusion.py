import math

import pytest
import torch

from ddpm.diffusion import eps_x0_from_prediction, q_posterior, q_sample, training_loss
from ddpm.schedules import extract, make_schedule

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
