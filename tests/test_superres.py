"""superres.py and 'ddpm train --super-res': the low-resolution path against hand-made and closed
forms, the conditioning augmentation's law, runs that differ only in an augmentation that does
nothing being the same run, and what a super-resolution model refuses."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from ddpm import superres, train
from ddpm.cascade import Cascade, load_cascade
from ddpm.checkpoint import load_run_or_file
from ddpm.config import DiffusionConfig, RunConfig, TrainConfig, build_schedule, resolve, with_conditioning
from ddpm.data import to_uint8
from ddpm.models import UNet, UNetConfig
from ddpm.pipeline import Pipeline, load_pipeline
from ddpm.rundir import low_res_inputs
from ddpm.schedules import make_schedule
from ddpm.serve import Limits, WebServer
from ddpm.step import EMA, train_step
from ddpm.superres import SuperResConfig
from ddpm.train import _LoneProcess, resume_config
from ddpm.viz import read_animation

from conftest import Client, assert_refused, png_pixels, tiny_config
from conftest import ddpm_in_process as cli

# --- the low-resolution path ------------------------------------------------------------------


@pytest.mark.parametrize("factor", [2, 4])
def test_area_down_then_bilinear_up_keeps_a_constant_image(factor):
    for value in (-1.0, -0.37, 0.0, 0.5, 1.0):
        x = torch.full((2, 3, 8 * factor, 8 * factor), value)
        back = superres.upsample(superres.downsample(x, 8), 8 * factor)
        torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


def _bilinear_by_hand(low: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of ``low`` [H, W] with half-pixel centres, edges clamped: output pixel
    i reads source coordinate (i + 0.5) * H / size - 0.5."""
    n = low.shape[0]
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            y = min(max((i + 0.5) * n / size - 0.5, 0.0), n - 1)
            x = min(max((j + 0.5) * n / size - 0.5, 0.0), n - 1)
            y0, x0 = int(math.floor(y)), int(math.floor(x))
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * ((1 - dx) * low[y0, x0] + dx * low[y0, x1])
                         + dy * ((1 - dx) * low[y1, x0] + dx * low[y1, x1]))
    return out


def test_a_training_batch_conditions_on_the_hand_made_low_res_image():
    schedule = make_schedule("linear", 100)
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    config = SuperResConfig(low=4, cond_aug="none")
    c = superres.training_conditioning(config, schedule, x0, torch.Generator().manual_seed(0))
    assert torch.equal(c.cond_level, torch.zeros(3, dtype=torch.long))
    for b in range(3):
        # area averaging by hand: each low pixel the mean of its 2x2 block
        block = x0[b, 0].double().numpy().reshape(4, 2, 4, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(c.cond[b, 0].double().numpy(), _bilinear_by_hand(block, 8),
                                   rtol=0, atol=1e-6)


def test_a_gaussian_blur_of_a_point_is_the_normalised_kernel_and_sigma_0_is_the_identity():
    x = torch.zeros(2, 1, 15, 15)
    x[:, :, 7, 7] = 1.0
    sigma = torch.tensor([0.8, 0.0])
    out = superres.gaussian_blur(x, sigma)
    r = torch.arange(-3, 4, dtype=torch.float64)  # the radius ceil(3 * 0.8) = 3
    g = torch.exp(-0.5 * (r / 0.8) ** 2)
    g = g / g.sum()
    expected = torch.zeros(15, 15, dtype=torch.float64)
    expected[4:11, 4:11] = g[:, None] * g[None, :]
    torch.testing.assert_close(out[0, 0].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(out[1], x[1])  # sigma 0: the same bits
    torch.testing.assert_close(float(out[0].sum()), 1.0, rtol=0, atol=1e-5)  # mass kept


@pytest.mark.parametrize("level", [1, 30, 100])
def test_the_noise_augmentation_at_step_s_is_the_forward_process_at_s(level):
    schedule = make_schedule("linear", 100)
    n = 20_000
    x = torch.linspace(-1, 1, 8).reshape(1, 1, 1, 8).expand(n, 1, 1, 8)
    eps = torch.randn(n, 1, 1, 8, generator=torch.Generator().manual_seed(level))
    z = superres.noise_augment(schedule, x, torch.full((n,), level), eps).double()
    alpha_bar = float(schedule.alphas_cumprod[level - 1])  # level s is the paper's t = s
    mean, var = z.mean(0), z.var(0)
    # the sample mean's standard error is sqrt((1 - ab) / n); the variance's sqrt(2 / n) (1 - ab)
    se_mean, se_var = math.sqrt((1 - alpha_bar) / n), math.sqrt(2 / n) * (1 - alpha_bar)
    torch.testing.assert_close(mean, math.sqrt(alpha_bar) * x[0].double(), rtol=0, atol=5 * se_mean)
    torch.testing.assert_close(var, torch.full_like(var, 1 - alpha_bar), rtol=0, atol=5 * se_var)


def test_level_0_leaves_the_low_res_input_as_it_was_to_the_bit():
    schedule = make_schedule("linear", 1000)
    x = torch.randn(4, 3, 8, 8)
    eps = torch.randn(4, 3, 8, 8)
    assert torch.equal(superres.noise_augment(schedule, x, torch.zeros(4, dtype=torch.long), eps), x)


# --- the network and the trainer ------------------------------------------------------------------


def sr_config(data_dir, **superres_settings) -> RunConfig:
    """The tiny preset as a 14 -> 28 px super-resolution run, fp32, 4 steps."""
    c = tiny_config(data_dir, steps=4, precision="fp32", checkpoint_every=0)
    sr = SuperResConfig(low=14, **superres_settings)
    return resolve(dataclasses.replace(c, superres=sr))


def test_a_super_resolution_unet_takes_the_low_res_image_beside_x_t(fake_fashion):
    config = sr_config(fake_fashion)
    assert (config.model.cond_channels, config.model.level_embedding) == (1, True)
    net = UNet(config.model)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 50])
    cond, level = torch.randn(2, 1, 28, 28), torch.tensor([0, 7])
    out = net(x, t, cond=cond, cond_level=level)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="takes its low-res input"):
        net(x, t)
    plain = resolve(tiny_config(fake_fashion)).model
    assert (plain.cond_channels, plain.level_embedding) == (0, False)


def test_noise_augmentation_that_never_noises_trains_and_samples_what_none_does(tmp_path, fake_fashion):
    """Every super-resolution batch draws the same randomness whatever its augmentation, so a
    run whose levels are all 0 is the run without augmentation, weights and samples."""
    train(sr_config(fake_fashion, cond_aug="none"), tmp_path / "none", progress=False,
          final_grid=False)
    train(sr_config(fake_fashion, cond_aug="noise", aug_max=0.0), tmp_path / "noise0",
          progress=False, final_grid=False)
    a, b = (load_run_or_file(tmp_path / name)[1] for name in ("none", "noise0"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    low = torch.rand(3, 1, 14, 14, generator=torch.Generator().manual_seed(3)) * 2 - 1
    images = [load_pipeline(tmp_path / name).generate(3, low_res=low, sampler="ddim",
                                                      num_sample_steps=5)
              for name in ("none", "noise0")]
    assert torch.equal(images[0], images[1])
    # and the same model sampled with noise at a level above 0 is not the same
    noisy = load_pipeline(tmp_path / "noise0")
    noisy.config = dataclasses.replace(noisy.config, superres=dataclasses.replace(
        noisy.config.superres, aug_level=0.5))
    assert not torch.equal(noisy.generate(3, low_res=low, sampler="ddim", num_sample_steps=5),
                           images[0])


def test_a_super_resolution_pipeline_refuses_missing_or_misshapen_inputs(tmp_path, fake_fashion):
    train(sr_config(fake_fashion), tmp_path / "sr", progress=False, final_grid=False)
    pipe = load_pipeline(tmp_path / "sr")
    assert pipe.low_res == 14
    with pytest.raises(ValueError, match="super-resolution model: it takes 2 low-res images of 1x14x14"):
        pipe.generate(2)
    with pytest.raises(ValueError, match="super-resolves 1x14x14 images, and got 1x7x7"):
        pipe.generate(2, low_res=torch.zeros(2, 1, 7, 7))


@pytest.mark.parametrize("args, message", [
    (["--super-res", "10"], "--super-res 10 must be smaller than the images' 28 px and divide it"),
    (["--super-res", "28"], "--super-res 28 must be smaller"),
    (["--cond-aug", "blur"], "--cond-aug and the other conditioning settings are for a "
                             "super-resolution model; add --super-res LOW"),
    (["--super-res", "14", "--cond-blur-min", "2", "--cond-blur-max", "1"],
     "--cond-blur-min 2.0 is above --cond-blur-max 1.0"),
    (["--super-res", "14", "--cond-aug-max", "1.5"], "--cond-aug-max: expected a number in [0, 1], got 1.5"),
])
def test_bad_super_resolution_settings_are_refused_in_one_line(tmp_path, fake_fashion, args, message):
    out = tmp_path / "run"
    r = cli("train", "--preset", "tiny", "--data-dir", str(fake_fashion), "--steps", "2",
            "--out", str(out), *args)
    assert_refused(r, message)
    assert not out.exists()


def test_a_super_resolution_run_trains_through_the_cli_with_previews_and_fid(tmp_path, fake_fashion):
    out = tmp_path / "sr"
    r = cli("train", "--preset", "tiny", "--data-dir", str(fake_fashion), "--steps", "4",
            "--super-res", "14", "--cond-aug", "noise+blur", "--sample-every", "2",
            "--fid-every", "4", "--fid-n", "128", "--fid-steps", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert ("super-resolution: from 14 px, conditioning augmentation noise to a level in "
            "[0, 0.25] (sampling at 0), blur sigma 0.4-0.6 px (sampling at 0)") in r.stdout
    assert (out / "grid.png").exists() and (out / "samples" / "step-00000002.png").exists()
    fids = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"fid"' in line]
    assert len(fids) == 1 and math.isfinite(fids[0]["fid"])


def test_a_resumed_super_resolution_run_is_the_uninterrupted_run(tmp_path, fake_fashion):
    config = sr_config(fake_fashion, cond_aug="noise+blur")
    train(config, tmp_path / "whole", progress=False, final_grid=False)
    train(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=2)),
          tmp_path / "split", progress=False, final_grid=False)
    train(resume_config(tmp_path / "split", steps=4), tmp_path / "split", resume=True,
          progress=False, final_grid=False)
    a, b = (load_run_or_file(tmp_path / name)[1] for name in ("whole", "split"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


# --- chains -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory, fake_fashion):
    """A tiny 14 px base model and a tiny 14 -> 28 px super-resolution model of it."""
    root = tmp_path_factory.mktemp("chain")
    base = tiny_config(fake_fashion, steps=4, precision="fp32", checkpoint_every=0)
    base = resolve(dataclasses.replace(base, data=dataclasses.replace(base.data, image_size=14)))
    train(base, root / "base", progress=False, final_grid=False)
    train(sr_config(fake_fashion), root / "sr", progress=False, final_grid=False)
    return root / "base", root / "sr"


def test_a_chain_through_the_cli_is_sample_then_upscale(tmp_path, chain_runs):
    base, sr = chain_runs
    r = cli("sample", str(base), "--then", str(sr), "--n", "3", "--steps", "4",
            "--stage-steps", "3", "--out", str(tmp_path / "chain.npz"))
    assert r.returncode == 0, r.stderr
    assert "super-resolved by 1 stage to 1x28x28" in r.stdout
    assert cli("sample", str(base), "--n", "3", "--steps", "4",
               "--out", str(tmp_path / "base.npz")).returncode == 0
    r = cli("upscale", str(sr), "--images", str(tmp_path / "base.npz"), "--steps", "3",
            "--seed", "1", "--out", str(tmp_path / "up.npz"))
    assert r.returncode == 0, r.stderr
    assert "3 images super-resolved from 14 to 28 px" in r.stdout
    chained, upscaled = (np.load(tmp_path / f"{name}.npz")["arr_0"] for name in ("chain", "up"))
    assert chained.shape == (3, 28, 28, 1)
    assert np.array_equal(chained, upscaled)


def test_a_chain_that_does_not_fit_is_refused_in_one_line(tmp_path, chain_runs, trained_run):
    base, sr = chain_runs
    out = tmp_path / "x.npz"
    cases = [
        ((str(trained_run[0]), "--then", str(sr)),  # a 28 px base before a 14 px input
         "stage 1 super-resolves 1x14x14 images, and the stage before it makes 1x28x28"),
        ((str(base), "--then", str(base)), "stage 1 is not a super-resolution model"),
        ((str(base), "--then", str(sr), "--then", str(sr)),
         "stage 2 super-resolves 1x14x14 images, and the stage before it makes 1x28x28"),
        ((str(base), "--stage-steps", "3"), "--stage-steps is a setting of the --then stages"),
        ((str(sr),), "this is a super-resolution model: it takes 64 low-res images of 1x14x14"),
    ]
    for args, message in cases:
        assert_refused(cli("sample", *args, "--out", str(out)), message)
        assert not out.exists()
    np.savez(tmp_path / "big.npz", np.zeros((2, 28, 28, 1), np.uint8))
    assert_refused(cli("upscale", str(sr), "--images", str(tmp_path / "big.npz"), "--out", str(out)),
                   "holds 1x28x28 images, and")
    assert_refused(cli("upscale", str(base), "--images", str(tmp_path / "big.npz"), "--out", str(out)),
                   "is not a super-resolution run")
    assert not out.exists()


def test_the_python_cascade_is_the_cli_chain(tmp_path, chain_runs):
    base, sr = chain_runs
    chain = load_cascade(base, [sr])
    images = chain.generate(3, seed=0, num_sample_steps=4, stage_steps=3, keep=True)
    assert [tuple(x.shape) for x in images] == [(3, 1, 14, 14), (3, 1, 28, 28)]
    assert cli("sample", str(base), "--then", str(sr), "--n", "3", "--steps", "4",
               "--stage-steps", "3", "--precision", "fp32",
               "--out", str(tmp_path / "c.npz")).returncode == 0
    saved = torch.from_numpy(np.load(tmp_path / "c.npz")["arr_0"]).permute(0, 3, 1, 2)
    assert torch.equal(to_uint8(images[-1]), saved)


def test_eval_scores_a_chain_at_its_last_stage_s_size(tmp_path, chain_runs):
    base, sr = chain_runs
    r = cli("eval", str(base), "--then", str(sr), "--n", "128", "--steps", "2", "--stage-steps",
            "2", "--json", "--save-samples", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert math.isfinite(result["fid"]) and result["n"] == 128
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (128, 28, 28, 1)
    assert_refused(cli("eval", "--images", str(tmp_path / "s.npz"), "--dataset", "fashion-mnist",
                       "--then", str(sr)), "--then only apply when generating")


def _blocky_toy(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """High-res 8 px images that are a fixed function of their 4 px versions: each low-res pixel
    (uniform in [-1, 1]) repeated over a 2x2 block."""
    low = torch.rand(n, 1, 4, 4, generator=generator) * 2 - 1
    return low.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), low


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))  # the range [-1, 1] is 2 wide


def test_a_tiny_model_s_output_averaged_down_again_is_its_input():
    """Consistency (the property Imagen's users found missing): on the blocky toy, after 200
    steps, outputs averaged back to 4 px match their inputs at 30 dB or more: an RMS error of
    0.063 on the 2-wide range, about 8 grey levels of 256, the bar the cascade is held to on
    base samples. Copying the bilinear conditioning through scores 19 dB, and the untrained
    model far less: only a model that uses its input passes."""
    config = with_conditioning(RunConfig(
        model=UNetConfig(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 2),
                         num_res_blocks=1, attention_resolutions=(), dropout=0.0, norm_groups=4),
        diffusion=DiffusionConfig(num_train_timesteps=100, prediction_type="v"),
        train=TrainConfig(batch_size=64, lr=2e-3, warmup_steps=0),
        superres=SuperResConfig(low=4, cond_aug="none")))
    torch.manual_seed(0)
    net, schedule = UNet(config.model), build_schedule(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    ema = EMA(net, 0.99)
    noise, data = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    x, low = _blocky_toy(256, torch.Generator().manual_seed(9))

    def consistency() -> float:
        pipe = Pipeline(ema.model, schedule, config, 0, torch.device("cpu"))
        out = pipe.generate(256, low_res=low, sampler="ddim", num_sample_steps=20)
        return _psnr(superres.downsample(out, 4), low)

    untrained = consistency()
    for _ in range(200):
        batch, _ = _blocky_toy(64, data)
        train_step(net, schedule, optimizer, [(batch, torch.zeros(64, dtype=torch.long))],
                   accelerator=_LoneProcess(), generator=noise, config=config,
                   device=torch.device("cpu"), lr=2e-3)
        ema.update(net)
    assert untrained < 15
    assert _psnr(superres.downsample(superres.upsample(low, 8), 4), low) < 20
    assert consistency() >= 30


def test_the_projection_is_the_nearest_image_whose_average_is_the_input():
    """Inside the bounds it is x0 + A^+ (low - A x0), with A the area averaging: the result
    averages down to ``low``; it is x0 itself when x0 already does; and what it adds is constant
    over each block (the range of A^T)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 12, 12, generator=g) * 0.6 - 0.3
    low = torch.rand(4, 3, 4, 4, generator=g) * 0.6 - 0.3  # so that nothing reaches +-1
    p = superres.project(x0, low)
    torch.testing.assert_close(superres.downsample(p, 4), low, rtol=0, atol=1e-6)
    torch.testing.assert_close(superres.project(p, low), p, rtol=0, atol=1e-6)
    shift = (p - x0).unfold(2, 3, 3).unfold(3, 3, 3)  # [4, 3, 4, 4, 3, 3]: each block's change
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift), rtol=0, atol=1e-6)


def test_the_bounded_projection_meets_its_optimality_conditions():
    """Where x0 + A^+ (low - A x0) would leave [-1, 1], the projection onto {x in [-1, 1], A x =
    low} is clip(x0 + lam, -1, 1) with one lam per block (the KKT conditions, sufficient for this
    convex problem): checked pixel by pixel, and against random feasible images, none nearer."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 12, 12, generator=g) * 2  # most blocks clip somewhere
    low = torch.rand(4, 3, 4, 4, generator=g) * 1.9 - 0.95
    p = superres.project(x0, low)
    assert p.abs().max() <= 1
    torch.testing.assert_close(superres.downsample(p, 4), low, rtol=0, atol=1e-5)
    blocks = lambda v: v.unfold(2, 3, 3).unfold(3, 3, 3).reshape(4, 3, 4, 4, 9)  # noqa: E731
    xb, pb = blocks(x0), blocks(p)
    free = pb.abs() < 1 - 1e-6
    assert free.any(-1).all() and (~free).any()  # every block has a free pixel; some clip
    lam = ((pb - xb) * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True)
    torch.testing.assert_close((pb - xb)[free], lam.expand_as(pb)[free], rtol=0, atol=1e-5)
    assert ((xb + lam)[pb >= 1 - 1e-6] >= 1 - 1e-5).all()  # clipped at 1 only where x0 + lam >= 1
    assert ((xb + lam)[pb <= -1 + 1e-6] <= -1 + 1e-5).all()
    for _ in range(20):
        other = superres.project(torch.randn(4, 3, 12, 12, generator=g), low)  # also feasible
        assert ((other - x0) ** 2).sum() > ((p - x0) ** 2).sum()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++", "euler", "heun"])
def test_a_projected_stage_s_outputs_average_down_to_their_inputs(chain_runs, sampler):
    """With --cond-project every sampler's last step lands on a projected x0, so the output
    averaged down is its input to float precision, even from the untrained network (which, left
    alone, ignores it)."""
    _, sr = chain_runs
    pipe = load_pipeline(sr, precision="fp32")
    low, _ = low_res_inputs(pipe.config, 6)
    plain = pipe.generate(6, low_res=low, sampler=sampler, num_sample_steps=4)
    projected = pipe.conditioned(project=True).generate(6, low_res=low, sampler=sampler,
                                                        num_sample_steps=4)
    assert _psnr(superres.downsample(plain, 14), low) < 25
    torch.testing.assert_close(superres.downsample(projected, 14), low, rtol=0, atol=1e-4)


def test_cond_project_through_the_cli(tmp_path, chain_runs):
    base, sr = chain_runs
    images = {}
    for name, extra in (("plain", ()), ("projected", ("--cond-project",))):
        r = cli("sample", str(base), "--then", str(sr), "--n", "4", "--steps", "3",
                "--stage-steps", "3", "--out", str(tmp_path / f"{name}.npz"), *extra)
        assert r.returncode == 0, r.stderr
        images[name] = torch.from_numpy(np.load(tmp_path / f"{name}.npz")["arr_0"]).permute(0, 3, 1, 2)
    r = cli("sample", str(base), "--n", "4", "--steps", "3", "--out", str(tmp_path / "low.npz"))
    assert r.returncode == 0, r.stderr
    low = torch.from_numpy(np.load(tmp_path / "low.npz")["arr_0"]).permute(0, 3, 1, 2)

    def psnr(high: torch.Tensor) -> float:  # 8-bit images on [-1, 1]
        return _psnr(superres.downsample(high.float() / 127.5 - 1, 14), low.float() / 127.5 - 1)

    # within the 8-bit rounding of input and output (and the clipping of the output to [-1, 1])
    assert psnr(images["projected"]) > 40 > psnr(images["plain"])
    assert_refused(cli("sample", str(base), "--cond-project", "--out", str(tmp_path / "x.npz")),
                   "--cond-project is a setting of the --then stages")


def test_eval_of_a_super_resolution_run_alone_super_resolves_held_out_images(tmp_path, chain_runs):
    _, sr = chain_runs
    r = cli("eval", str(sr), "--n", "128", "--steps", "2", "--json", "--precision", "fp32",
            "--save-samples", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr
    saved = torch.from_numpy(np.load(tmp_path / "s.npz")["arr_0"]).permute(0, 3, 1, 2)
    config = load_pipeline(sr).config
    expected = to_uint8(load_pipeline(sr).generate(128, low_res=low_res_inputs(config, 128)[0],
                                                   num_sample_steps=2))
    assert saved.shape == (128, 1, 28, 28)
    assert torch.equal(saved, expected)


def test_commands_that_cannot_take_a_super_resolution_run_say_so(tmp_path, chain_runs):
    base, sr = chain_runs
    assert_refused(cli("serve", str(base), "--then", str(base), "--port", "0"),
                   "stage 1 is not a super-resolution model")
    assert_refused(cli("serve", str(sr), "--port", "0"),
                   "is a super-resolution run, a later stage of a cascade: serve its base run")
    out = tmp_path / "export"
    assert_refused(cli("export", str(sr), str(out), "--format", "diffusers"),
                   "a super-resolution model takes its low-res input")
    assert not out.exists()
    assert_refused(cli("viz", "reverse", str(sr), "--out", str(tmp_path / "r.gif")),
                   "this is a super-resolution model")
    assert not (tmp_path / "r.gif").exists()


def test_viz_reverse_of_a_chain_shows_every_stage_at_the_last_size(tmp_path, chain_runs):
    base, sr = chain_runs
    out = tmp_path / "r.gif"
    r = cli("viz", "reverse", str(base), "--then", str(sr), "--n", "4", "--steps", "4",
            "--stage-steps", "3", "--frames", "3", "--scale", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "then 1 super-resolution stage(s)" in r.stdout
    frames = read_animation(out)
    # 3 frames of the base's 5 states, then 3 of the stage's 4; one 2x2 grid of 28 px images each
    assert len(frames) == 6
    assert {f.shape[:2] for f in frames} == {frames[0].shape[:2]}
    assert frames[0].shape[0] > 2 * 28
    assert_refused(cli("viz", "reverse", str(base), "--then", str(sr), "--sheet",
                       str(tmp_path / "s.png"), "--out", str(tmp_path / "x.gif")),
                   "--sheet draws one model's reverse process")


def test_a_class_conditional_stage_is_guided_and_takes_the_base_s_labels(tmp_path, fake_fashion):
    config = sr_config(fake_fashion)
    config = resolve(dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=10)))
    train(config, tmp_path / "sr", progress=False, final_grid=False)
    pipe = load_pipeline(tmp_path / "sr")
    low, labels = low_res_inputs(pipe.config, 4)
    guided = pipe.generate(4, low_res=low, labels=labels, guidance=2.0, num_sample_steps=3)
    plain = pipe.generate(4, low_res=low, labels=labels, guidance=0.0, num_sample_steps=3)
    assert guided.shape == (4, 1, 28, 28) and not torch.equal(guided, plain)


def test_the_sampling_level_of_the_noise_augmentation_is_chosen_at_sampling(tmp_path, chain_runs):
    base, sr = chain_runs
    runs = {}
    for name, extra in (("default", ()), ("zero", ("--cond-aug-level", "0")),
                        ("half", ("--cond-aug-level", "0.5"))):
        out = tmp_path / f"{name}.npz"
        r = cli("sample", str(base), "--then", str(sr), "--n", "2", "--steps", "3",
                "--stage-steps", "3", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        runs[name] = np.load(out)["arr_0"]
    assert np.array_equal(runs["default"], runs["zero"])  # the run's own level is 0
    assert not np.array_equal(runs["zero"], runs["half"])
    assert_refused(cli("sample", str(base), "--cond-aug-level", "0.1", "--out",
                       str(tmp_path / "x.npz")), "--cond-aug-level is a setting of the --then stages")
    assert_refused(cli("upscale", str(sr), "--images", str(tmp_path / "zero.npz"), "--cond-blur",
                       "-1", "--out", str(tmp_path / "y.npz")), "--cond-blur")


def test_the_web_page_serves_a_chain_at_its_last_size(chain_runs):
    base, sr = chain_runs
    pipe = load_pipeline(base)
    stages = Cascade(pipe, [load_pipeline(sr)]).stages
    server = WebServer(pipe, str(base), Limits(), port=0, stages=stages).start()
    try:
        c = Client(server.url)
        model = c.json("/api/model")
        assert (model["image_size"], model["channels"], model["stages"]) == (28, 1, 1)
        status, events = c.generate({"steps": 3, "n": 1, "seed": 0})
        assert status == 200 and events[-1][0] == "done", events[-1]
        assert "stage" in [name for name, _ in events]
        grid = png_pixels(events[-1][1]["grid"])
        assert grid.shape[:2] == (28, 28)  # one 28 px image
        # the same image the chain makes from the command line's settings
        expected = Cascade(pipe, stages).generate(1, seed=0, num_sample_steps=3)
        assert np.array_equal(grid[..., 0], to_uint8(expected)[0, 0].numpy())
    finally:
        server.stop()
