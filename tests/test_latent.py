"""latent.py and 'ddpm train --autoencoder': latent diffusion equals pixel diffusion through an
identity autoencoder, the latents are encoded once and drawn as the stream draws images, a
latent run names its autoencoder by hash, and every command decodes its samples."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ddpm import get_preset, latent, train
from ddpm.autoencoder import AutoencoderRunConfig, LoadedAutoencoder
from ddpm.checkpoint import load_run_or_file
from ddpm.config import LatentConfig, resolve
from ddpm.data import BatchStream, ImageData, LatentData, open_dataset
from ddpm.data.pixels import flip_draws
from ddpm.models.autoencoder import AutoencoderConfig, DiagonalGaussian
from ddpm.pipeline import load_pipeline
from ddpm.serve import Limits, WebServer
from ddpm.viz import read_animation

from conftest import Client, assert_refused, png_pixels, snapshot
from conftest import ddpm_in_process as cli

# --- an identity autoencoder: latent diffusion through it is pixel diffusion ----------------------


class IdentityCodec(nn.Module):
    """Encoder and decoder the identity (a posterior of the image itself, std ~ 0)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # where it lives, as a real autoencoder says

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def identity_autoencoder(data) -> LoadedAutoencoder:
    model = AutoencoderConfig(in_channels=data.channels, image_size=data.image_size, downsample=1,
                              latent_channels=data.channels)
    config = AutoencoderRunConfig(model=model, data=data)
    return LoadedAutoencoder(IdentityCodec(), 1.0, "1d" * 32, config, Path("identity"))


def pixel_and_latent_configs(data_dir):
    base = get_preset("tiny")
    base = dataclasses.replace(
        base, data=dataclasses.replace(base.data, data_dir=str(data_dir), hflip=True),
        train=dataclasses.replace(base.train, steps=4, sample_every=0, precision="fp32"),
        sample=dataclasses.replace(base.sample, x0_transform="none"))
    latent_config = dataclasses.replace(base, latent=LatentConfig(autoencoder="identity",
                                                                 posterior="mean"))
    return base, latent_config


def test_an_identity_autoencoder_trains_and_samples_what_pixel_diffusion_does(tmp_path, fake_fashion,
                                                                               monkeypatch):
    pixel, in_latents = pixel_and_latent_configs(fake_fashion)
    codec = identity_autoencoder(resolve(pixel).data)
    monkeypatch.setattr(latent, "load_autoencoder", lambda path, device="cpu": codec)
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    train(pixel, tmp_path / "pixel", progress=False, final_grid=False)
    train(in_latents, tmp_path / "latent", progress=False, final_grid=False)
    a, b = (load_run_or_file(tmp_path / name)[1] for name in ("pixel", "latent"))
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    assert b["config"]["latent"]["sha256"] == codec.sha256
    assert b["config"]["latent"]["channels"] == 1 and b["config"]["latent"]["downsample"] == 1
    # the latents were encoded once, with their mirror images, and cached
    assert len(list((tmp_path / "cache/latents").glob("*.npz"))) == 1
    images = [load_pipeline(tmp_path / name).generate(6, seed=2, num_sample_steps=8, batch_size=4)
              for name in ("pixel", "latent")]
    assert torch.equal(images[0], images[1])


# --- the latents and their stream -----------------------------------------------------------------


def test_the_split_is_encoded_once_and_a_damaged_cache_is_encoded_again(tmp_path, fake_fashion):
    data = open_dataset(resolve(get_preset("tiny")).data.__class__(data_dir=str(fake_fashion)))
    scale = 0.5
    codec = dataclasses.replace(identity_autoencoder(resolve(get_preset("tiny")).data),
                                scale_factor=scale)
    first = latent.encode_split(data, codec, hflip=True, sample=True, cache_dir=tmp_path)
    x = data.images.float() / 127.5 - 1
    # s * q(z | x): the scaled mean of each image and of its mirror image
    assert torch.allclose(first.mean, scale * x) and torch.allclose(first.flipped[0], scale * x.flip(-1))
    assert torch.equal(first.labels, data.labels) and first.classes == data.classes
    (cached,) = (tmp_path / "latents").glob("*.npz")
    again = latent.encode_split(data, codec, hflip=True, sample=True, cache_dir=tmp_path)
    assert torch.equal(again.mean, first.mean) and torch.equal(again.flipped[1], first.flipped[1])
    cached.write_bytes(b"damaged")
    repaired = latent.encode_split(data, codec, hflip=True, sample=True, cache_dir=tmp_path)
    assert torch.equal(repaired.mean, first.mean)
    # other images, or another autoencoder, are another cache entry
    other = ImageData(255 - data.images, data.labels, data.name, data.classes)
    latent.encode_split(other, codec, hflip=True, sample=True, cache_dir=tmp_path)
    latent.encode_split(data, dataclasses.replace(codec, sha256="2e" * 32), hflip=True,
                        sample=True, cache_dir=tmp_path)
    assert len(list((tmp_path / "latents").glob("*.npz"))) == 3


def test_the_stream_draws_each_latent_from_its_posterior_and_resumes():
    n = 64
    g = torch.Generator().manual_seed(0)
    mean, mirrored = torch.randn(n, 2, 4, 4, generator=g), torch.randn(n, 2, 4, 4, generator=g)
    std, mirrored_std = torch.rand(n, 2, 4, 4, generator=g) + 0.5, torch.rand(n, 2, 4, 4, generator=g)
    labels = torch.arange(n)
    data = LatentData(mean, std, labels, "toy", flipped=(mirrored, mirrored_std), sample=True)

    def stream():
        return BatchStream(data, 16, hflip=True, generator=torch.Generator().manual_seed(3))

    s = stream()
    draws = [s.next() for _ in range(6)]
    # the draws, in the stream's order: the epoch's permutation, then per batch the flips as
    # images are flipped, then eps of z = mean + std * eps (the reparameterisation)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(n, generator=g)
    for b, (z, y) in enumerate(draws[:4]):
        idx = perm[16 * b : 16 * (b + 1)]
        flip = flip_draws(16, g)
        eps = torch.randn(16, 2, 4, 4, generator=g)
        expected = torch.where(flip, mirrored[idx], mean[idx]) + \
            torch.where(flip, mirrored_std[idx], std[idx]) * eps
        assert torch.equal(y, labels[idx]) and torch.equal(z, expected), b
    # a stream restored from its state, and its generator's, draws what the first drew next
    s2 = stream()
    for _ in range(3):
        s2.next()
    s3 = stream()
    s3.load_state_dict(s2.state_dict())
    s3.generator.set_state(s2.generator.get_state())
    assert all(torch.equal(s3.next()[0], d[0]) for d in draws[3:])
    # the posterior's mean alone: no noise drawn
    mean_only = BatchStream(dataclasses.replace(data, sample=False), 16, hflip=False,
                            generator=torch.Generator().manual_seed(3))
    z, y = mean_only.next()
    assert torch.equal(z, mean[y])


# --- the command line, end to end -----------------------------------------------------------------

AE_ARGS = ("--base-channels", 8, "--downsample", 2, "--latent-channels", 2, "--batch-size", 8,
           "--norm-groups", 4, "--no-progress")


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory, fake_fashion):
    """An autoencoder (6 steps) and a tiny diffusion run in its latents (4 steps)."""
    root = tmp_path_factory.mktemp("latent")
    r = cli("train-autoencoder", "--data-dir", fake_fashion, *AE_ARGS, "--steps", 6, "--out",
            root / "ae")
    assert r.returncode == 0, r.stderr
    r = cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--autoencoder", root / "ae",
            "--steps", 4, "--sample-every", 2, "--out", root / "run", "--no-progress")
    assert r.returncode == 0, r.stderr
    return root / "ae", root / "run", r.stdout


def test_train_sample_eval_viz_and_serve_decode_the_latents(latent_runs, trained_run, tmp_path,
                                                             fake_fashion):
    ae, run, printed = latent_runs
    assert "latents: of the autoencoder" in printed
    config = json.loads((run / "config.json").read_text())
    assert config["latent"]["autoencoder"] == str(ae.absolute())
    assert (config["model"]["in_channels"], config["model"]["image_size"]) == (2, 14)
    assert config["sample"]["x0_transform"] == "none"
    # previews and the final grid are decoded: the size of a pixel run's grid of 28 px images
    pixel_grid = _image(trained_run[0] / "grid.png").size
    previews = sorted((run / "samples").glob("*.png"))
    assert previews and all(_image(g).size == pixel_grid for g in (run / "grid.png", *previews))
    r = cli("sample", run, "--n", 3, "--steps", 5, "--out", tmp_path / "s", "--no-progress")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) == 3 and all(np.asarray(_image(f)).shape[:2] == (28, 28) for f in files)
    r = cli("eval", run, "--n", 130, "--steps", 3, "--data-dir", fake_fashion, "--json",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["fid"] > 0
    for source, name in ((run, "latent.gif"), (trained_run[0], "pixel.gif")):
        r = cli("viz", "reverse", source, "--n", 2, "--steps", 6, "--out", tmp_path / name,
                "--no-progress")
        assert r.returncode == 0, r.stderr
    frames, pixel_frames = (read_animation(tmp_path / name) for name in ("latent.gif", "pixel.gif"))
    assert frames[-1].shape == pixel_frames[-1].shape  # frames of 28 px images
    # the web page describes and draws 28 px images
    server = WebServer(load_pipeline(run), str(run), Limits(), port=0).start()
    try:
        c = Client(server.url)
        model = c.json("/api/model")
        assert (model["image_size"], model["channels"]) == (28, 1)
        status, events = c.generate({"steps": 4, "n": 1, "seed": 0})
        assert status == 200 and events[-1][0] == "done"
        assert png_pixels(events[-1][1]["grid"]).shape[:2] == (28, 28)  # one image
    finally:
        server.stop()


def _image(path: Path) -> Image.Image:
    return Image.open(path)


def test_a_changed_or_missing_autoencoder_is_refused_naming_both_hashes(latent_runs, tmp_path):
    ae, run, _ = latent_runs
    copy = tmp_path / "ae"
    shutil.copytree(ae, copy)
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    recorded = config["latent"]["sha256"]
    # the run's own checkpoint, pointed at the copy: the same weights, accepted
    state = torch.load(sorted((moved / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=False)
    state["config"]["latent"]["autoencoder"] = str(copy)
    torch.save(state, moved / "checkpoints" / "ckpt-00000004.pt")
    r = cli("sample", moved, "--n", 1, "--steps", 2, "--out", tmp_path / "ok", "--no-progress")
    assert r.returncode == 0, r.stderr
    # the autoencoder trained on: its newest checkpoint now holds other weights
    r = cli("train-autoencoder", "--resume", copy, "--steps", 7, "--no-progress")
    assert r.returncode == 0, r.stderr
    new_hash = latent.load_autoencoder(copy).sha256
    before = snapshot(tmp_path)
    r = cli("sample", moved, "--n", 1, "--steps", 2, "--out", tmp_path / "no")
    assert_refused(r, "has changed since the run was trained")
    assert recorded[:16] in r.stderr and new_hash[:16] in r.stderr
    r = cli("train", "--resume", moved, "--steps", 6)
    assert_refused(r, "has changed since the run was trained")
    shutil.rmtree(copy)
    r = cli("sample", moved, "--n", 1, "--steps", 2, "--out", tmp_path / "no")
    assert_refused(r, "this run diffuses in the latents of an autoencoder")
    assert str(copy) in r.stderr
    assert snapshot(tmp_path) == {k: v for k, v in before.items() if not k.startswith("ae/")}


@pytest.mark.parametrize("args, message", [
    (("train", "--autoencoder", "{run}"), "is a diffusion run, not an autoencoder"),
    (("train", "--autoencoder", "{root}/nowhere"), "--autoencoder {root}/nowhere"),
    (("train", "--autoencoder", "{ae}", "--image-size", 32), "was trained on 1x28x28 images, and "
                                                           "this run's data are 1x32x32"),
    (("train", "--autoencoder", "{ae}", "--channels", 3), "was trained on 1x28x28 images"),
    (("train", "--autoencoder", "{ae}", "--crop", "random"), "--crop random cannot be used with "
                                                            "--autoencoder"),
    (("train", "--latent-posterior", "mean"), "--latent-posterior mean is a setting of latent "
                                               "diffusion; add --autoencoder"),
    (("sample", "{latent}", "--x0", "clip"), "--x0 clip would bound the predicted x0"),
    (("sample", "{latent}", "--x0", "dynamic"), "this model's x0 are an autoencoder's latents"),
    (("eval", "{latent}", "--nll"), "score it by FID/KID instead"),
    (("export", "--format", "diffusers", "{latent}", "{root}/exported"),
     "AutoencoderKL is not written yet"),
])
def test_latent_mistakes_are_one_line_and_write_nothing(latent_runs, trained_run, fake_fashion,
                                                        tmp_path, args, message):
    ae, run, _ = latent_runs
    names = {"run": trained_run[0], "root": tmp_path, "ae": ae, "latent": run}
    given = [str(a).format(**names) for a in args]
    if given[0] == "train":
        given += ["--preset", "tiny", "--data-dir", str(fake_fashion), "--out", str(tmp_path / "new")]
    if given[0] == "sample":
        given += ["--out", str(tmp_path / "images")]
    before = snapshot(ae.parent), snapshot(tmp_path)
    r = cli(*given)
    assert_refused(r, message.format(**names))
    assert (snapshot(ae.parent), snapshot(tmp_path)) == before


def test_a_latent_preset_needs_an_autoencoder_and_fits_its_unet_to_the_latents(
        latent_runs, fake_fashion, tmp_path):
    ae, _, _ = latent_runs
    before = snapshot(tmp_path)
    r = cli("train", "--preset", "fashion64-latent", "--data-dir", fake_fashion, "--out",
            tmp_path / "run")
    assert_refused(r, "preset fashion64-latent diffuses an autoencoder's latents: train one "
                      "first ('ddpm train-autoencoder --preset fashion64-ae")
    assert snapshot(tmp_path) == before
    # its recipe, at the latents of the autoencoder given (here 2 x 14 x 14, of 28 px images)
    r = cli("train", "--preset", "fashion64-latent", "--data-dir", fake_fashion, "--image-size",
            28, "--autoencoder", ae, "--out", tmp_path / "run", "--dry-run")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)["config"]
    recipe = get_preset("fashion64-latent")
    assert (config["model"]["in_channels"], config["model"]["image_size"]) == (2, 14)
    assert config["model"]["base_channels"] == recipe.model.base_channels
    assert config["train"]["steps"] == recipe.train.steps and config["latent"]["channels"] == 2
    assert snapshot(tmp_path) == before


def test_the_unet_keeps_the_levels_the_latents_can_be_halved_into():
    from ddpm.models import UNetConfig

    preset = UNetConfig(image_size=28, channel_mults=(1, 2, 3), attention_resolutions=(7,))
    fitted = latent.levels_that_fit(preset, 14)  # 14 px: halved once, not twice
    assert fitted.channel_mults == (1, 2) and fitted.attention_resolutions == (14,)
    assert latent.levels_that_fit(preset, 28) == preset  # nothing to leave out
    assert latent.levels_that_fit(preset, 7).channel_mults == (1,)
    wide = UNetConfig(image_size=64, channel_mults=(1, 2, 2, 4), attention_resolutions=(16, 8))
    assert latent.levels_that_fit(wide, 16) == wide  # 16 = 2 x 8: three halvings fit
    two = latent.levels_that_fit(wide, 12)  # halved twice: 64/32/16 kept, 8's attention to 16
    assert two.channel_mults == (1, 2, 2) and two.attention_resolutions == (16,)


def test_eval_reconstruction_scores_an_autoencoder_as_its_run_did(latent_runs, tmp_path):
    ae, _, _ = latent_runs
    logged = [json.loads(line) for line in (ae / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "test_psnr" in r][-1]
    r = cli("eval", ae, "--reconstruction", "--json")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout.strip().splitlines()[-1])
    assert scores["n"] == final["test_n"] == 64  # every test image of the fake dataset
    assert scores["psnr"] == pytest.approx(final["test_psnr"], rel=1e-3)
    assert scores["rfid"] == pytest.approx(final["test_rfid"], rel=1e-2, abs=1e-3)
    r = cli("eval", ae, "--reconstruction", "--n", 10)
    assert r.returncode == 0 and "reconstructions of 10 fashion-mnist images" in r.stdout
    assert "PSNR" in r.stdout and "rFID" in r.stdout
    # the diffusion commands point at it
    r = cli("sample", ae, "--n", 1, "--out", tmp_path / "x")
    assert_refused(r, "score it with 'ddpm eval RUN --reconstruction'")
    assert not (tmp_path / "x").exists()
