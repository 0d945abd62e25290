"""The autoencoder of latent diffusion (models/autoencoder.py, autoencoder.py,
train_autoencoder.py and 'ddpm train-autoencoder'): the KL and PSNR against closed forms, the
scale factor, what training learns, exact resume, and the command's refusals."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from ddpm.autoencoder import (
    AutoencoderLossConfig,
    AutoencoderRunConfig,
    adversarial_weight,
    autoencoder_loss,
    discriminator_loss,
    encode_images,
    latent_scale,
    load_autoencoder,
    psnr,
    weights_hash,
)
from ddpm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from ddpm.data import ImageData
from ddpm.models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, PatchDiscriminator
from ddpm.settings import SettingError

from conftest import assert_refused, cli, ddpm_in_process, snapshot

TINY = ("--base-channels", 8, "--downsample", 2, "--latent-channels", 2, "--batch-size", 8,
        "--norm-groups", 4, "--no-progress")


def tiny_args(data, out, *extra):
    return ("train-autoencoder", "--dataset", "fashion-mnist", "--data-dir", data, *TINY,
            "--out", out, *extra)


# --- the maths --------------------------------------------------------------------------------


def test_the_discriminator_hinge_loss_and_the_adaptive_weight_are_their_closed_forms():
    real, fake = torch.tensor([[2.0, 0.5], [-1.0, 0.0]]), torch.tensor([[-3.0, 0.2], [1.0, -0.5]])
    # identity "discriminator": the logits are the inputs
    got = discriminator_loss(torch.nn.Identity(), real, fake)
    expected = 0.5 * ((0 + 0.5 + 2 + 1) / 4 + (0 + 1.2 + 2 + 0.5) / 4)
    assert float(got) == pytest.approx(expected)
    # lambda = |grad L_rec| / (|grad L_adv| + 1e-4) at the last layer w
    w = torch.ones(2, 2, requires_grad=True)
    rec, adv = (3 * w).sum(), (w * w).sum()  # gradients 3 and 2w = 2 everywhere
    weight = adversarial_weight(rec, adv, w)
    assert float(weight) == pytest.approx(6 / (4 + 1e-4)) and not weight.requires_grad


def test_the_loss_adds_the_weighted_feature_distance_and_adversarial_term():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(image_size=8, downsample=2, latent_channels=2,
                                       base_channels=8, norm_groups=4))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    base = AutoencoderLossConfig(kl_weight=0.01)
    plain, parts = autoencoder_loss(ae, x, base, torch.Generator().manual_seed(3))
    flat = torch.nn.Flatten()
    with_features, more = autoencoder_loss(
        ae, x, AutoencoderLossConfig(kl_weight=0.01, perceptual_weight=0.5),
        torch.Generator().manual_seed(3), features=flat)
    distance = (flat(parts["x_hat"]) - flat(x)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(with_features, plain + 0.5 * distance)
    torch.testing.assert_close(more["perceptual"], distance)
    judge = PatchDiscriminator(1, 8, 4)
    judged, parts = autoencoder_loss(ae, x, AutoencoderLossConfig(kl_weight=0.01, disc_weight=0.5),
                                     torch.Generator().manual_seed(3), discriminator=judge)
    torch.testing.assert_close(judged, plain + 0.5 * parts["adv_weight"] * parts["adv"])
    torch.testing.assert_close(parts["adv"], -judge(parts["x_hat"]).mean())


def test_kl_of_a_diagonal_gaussian_is_its_closed_form():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # torch.distributions' own closed form, summed over each image's latent elements
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()),
        torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean)),
    ).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(), expected, rtol=1e-12, atol=1e-12)
    # and zero exactly at the prior itself
    prior = DiagonalGaussian(torch.zeros(2, 4, 3, 3, dtype=torch.float64))
    assert torch.equal(prior.kl(), torch.zeros(2, dtype=torch.float64))


def test_posterior_samples_have_the_posterior_moments():
    mean, logvar = torch.full((1, 1, 100, 100), 0.5), torch.full((1, 1, 100, 100), math.log(4.0))
    z = DiagonalGaussian(torch.cat([mean, logvar], 1)).sample(torch.Generator().manual_seed(1))
    assert abs(z.mean().item() - 0.5) < 4 * 2 / 100  # 4 standard errors of 10,000 draws
    assert abs(z.std().item() / 2 - 1) < 0.03


def test_psnr_is_its_closed_form():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] += 10  # MSE 100: 10 log10(255^2 / 100)
    b[1, 0, 0, :] = 255  # one row of 4 of 16 pixels off by 255: MSE 255^2 / 4
    torch.testing.assert_close(psnr(a, b), torch.tensor(
        [10 * math.log10(255**2 / 100), 10 * math.log10(4.0)], dtype=torch.float64))


def test_the_loss_is_the_summed_reconstruction_error_plus_the_weighted_kl():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(image_size=8, downsample=2, latent_channels=2,
                                       base_channels=8, norm_groups=4))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    for reconstruction in ("l1", "l2"):
        config = AutoencoderLossConfig(reconstruction=reconstruction, kl_weight=0.01)
        loss, parts = autoencoder_loss(ae, x, config, torch.Generator().manual_seed(3))
        # the same draw of z by hand
        q = ae.encode(x)
        x_hat = ae.decode(q.sample(torch.Generator().manual_seed(3)))
        err = (x - x_hat).abs() if reconstruction == "l1" else (x - x_hat) ** 2
        expected = err.sum(dim=(1, 2, 3)).mean() + 0.01 * q.kl().mean()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(parts["rec"], err.mean())


def test_the_network_has_the_shapes_of_each_downsampling_factor():
    for f, size in ((1, 8), (2, 8), (4, 16), (8, 32)):
        ae = Autoencoder(AutoencoderConfig(in_channels=3, image_size=size, downsample=f,
                                           latent_channels=5, base_channels=8, norm_groups=4))
        x = torch.randn(2, 3, size, size)
        x_hat, q = ae(x)
        assert q.mean.shape == (2, 5, size // f, size // f) == q.logvar.shape
        assert x_hat.shape == x.shape
        assert len(ae.encoder.levels) == int(math.log2(f)) + 1


def test_a_factor_that_does_not_divide_the_image_size_is_refused():
    with pytest.raises(SettingError, match="factor model.downsample 8 does not divide the image "
                                           "size 28: give 1 or 2 or 4"):
        AutoencoderConfig(image_size=28, downsample=8).validate()
    with pytest.raises(ValueError, match="unknown downsample 3; choose one of 1, 2, 4, 8"):
        AutoencoderConfig(image_size=27, downsample=3).validate()


# --- what training learns ---------------------------------------------------------------------


def blobs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """A fixed synthetic set: one Gaussian blob per image at a random place and width, in
    [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * (size - 6) + 3
    width = torch.rand(n, generator=g) * 2 + 1.5
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    d2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    return (2 * torch.exp(-d2 / (2 * width[:, None, None] ** 2)) - 1)[:, None]


def fit(x: torch.Tensor, kl_weight: float, steps: int = 100) -> tuple[Autoencoder, float, float]:
    """A tiny autoencoder fitted to ``x``; its mean absolute error and mean KL after."""
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(image_size=12, downsample=2, latent_channels=2,
                                       base_channels=8, norm_groups=4))
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    config = AutoencoderLossConfig(kl_weight=kl_weight)
    for _ in range(steps):
        loss, _ = autoencoder_loss(ae, x, config, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = ae.encode(x)
        error = (ae.decode(q.mean) - x).abs().mean().item()
        return ae, error, q.kl().mean().item()


def test_a_tiny_autoencoder_learns_to_reconstruct_and_a_heavier_kl_shrinks_the_kl():
    """The yardstick is the error of the best constant guess, the mean image: a network that
    learned nothing of each image cannot do better. After 100 steps it is under a fifth of it
    (about a fourteenth when measured), and the KL 100x heavier leaves about a sixth of the KL."""
    x = blobs(32, size=12)
    baseline = (x - x.mean(0, keepdim=True)).abs().mean().item()
    _, error, kl = fit(x, kl_weight=1e-3)
    assert error < baseline / 5, (error, baseline)
    _, _, kl_heavy = fit(x, kl_weight=1e-1)
    assert kl_heavy < 0.5 * kl, (kl_heavy, kl)


def test_the_scale_factor_gives_the_training_latents_unit_std():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(image_size=16, downsample=2, latent_channels=2,
                                       base_channels=8, norm_groups=4)).eval()
    with torch.no_grad():  # latents far from unit scale, as a trained encoder's often are
        ae.encoder.conv_out.weight.mul_(20)
    images = ((blobs(3000) + 1) * 127.5).round().to(torch.uint8)
    data = ImageData(images, torch.zeros(3000, dtype=torch.long), "blobs", ())
    scale = latent_scale(ae, data, seed=0)
    z = encode_images(ae, images, sample=True, generator=torch.Generator().manual_seed(9))
    assert abs(1 / z.std().item() - 1) > 0.2  # there was something to correct
    assert abs((scale * z).std().item() - 1) < 0.01


# --- the run ----------------------------------------------------------------------------------


def test_train_autoencoder_writes_a_run_with_a_scale_and_scores(tmp_path, fake_fashion):
    run = tmp_path / "ae"
    code, out, err = cli(*tiny_args(fake_fashion, run, "--steps", 4, "--sample-every", 2,
                                    "--checkpoint-every", 2))
    assert code == 0, err
    assert "latents 2x14x14 (F = 2)" in out and "PSNR" in out and "rFID" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["downsample"] == 2 and "ema_decay" not in config["train"]
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000004.pt", "ckpt-00000002.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "recon-00000002.png", "recon-00000004.png"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rec", "kl"} <= set(records[0]) and "test_psnr" in records[-1]
    loaded = load_autoencoder(run)
    assert loaded.scale_factor > 0 and loaded.config.model.latent_channels == 2
    assert loaded.sha256 == weights_hash(load_checkpoint(list_checkpoints(run)[0]))


def test_rfid_of_a_larger_run_is_measured_at_the_classifiers_28_px(tmp_path, fake_fashion):
    """Fashion-MNIST trained at 32 px: the rFID is the FID of the test images and their
    reconstructions, both resized to the packaged classifier's 28 px (as eval resizes samples)."""
    import torch.nn.functional as F

    from ddpm.autoencoder import images_at, reconstruct
    from ddpm.data import open_dataset
    from ddpm.metrics import classifier_extractor, feature_statistics, frechet_distance

    run = tmp_path / "ae"
    code, out, err = cli(*tiny_args(fake_fashion, run, "--steps", 2, "--image-size", 32))
    assert code == 0, err
    assert "rFID" in out
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["step"] == 2 and final["elapsed_s"] > 0  # the training's time beside its scores
    ae = load_autoencoder(run)
    test = open_dataset(dataclasses.replace(ae.config.data, split="test"))
    images = images_at(test, torch.arange(len(test)))  # all 64: FID does not depend on the order
    assert images.shape[1:] == (1, 32, 32)
    extractor = classifier_extractor("fashion-mnist")

    def at_28(x):
        return F.interpolate(x.float(), size=(28, 28), mode="bilinear", antialias=True,
                             align_corners=False)

    features = [extractor(at_28(x).round().clamp(0, 255).to(torch.uint8))
                for x in (images, reconstruct(ae.model, images))]
    expected = frechet_distance(*feature_statistics(features[0]), *feature_statistics(features[1]))
    assert final["test_rfid"] == pytest.approx(expected, rel=1e-4)


JUDGED = ("--disc-weight", 0.5, "--disc-start", 2, "--perceptual-weight", 0.01, "--log-every", 1)


@pytest.mark.parametrize("extra", [(), JUDGED], ids=["plain", "discriminator-and-perceptual"])
def test_resume_equals_the_uninterrupted_run(tmp_path, fake_fashion, extra):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli(*tiny_args(fake_fashion, whole, "--steps", 6, "--checkpoint-every", 3, *extra))[0] == 0
    assert cli(*tiny_args(fake_fashion, parts, "--steps", 3, *extra))[0] == 0
    code, out, err = cli("train-autoencoder", "--resume", parts, "--steps", 6, "--no-progress")
    assert code == 0, err
    a, b = (load_checkpoint(list_checkpoints(r)[0]) for r in (whole, parts))
    assert a["step"] == b["step"] == 6
    keys = ("model", "optimizer") + (("discriminator", "discriminator_optimizer") if extra else ())
    assert all(key in a for key in keys)
    if extra:  # the discriminator trains, and judges, from its start step
        logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
        judged = [r["step"] for r in logged if "d_loss" in r]
        steps = [r for r in logged if "loss" in r]
        assert judged == [3, 4, 5, 6] and all(("adv_weight" in r) == (r["step"] > 2) for r in steps)
        assert all("perceptual" in r for r in steps)
    for key in keys:
        flat_a, flat_b = _tensors(a[key]), _tensors(b[key])
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), key
    assert a["scale_factor"] == b["scale_factor"]
    # a resume may change what the declarations allow (steps, minutes, threads, device), no more
    before = snapshot(parts)
    r = ddpm_in_process("train-autoencoder", "--resume", parts, "--kl-weight", 1)
    assert_refused(r, "loss.kl_weight is 1e-06 in")
    assert snapshot(parts) == before


def _tensors(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _tensors(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree if isinstance(tree, torch.Tensor) else torch.tensor(float(tree))} \
        if isinstance(tree, (torch.Tensor, int, float)) else {}


@pytest.mark.parametrize("extra, message", [
    (("--image-size", 28, "--downsample", 8),
     "--downsample 8 does not divide the image size 28: give 1 or 2 or 4"),
    (("--kl-weight", -1), "--kl-weight"),
    (("--reconstruction", "l3"), "invalid choice: 'l3'"),
    (("--dataset", "cifar10", "--perceptual-weight", 1), "--perceptual-weight needs a packaged "
                                                         "feature classifier"),
    (("--image-size", 32, "--perceptual-weight", 1), "and fashion-mnist has none at this size"),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, fake_fashion, extra, message):
    before = snapshot(tmp_path)
    r = ddpm_in_process("train-autoencoder", "--dataset", "fashion-mnist", "--data-dir",
                        fake_fashion, "--out", tmp_path / "ae", *extra)
    assert_refused(r, message)
    assert snapshot(tmp_path) == before and not (tmp_path / "ae").exists()


def test_a_preset_is_the_recipe_the_options_override_and_resume_keeps(tmp_path, fake_fashion):
    from ddpm.presets import get_autoencoder_preset

    code, out, err = cli("train-autoencoder", "--preset", "fashion64-ae", "--data-dir",
                         fake_fashion, "--dry-run")
    assert code == 0, err
    config = json.loads(out)["config"]
    recipe = get_autoencoder_preset("fashion64-ae").resolved().to_dict()
    assert {k: v for k, v in config["model"].items()} == recipe["model"]
    assert (config["model"]["base_channels"], config["data"]["image_size"],
            config["train"]["minutes"]) == (16, 64, 10.0)
    # the options given win over the preset's, and a stopping rule replaces the other
    small = ("--preset", "fashion64-ae", "--data-dir", fake_fashion, "--image-size", 32,
             "--base-channels", 4, "--norm-groups", 4, "--batch-size", 4, "--no-progress")
    run = tmp_path / "ae"
    code, out, err = cli("train-autoencoder", *small, "--steps", 2, "--out", run)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["model"]["base_channels"], saved["model"]["downsample"],
            saved["data"]["image_size"], saved["train"]["steps"], saved["train"]["minutes"]) == \
        (4, 4, 32, 2, None)
    # the job script run again with --resume added: the preset builds the run's settings
    code, out, err = cli("train-autoencoder", "--resume", run, *small, "--steps", 3)
    assert code == 0, err
    assert load_checkpoint(list_checkpoints(run)[0])["step"] == 3
    # the preset alone would build another autoencoder than the run's: refused, nothing written
    before = snapshot(tmp_path)
    r = ddpm_in_process("train-autoencoder", "--resume", run, "--preset", "fashion64-ae",
                        "--data-dir", fake_fashion, "--steps", 4)
    assert_refused(r, f"model.image_size is 32 in {run}, not 64")
    assert snapshot(tmp_path) == before


def test_a_diffusion_run_is_not_an_autoencoder(tmp_path, fake_fashion):
    run = tmp_path / "diffusion"
    assert cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", 1,
               "--sample-every", 0, "--out", run, "--no-progress")[0] == 0
    with pytest.raises(CheckpointError, match="is a diffusion run, not an autoencoder"):
        load_autoencoder(run)
    r = ddpm_in_process("train-autoencoder", "--resume", run)
    assert_refused(r, "is a diffusion run; resume it with 'ddpm train --resume")
    with pytest.raises(CheckpointError, match="does not exist|neither"):
        load_autoencoder(tmp_path / "missing")


def test_a_config_from_python_refuses_what_the_command_line_does():
    with pytest.raises(ValueError, match="train.ema_decay is a diffusion setting"):
        AutoencoderRunConfig().with_overrides({"train": {"ema_decay": 0.9}}, resolve=False)
    with pytest.raises(ValueError, match="unknown config section"):
        AutoencoderRunConfig().with_overrides({"diffusion": {}}, resolve=False)
    with pytest.raises(ValueError, match="unknown setting loss.kl"):
        AutoencoderRunConfig().with_overrides({"loss": {"kl": 1.0}}, resolve=False)

