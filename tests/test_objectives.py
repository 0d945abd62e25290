"""Training objectives: each prediction type and loss weighting learns a toy mixture it can then
sample; min-SNR weights match their closed form."""

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import min_snr_weight, training_loss
from ddpm.models.unet import timestep_embedding
from ddpm.samplers import DEFAULT_SPACING, get_sampler, initial_noise, make_timesteps
from ddpm.schedules import make_schedule

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


@pytest.mark.parametrize("prediction_type, weighting", [("eps", "uniform"), ("x0", "uniform"),
                                                        ("v", "uniform"), ("x0", "min-snr"), ("v", "min-snr")])
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
        ts = make_timesteps(200, steps, DEFAULT_SPACING[sampler], schedule=schedule)
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


def test_v_loss_of_a_zero_predictor_is_one():
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 has unit variance for unit-variance x0: E[v^2] = 1."""
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4000, 1, 4, 4, generator=g)
    value = training_loss(lambda x, t: torch.zeros_like(x), schedule, x0, generator=g,
                          prediction_type="v")
    assert value.item() == pytest.approx(1.0, rel=0.02)
    assert not math.isnan(value.item())
