"""Training objectives: each prediction type and loss weighting learns a toy mixture it can then
sample; min-SNR weights match their closed form."""

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import min_snr_weight, training_loss
from ddpm.models.unet import timestep_embedding
from ddpm.samplers import get_sampler, initial_noise, make_timesteps, sampler_spec
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
