"""pipeline.py: a trained model loaded and ready to generate; its bits per dimension, its
learned variances, EDM's preconditioning around its network, and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.diffusion import draw_t_eps, eps_x0_from_prediction, precondition, training_loss
from ddpm.schedules import make_schedule
from ddpm.toy import gaussian_denoiser

from conftest import MU, S, _bound_by_code, _table_1, _toy_images

# --- the bound of a whole model: Pipeline.bits_per_dim (conftest's Gaussian toy) ------------------


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


# --- a run with learned variances (conftest's learned_run) ----------------------------------------


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


# --- EDM's preconditioning in training, sampling and export ---------------------------------------


def test_training_step_and_pipeline_call_the_network_through_the_preconditioning(fake_fashion, tmp_path):
    import dataclasses

    from ddpm import get_preset
    from ddpm.models import UNet
    from ddpm.pipeline import load_pipeline
    from ddpm.runtime import make_accelerator
    from ddpm.step import train_step

    from conftest import ddpm_in_process as cli

    # the training step's loss is the preconditioned network's (lr 0: the weights stay)
    config = get_preset("tiny")
    config = dataclasses.replace(config, diffusion=dataclasses.replace(
        config.diffusion, prediction_type="v", preconditioning="edm", sigma_data=0.5))
    model, schedule = UNet(config.model), make_schedule("linear", 100)
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(6)) * 2 - 1
    losses = {}
    for name, c in (("edm", config), ("none", dataclasses.replace(config, diffusion=dataclasses.replace(
            config.diffusion, preconditioning="none")))):
        losses[name] = float(train_step(
            model, schedule, torch.optim.AdamW(model.parameters(), lr=0.0),
            [(x0, torch.zeros(4, dtype=torch.long))], accelerator=make_accelerator(torch.device("cpu")),
            generator=torch.Generator().manual_seed(7), config=c, device=torch.device("cpu"),
            lr=0.0).loss)
    t, eps = draw_t_eps(schedule, x0.shape, torch.Generator().manual_seed(7))
    expected = training_loss(precondition(lambda x, t: model(x, t, None), schedule, "edm",
                                          sigma_data=0.5, prediction_type="v"),
                             schedule, x0, t=t, eps=eps, prediction_type="v",
                             weighting=config.diffusion.loss_weighting)
    assert losses["edm"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert abs(losses["edm"] - losses["none"]) > 1e-3

    # a run trained with it samples through it: Table 1 around the loaded weights
    run = tmp_path / "edm"
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", "2",
            "--preconditioning", "edm", "--sigma-data", "0.5", "--prediction-type", "v",
            "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "predicts v through EDM's preconditioning (sigma_data 0.5)" in r.stdout + r.stderr
    pipe = load_pipeline(run)
    assert pipe.config.diffusion.preconditioning == "edm"
    x_t = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    steps = torch.tensor([5, 50, 99])
    ab = pipe.schedule.alphas_cumprod[steps].float().view(-1, 1, 1, 1)
    c_in, c_skip, c_out = _table_1(ab, 0.5)
    with torch.inference_mode():
        x0_expected = c_skip * x_t / ab.sqrt() + c_out * pipe.model(c_in * x_t / ab.sqrt(), steps, None)
        _, x0_got = eps_x0_from_prediction(pipe._predict(x_t, steps, None), x_t, ab, "v")
    torch.testing.assert_close(x0_got, x0_expected, rtol=1e-4, atol=1e-5)
    r = cli("sample", run, "--n", "2", "--sampler", "dpm++", "--steps", "3", "--out",
            tmp_path / "s.png", "--no-progress")
    assert r.returncode == 0 and (tmp_path / "s.png").exists(), r.stderr

    # diffusers has no such step: the export says so and writes nothing
    pytest.importorskip("diffusers")
    r = cli("export", run, tmp_path / "hf", "--format", "diffusers")
    assert r.returncode == 2 and "--preconditioning edm" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


# --- torch.compile --------------------------------------------------------------------------------


def test_a_compiled_sampler_that_worked_does_not_hide_later_errors(trained_run):
    """Only the first call through torch.compile may fall back: an error after compiling has
    worked is the run's own, and is raised."""
    from ddpm.pipeline import load_pipeline

    pipe = load_pipeline(trained_run[0])
    calls = []

    def compiled(*args):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA out of memory")
        return pipe.model(*args)

    pipe.compiled = compiled
    pipe.generate(2, num_sample_steps=1)
    assert pipe.compile_proven
    with pytest.raises(RuntimeError, match="out of memory"):
        pipe.generate(2, num_sample_steps=1)
    assert pipe.compiled is compiled, "not given up for an error that is not compiling's"
