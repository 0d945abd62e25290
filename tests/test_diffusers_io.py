"""diffusers_io/: 'ddpm export --format diffusers' and diffusers folders as input.

The exported UNet2DModel must compute our network's function and the exported scheduler our
schedule (checked through diffusers' own classes), a diffusers model must sample under ddpm as
under diffusers' own loop, and every model or folder the two cannot exchange is refused in one
line with nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_refused, ddpm_in_process, snapshot
from conftest import ddpm_in_process as cli

diffusers = pytest.importorskip("diffusers")  # in the [test] extra: installed wherever CI runs

from ddpm import get_preset, train  # noqa: E402
from ddpm.checkpoint import load_checkpoint  # noqa: E402
from ddpm.config import RunConfig, build_schedule  # noqa: E402
from ddpm.models import UNet  # noqa: E402
from ddpm.pipeline import load_pipeline  # noqa: E402
from ddpm.samplers import clip_x0, ddim_sample, initial_noise  # noqa: E402
from ddpm.timesteps import make_timesteps  # noqa: E402


def tiny_checkpoint(root, fake_fashion, name, *, model=None, diffusion=None, sample=None):
    """A one-step run of the tiny preset with the given settings, its EMA weights replaced by
    random ones (training from zero-initialised layers would leave outputs near 0, which would
    hide a wrong mapping). Returns the checkpoint's path and the model with those weights."""
    c = get_preset("tiny")
    config = dataclasses.replace(
        c, model=dataclasses.replace(c.model, **(model or {})),
        diffusion=dataclasses.replace(c.diffusion, **(diffusion or {})),
        sample=dataclasses.replace(c.sample, **(sample or {})),
        data=dataclasses.replace(c.data, data_dir=str(fake_fashion)),
        train=dataclasses.replace(c.train, steps=1, sample_every=0, checkpoint_every=1))
    run = root / name
    train(config, run, progress=False, final_grid=False)
    path = run / "checkpoints" / "ckpt-00000001.pt"
    state = load_checkpoint(path)
    net = UNet(RunConfig.from_dict(state["config"]).model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    torch.save({**state, "ema": net.state_dict()}, path)
    return path, net.eval()


CASES = {
    "linear-eps": dict(),
    "cosine-v-conditional": dict(model={"num_classes": 10}, diffusion={"schedule": "cosine",
                                                                       "prediction_type": "v"},
                                 sample={"spacing": "trailing"}),
    "quadratic-x0-learned": dict(model={"learn_variance": True, "attention_resolutions": (14,),
                                        "attention_head_dim": 4},
                                 diffusion={"schedule": "quadratic", "prediction_type": "x0"}),
    "sigmoid-v-zero-snr": dict(diffusion={"schedule": "sigmoid", "prediction_type": "v",
                                          "zero_terminal_snr": True},
                               sample={"x0_transform": "none"}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fake_fashion):
    """Each case of CASES trained, exported with the CLI: name -> (out folder, net, config)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, settings in CASES.items():
        path, net = tiny_checkpoint(root, fake_fashion, name, **settings)
        r = cli("export", path, "--format", "diffusers", root / f"{name}-out")
        assert r.returncode == 0, r.stderr
        assert "same outputs" in r.stdout
        out[name] = (root / f"{name}-out", net, RunConfig.from_dict(load_checkpoint(path)["config"]))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_exported_unet_computes_our_network(exported, case):
    folder, net, config = exported[case]
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    mc = config.model
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, mc.in_channels, mc.image_size, mc.image_size, generator=g)
    t = torch.randint(0, config.diffusion.num_train_timesteps, (6,), generator=g)
    y = torch.randint(0, mc.num_classes + 1, (6,), generator=g) if mc.num_classes else None
    with torch.no_grad():
        ours, theirs = net(x, t, y), unet(x, t, class_labels=y).sample
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 0.1  # random weights: a real function to compare
    assert (ours - theirs).abs().max() < 1e-4
    # real-valued timesteps too (our ODE samplers visit them)
    tf = torch.rand(6, generator=g) * 999
    with torch.no_grad():
        assert (net(x, tf, y) - unet(x, tf, class_labels=y).sample).abs().max() < 1e-4
    # and the whole pipeline loads as diffusers users load it
    assert isinstance(diffusers.DDPMPipeline.from_pretrained(folder).unet, diffusers.UNet2DModel)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_scheduler_drives_our_ddim(exported, case):
    """diffusers' DDIMScheduler made from the exported config, 10 steps from the same noise,
    gives our DDIM's images."""
    folder, net, config = exported[case]
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    schedule = build_schedule(config)
    assert torch.allclose(scheduler.alphas_cumprod.double(), schedule.alphas_cumprod, atol=1e-6)
    mc, dc = config.model, config.diffusion
    x_T = torch.randn(4, mc.in_channels, mc.image_size, mc.image_size,
                      generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0]) if mc.num_classes else None
    C = mc.in_channels

    def ours_net(x, t):
        return net(x, t, y)

    clip = config.sample.x0_transform == "clip"
    spacing = config.sample.spacing or "leading"  # exported as timestep_spacing; else theirs
    assert scheduler.config.timestep_spacing == spacing
    ours = ddim_sample(ours_net, schedule, x_T, make_timesteps(dc.num_train_timesteps, 10, spacing),
                       prediction_type=dc.prediction_type, x0_transform=clip_x0 if clip else None)
    scheduler.set_timesteps(10)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(x, torch.full((4,), int(t)), y)[:, :C]  # DDIM reads the prediction only
            # ours makes eps agree with the clipped x0 (eq. 4), as use_clipped_model_output does
            x = scheduler.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    assert (ours - x).abs().max() < 1e-3


def test_export_refuses_what_diffusers_cannot_hold(tmp_path, fake_fashion):
    """Each refusal: one line, exit 2, nothing written."""
    cases = {
        "convnext": ({"block": "convnext"}, "convnext blocks"),
        "patches": ({"patch_size": 2, "channel_mults": (1,)}, "patches"),
        "first-level": ({"channel_mults": (2, 2)}, "first level"),
        "groups": ({"base_channels": 12, "norm_groups": 8}, "groups"),
        "heads": ({"attention_resolutions": (14,), "base_channels": 12, "norm_groups": 4,
                   "attention_head_dim": 5}, "attention widths"),
    }
    for name, (model, words) in cases.items():
        path, _ = tiny_checkpoint(tmp_path, fake_fashion, name, model=model)
        before = snapshot(tmp_path)
        r = cli("export", path, "--format", "diffusers", tmp_path / f"{name}-out")
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert words in r.stderr and "nothing was written" in r.stderr, r.stderr
        assert snapshot(tmp_path) == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}-out")]


def test_export_keeps_an_existing_folder_unless_forced(tmp_path, fake_fashion):
    path, net = tiny_checkpoint(tmp_path, fake_fashion, "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    r = cli("export", path, "--format", "diffusers", out)
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = cli("export", path, "--format", "diffusers", out, "--force")  # never over a user's file
    assert r.returncode == 2 and "not part of a diffusers export ('mine.txt')" in r.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    r = cli("export", path, "--format", "diffusers", out, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ddpm.json", "model_index.json",
                                                     "scheduler", "unet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_names_the_extra_without_diffusers(tmp_path, fake_fashion, monkeypatch):
    path, _ = tiny_checkpoint(tmp_path, fake_fashion, "run")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    r = cli("export", path, "--format", "diffusers", tmp_path / "out")
    assert r.returncode == 2
    assert "pip install 'ddpm[diffusers]'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_legacy_checkpoints_keep_their_function(tmp_path, fake_fashion):
    """A checkpoint saved before time_silu existed (its config lacks the key) computes, as it
    did, without the SiLU; the export refuses it in one line."""
    path, net = tiny_checkpoint(tmp_path, fake_fashion, "run")
    state = load_checkpoint(path)
    model = {k: v for k, v in state["config"]["model"].items() if k != "time_silu"}
    old = tmp_path / "old.pt"
    torch.save({**state, "config": {**state["config"], "model": model}}, old)
    pipe = load_pipeline(old)
    assert pipe.config.model.time_silu is False
    legacy = UNet(dataclasses.replace(net.config, time_silu=False))
    legacy.load_state_dict(net.state_dict())
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 60])
    with torch.no_grad():
        assert torch.equal(pipe.model(x, t), legacy(x, t))
        assert not torch.allclose(pipe.model(x, t), net(x, t), atol=1e-3)  # the SiLU matters
    r = cli("export", old, "--format", "diffusers", tmp_path / "out")
    assert r.returncode == 2 and "before 0.2" in r.stderr
    assert not (tmp_path / "out").exists()


# --- import ----------------------------------------------------------------------------------


def foreign_unet(**config):
    """A randomly initialised UNet2DModel of a shape ddpm's own U-Net cannot take (flipped
    sin/cos, shifted frequencies, asymmetric downsampling padding, eps 1e-6: the original DDPM
    CIFAR-10 model's choices)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        attention_head_dim=None, flip_sin_to_cos=True, freq_shift=1, downsample_padding=0,
        norm_eps=1e-6, **config)
    with torch.no_grad():  # its zero-initialised layers made non-zero, as a trained model's
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """UNet2DModel.save_pretrained with the scheduler's save_pretrained in the same folder."""
    folder = tmp_path_factory.mktemp("foreign") / "unet"
    unet = foreign_unet()
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                            clip_sample=True).save_pretrained(folder)
    return folder, unet


def test_ddpm_samples_a_diffusers_model_as_diffusers_does(unet_folder, tmp_path):
    """'ddpm sample --sampler ddim --eta 0' equals diffusers' own DDIM loop from the same noise."""
    folder, unet = unet_folder
    out = tmp_path / "x.npz"
    r = cli("sample", folder, "--sampler", "ddim", "--eta", "0", "--steps", "10", "--spacing",
            "leading", "--n", "4", "--seed", "5", "--precision", "fp32", "--out", out)
    assert r.returncode == 0, r.stderr
    ours = np.load(out)["arr_0"].astype(int)  # [N, H, W, C] uint8
    x = initial_noise((4, 1, 16, 16), torch.Generator().manual_seed(5), torch.device("cpu"))
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder)
    scheduler.set_timesteps(10)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0,
                               use_clipped_model_output=True).prev_sample
    theirs = ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(int)
    assert np.abs(ours - theirs).max() <= 1
    assert ours.std() > 5  # images, not a constant
    r = cli("viz", "reverse", folder, "--steps", "5", "--n", "4", "--out", tmp_path / "rev.gif")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rev.gif").stat().st_size > 0


def test_every_sampler_and_the_figures_on_a_pipeline_folder(tmp_path):
    """A DDPMPipeline.save_pretrained folder: every ddpm sampler, viz reverse, the Python API."""
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=foreign_unet(), scheduler=diffusers.DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")).save_pretrained(folder)
    pipe = load_pipeline(folder)
    assert pipe.config.diffusion.schedule == "cosine"  # diffusers' cosine is ours
    assert pipe.config.diffusion.prediction_type == "v"
    for sampler in ("ddpm", "ddim", "dpm++", "euler", "heun"):
        r = cli("sample", folder, "--sampler", sampler, "--steps", "5", "--n", "2",
                "--out", tmp_path / f"{sampler}.npz")
        assert r.returncode == 0, (sampler, r.stderr)
        images = np.load(tmp_path / f"{sampler}.npz")["arr_0"]
        assert images.shape == (2, 16, 16, 1)
    r = cli("viz", "reverse", folder, "--steps", "5", "--n", "4", "--out", tmp_path / "rev.gif")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rev.gif").stat().st_size > 0


def test_imported_schedules_are_diffusers_formulas(tmp_path):
    """The betas ddpm rebuilds from each beta_schedule are those diffusers' scheduler holds."""
    from ddpm.diffusers_io import diffusers_betas

    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"):
        s = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
        ours = diffusers_betas(dict(s.config))
        assert torch.allclose(ours, s.betas.double(), rtol=1e-5, atol=1e-9), kind
    s = diffusers.DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    folder = tmp_path / "zsnr"
    diffusers.DDPMPipeline(unet=foreign_unet(), scheduler=s).save_pretrained(folder)
    pipe = load_pipeline(folder)
    assert pipe.schedule.alphas_cumprod[-1] == 0  # zero terminal SNR, exactly
    assert torch.allclose(pipe.schedule.alphas_cumprod[:-1], s.alphas_cumprod[:-1].double(),
                          atol=1e-6)


@pytest.mark.parametrize("change, words", [
    ({"beta_schedule": "exp"}, "beta_schedule 'exp'"),
    ({"prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"variance_type": "learned"}, "variance_type 'learned'"),
    ({"variance_type": "learned_range"}, "variance_type 'learned_range' needs 2"),
])
def test_a_scheduler_ddpm_cannot_represent_is_refused(unet_folder, tmp_path, change, words):
    folder, unet = unet_folder
    bad = tmp_path / "bad"
    unet.save_pretrained(bad)
    config = json.loads((folder / "scheduler_config.json").read_text())
    (bad / "scheduler_config.json").write_text(json.dumps({**config, **change}))
    before = snapshot(tmp_path)
    r = cli("sample", bad, "--n", "2", "--steps", "2", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_a_unet_folder_without_its_scheduler_is_refused(tmp_path):
    foreign_unet().save_pretrained(tmp_path / "u")
    r = cli("sample", tmp_path / "u", "--n", "2", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "scheduler_config.json" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_an_exported_model_comes_back_with_its_run_config(exported, tmp_path):
    """A folder ddpm wrote samples under ddpm exactly as the run it came from (ddpm.json)."""
    folder, net, config = exported["cosine-v-conditional"]
    pipe = load_pipeline(folder)
    assert pipe.config == config and pipe.num_classes == 10
    a = pipe.generate(3, seed=1, sampler="dpm++", num_sample_steps=5, labels=[0, 1, 2],
                      guidance=2.0)
    ours = dataclasses.replace(pipe, model=net)
    b = ours.generate(3, seed=1, sampler="dpm++", num_sample_steps=5, labels=[0, 1, 2],
                      guidance=2.0)
    assert (a - b).abs().max() < 1e-4


def test_eval_scores_an_exported_folder_as_its_run(exported):
    """'ddpm eval' on the folder: FID/KID run, and the likelihood bound equals the run's own."""
    folder, net, config = exported["linear-eps"]
    r = cli("eval", folder, "--n", 128, "--sampler", "dpm++", "--steps", 3, "--json",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["fid"] > 0
    run = folder.parent / "linear-eps"
    bpd = []
    for source in (folder, run):
        r = cli("eval", source, "--nll", "--n", 4, "--nll-timesteps", 4, "--json", "--no-progress",
                "--precision", "fp32")
        assert r.returncode == 0, r.stderr
        bpd.append(json.loads(r.stdout.strip().splitlines()[-1])["bits_per_dim"])
    assert bpd[0] == pytest.approx(bpd[1], rel=1e-4)


# --- diffusers folders that are damaged, hostile, or not ddpm's to sample --------------------

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
BIN = "unet/diffusion_pytorch_model.bin"
UNET_CONFIG, SCHEDULER_CONFIG = "unet/config.json", "scheduler/scheduler_config.json"


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A DDPMPipeline.save_pretrained folder of 100 steps, to be copied and damaged."""
    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    diffusers.DDPMPipeline(unet=foreign_unet(), scheduler=diffusers.DDPMScheduler(
        num_train_timesteps=100)).save_pretrained(folder)
    return folder


class RunsCode:
    """What a hostile pickle holds: unpickling it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def edit(name, **changes):
    def apply(folder):
        path = folder / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return apply


def write(name, data):
    def apply(folder):
        (folder / name).unlink(missing_ok=True)
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return apply


def link(name, target):
    def apply(folder):
        (folder / name).unlink()
        (folder / name).symlink_to(target)
    return apply


def remove(name):
    return lambda folder: (folder / name).unlink()


def replace_by_folder(name):
    def apply(folder):
        (folder / name).unlink()
        (folder / name).mkdir()
    return apply


def tensors(change):
    """Rewrite the weights as ``change(their dict)`` returns them."""
    from safetensors.torch import load_file, save_file

    def apply(folder):
        save_file(change(load_file(folder / WEIGHTS)), folder / WEIGHTS)
    return apply


def pickled(value, *, zip=True):
    """The weights as a .bin of ``value(marker file)``: torch.save's zip, or a bare pickle."""
    def apply(folder):
        (folder / WEIGHTS).unlink()
        obj = value(folder.parent / "marker")
        if zip:
            torch.save(obj, folder / BIN)
        else:
            (folder / BIN).write_bytes(pickle.dumps(obj))
    return apply


def nested_json(name, depth=100_000):
    return write(name, "[" * depth + "]" * depth)


def ddpm_json(**changes):
    """A ddpm.json as 'ddpm export' writes it, for a run of the tiny preset (1x28x28 images)."""
    return write("ddpm.json", json.dumps({"config": get_preset("tiny").to_dict(), "step": 1,
                                          "classes": [], **changes}))


def nan_at(name):
    return tensors(lambda w: {**w, name: torch.full_like(w[name], float("nan"))})


# (what is done to a good pipeline folder, what the one line must say)
DAMAGED_FOLDERS = {
    # weights that are not safetensors, or are no file at all
    "garbage-weights": (write(WEIGHTS, b"these are not weights" * 10),
                        "unet/diffusion_pytorch_model.safetensors is not a safetensors file or is "
                        "damaged: its first 8 bytes give a"),
    "zero-weights": (write(WEIGHTS, bytes(4096)), "its 0-byte header is not a JSON object"),
    "empty-weights": (write(WEIGHTS, b""), "safetensors is 0 bytes, too few for a safetensors file"),
    "huge-header-length": (write(WEIGHTS, (10**15).to_bytes(8, "little") + b"{}"),
                           "its first 8 bytes give a 1000000000000000-byte header, but 2 bytes "
                           "follow"),
    "weights-link-to-etc-passwd": (link(WEIGHTS, "/etc/passwd"),
                                   "safetensors is not a safetensors file or is damaged"),
    "weights-link-to-dev-zero": (link(WEIGHTS, "/dev/zero"),
                                 "safetensors is not a regular file but a device or a pipe "
                                 "(/dev/zero)"),
    "weights-broken-link": (link(WEIGHTS, "/no/such/blob"),
                            "safetensors is a link to /no/such/blob, which does not exist"),
    "weights-a-folder": (replace_by_folder(WEIGHTS), "safetensors is a folder, not a file"),
    "no-weights": (remove(WEIGHTS), "safetensors is missing (and so is the .bin"),
    # weights that are not this config's, or not numbers
    "all-nan-weights": (tensors(lambda w: {k: torch.full_like(v, float("nan")) for k, v in w.items()}),
                        "holds NaN or infinite values"),
    "one-inf-tensor": (tensors(lambda w: {**w, "conv_out.bias": torch.full_like(
        w["conv_out.bias"], float("inf"))}), "tensor 'conv_out.bias' holds NaN or infinite values"),
    "wrong-shape": (tensors(lambda w: {**w, "conv_in.weight": torch.zeros(16, 3, 3, 3)}),
                    "safetensors: tensor 'conv_in.weight' is [16, 3, 3, 3], where "
                    "unet/config.json needs [16, 1, 3, 3]"),
    "missing-tensor": (tensors(lambda w: {k: v for k, v in w.items() if k != "conv_out.bias"}),
                       "safetensors lacks 1 of the tensors unet/config.json needs, such as "
                       "'conv_out.bias'"),
    "extra-tensor": (tensors(lambda w: {**w, "extra.weight": torch.zeros(2)}),
                     "safetensors has 1 tensor(s) unet/config.json has no place for, such as "
                     "'extra.weight'"),
    "very-long-key": (tensors(lambda w: {**w, "k" * 100_000: torch.zeros(2)}),
                      "has no place for, such as '" + "k" * 43 + "... (100,000 characters);"),
    "integer-tensor": (tensors(lambda w: {**w, "conv_out.bias": torch.zeros(1, dtype=torch.int64)}),
                       "tensor 'conv_out.bias' holds torch.int64, not floating-point weights"),
    # pickles
    "pickle-bin-that-runs-code": (pickled(RunsCode),
                                  "diffusion_pytorch_model.bin is not a readable plain tensor "
                                  "file: it holds objects other than tensors"),
    "bare-pickle-bin": (pickled(RunsCode, zip=False),
                        "diffusion_pytorch_model.bin is not a readable plain tensor file: it is "
                        "not a torch file"),
    "bin-of-a-list": (pickled(lambda _: [torch.zeros(2)]),
                      "unet/diffusion_pytorch_model.bin holds a list, not a dict of named tensors"),
    # the folder's layout
    "no-model-index": (remove("model_index.json"),
                       "it is neither a ddpm run (no checkpoints/ckpt-STEP.pt) nor a diffusers "
                       "pipeline folder (model_index.json is missing); give a run directory"),
    "model-index-a-list": (write("model_index.json", "[]"),
                           "model_index.json holds an array where its settings belong"),
    "unknown-scheduler-class": (edit("model_index.json", scheduler=["diffusers", "FooScheduler"]),
                                "its scheduler 'FooScheduler' is none that diffusers"),
    "scheduler-without-betas": (edit("model_index.json",
                                     scheduler=["diffusers", "ScoreSdeVeScheduler"]),
                                "its scheduler ScoreSdeVeScheduler has no beta schedule"),
    "no-unet-config": (remove(UNET_CONFIG), "unet/config.json is missing"),
    "unet-a-file": (lambda f: (shutil.rmtree(f / "unet"), (f / "unet").write_text("x")),
                    "cannot read unet/config.json: Not a directory"),
    "scheduler-config-a-folder": (replace_by_folder(SCHEDULER_CONFIG),
                                  "scheduler/scheduler_config.json is a folder, not a file"),
    "config-link-to-dev-zero": (link(UNET_CONFIG, "/dev/zero"),
                                "unet/config.json is not a regular file but a device or a pipe"),
    "config-not-utf8": (write(UNET_CONFIG, b"\xff\xfe{}"), "unet/config.json is not JSON ("),
    "config-nested-too-deep": (nested_json(SCHEDULER_CONFIG),
                               "scheduler/scheduler_config.json is not JSON (maximum recursion"),
    "config-of-17-MB": (lambda f: os.truncate(f / UNET_CONFIG, 17 << 20),
                        "unet/config.json is 17 MB, more than a config can be (16 MB)"),
    # the UNet2DModel's config
    "in-channels-null": (edit(UNET_CONFIG, in_channels=None),
                         "unet/config.json: in_channels is null; expected 1 or 3"),
    "in-channels-negative": (edit(UNET_CONFIG, in_channels=-1), "in_channels is -1; expected 1 or 3"),
    "in-channels-fractional": (edit(UNET_CONFIG, in_channels=1.5), "in_channels is 1.5; expected"),
    "in-channels-a-string": (edit(UNET_CONFIG, in_channels="1"), "in_channels is '1'; expected"),
    "in-channels-301-digits": (edit(UNET_CONFIG, in_channels=10**300),
                               "in_channels is 100000000000000000000000... (301 digits); expected"),
    "sample-size-a-billion": (edit(UNET_CONFIG, sample_size=10**9),
                              "unet/config.json: sample_size is 1000000000; expected the side of "
                              "its square images, 1 to 4096 pixels"),
    "sample-size-not-square": (edit(UNET_CONFIG, sample_size=[16, 32]), "sample_size is [16, 32]"),
    "sample-size-odd": (edit(UNET_CONFIG, sample_size=15),
                        "sample_size 15 is not a multiple of 2, as the 1 downsamplings between "
                        "its 2 levels"),
    "layers-per-block-a-million": (edit(UNET_CONFIG, layers_per_block=10**6),
                                   "layers_per_block is 1000000; expected an integer from 1 to 32"),
    "unknown-block-type": (edit(UNET_CONFIG, down_block_types=["Weird2D", "AttnDownBlock2D"]),
                           "unet/config.json: diffusers cannot build a UNet2DModel of it "
                           "(Weird2D does not exist.)"),
    "block-types-too-few": (edit(UNET_CONFIG, up_block_types=["UpBlock2D"]),
                            "up_block_types is [\"UpBlock2D\"]; expected a list of 2 block names"),
    "groups-not-dividing": (edit(UNET_CONFIG, norm_num_groups=7),
                            "must be divisible by num_groups (7)"),
    # the scheduler's config
    "zero-timesteps": (edit(SCHEDULER_CONFIG, num_train_timesteps=0),
                       "scheduler/scheduler_config.json: num_train_timesteps is 0; expected an "
                       "integer from 2 to 100,000"),
    "a-billion-timesteps": (edit(SCHEDULER_CONFIG, num_train_timesteps=10**9),
                            "num_train_timesteps is 1000000000; expected an integer from 2"),
    "nan-beta-end": (edit(SCHEDULER_CONFIG, beta_end=float("nan")),
                     "scheduler_config.json: beta_end is NaN; expected a finite number in (0, 1)"),
    "zero-beta-start": (edit(SCHEDULER_CONFIG, beta_start=0), "beta_start is 0; expected a finite"),
    "trained-betas-too-few": (edit(SCHEDULER_CONFIG, trained_betas=[0.1, 0.2, 0.3]),
                              "trained_betas has 3 values; expected a list of "
                              "num_train_timesteps = 100"),
    "trained-betas-with-text": (edit(SCHEDULER_CONFIG, trained_betas=[0.1, "x"] + [0.1] * 98),
                                "trained_betas[1] is 'x'; expected a finite number in (0, 1)"),
    "beta-schedule-a-number": (edit(SCHEDULER_CONFIG, beta_schedule=7),
                               "beta_schedule is 7; expected the name of a schedule"),
    "prediction-type-a-list": (edit(SCHEDULER_CONFIG, prediction_type=[]),
                               "prediction_type is []; expected a name"),
    "clip-sample-a-string": (edit(SCHEDULER_CONFIG, clip_sample="yes"),
                             "clip_sample is 'yes'; expected true or false"),
    # ddpm.json, ddpm's own file beside diffusers'
    "ddpm-json-not-json": (write("ddpm.json", "{not json"), "ddpm.json is not JSON ("),
    "ddpm-json-a-list": (write("ddpm.json", "[1, 2]"),
                         "ddpm.json holds an array where its settings belong"),
    "ddpm-json-step-a-word": (ddpm_json(step="abc"), "ddpm.json: step is 'abc'; expected an integer"),
    "ddpm-json-of-another-model": (ddpm_json(), "ddpm.json describes 1x28x28 images, a fixed "
                                                "variance, T = 100, eps, its diffusers configs "
                                                "1x16x16 images"),
}


@pytest.mark.parametrize("damage, message", DAMAGED_FOLDERS.values(), ids=list(DAMAGED_FOLDERS))
def test_a_damaged_diffusers_folder_is_one_line_exit_2_and_changes_nothing(
        pipeline_folder, tmp_path, damage, message):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    damage(folder)
    before = snapshot(tmp_path)
    r = cli("sample", folder, "--n", 2, "--steps", 2, "--no-progress", "--out", tmp_path / "x.png")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"ddpm sample: error: {folder} cannot be sampled by ddpm: ")
    assert message in lines[0], lines[0]
    assert len(lines[0].replace(str(folder), "")) < 400 and "weights_only" not in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "marker").exists(), "a pickle ran code"
    assert snapshot(tmp_path) == before and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["eval {folder} --n 128 --no-progress",
                                     "viz reverse {folder} --out {root}/r.gif"])
def test_eval_and_viz_refuse_a_damaged_folder_as_sample_does(pipeline_folder, tmp_path, command):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    edit(SCHEDULER_CONFIG, beta_end=float("nan"))(folder)
    before = snapshot(tmp_path)
    r = cli(*command.format(folder=folder, root=tmp_path).split())
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "scheduler/scheduler_config.json: beta_end is NaN" in lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_config_is_named(pipeline_folder, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(pipeline_folder, folder)
    (folder / UNET_CONFIG).chmod(0)
    r = cli("sample", folder, "--n", 2, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "cannot read unet/config.json: Permission denied" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_linked_weights_sample_as_float32_does(pipeline_folder, tmp_path, dtype):
    """Weights saved in fp16 or bf16 (as many hub models are), behind a link (as the hub's cache
    keeps them), sample as their float32 values do."""
    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(pipeline_folder, half)
    weights = load_file(half / WEIGHTS)
    blob = tmp_path / "blob"
    save_file({k: v.to(dtype) for k, v in weights.items()}, blob)
    link(WEIGHTS, blob)(half)
    rounded = tmp_path / "rounded"
    shutil.copytree(pipeline_folder, rounded)
    save_file({k: v.to(dtype).float() for k, v in weights.items()}, rounded / WEIGHTS)
    images = []
    for folder in (half, rounded):
        r = cli("sample", folder, "--sampler", "ddim", "--steps", 3, "--n", 2, "--seed", 1,
                "--no-progress", "--out", tmp_path / f"{folder.name}.npz")
        assert r.returncode == 0, r.stderr
        images.append(np.load(tmp_path / f"{folder.name}.npz")["arr_0"])
    assert np.array_equal(*images)


def test_export_refuses_a_diffusers_folder_and_diverged_weights(pipeline_folder, tmp_path,
                                                                fake_fashion):
    path, net = tiny_checkpoint(tmp_path, fake_fashion, "run")
    state = load_checkpoint(path)
    diverged = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in state["ema"].items()}
    torch.save({**state, "ema": diverged}, tmp_path / "nan.pt")
    for source, message in [
            (pipeline_folder, f"{pipeline_folder} is a diffusers folder already; 'ddpm export' "
                              f"writes one from a ddpm run directory or .pt checkpoint"),
            (tmp_path / "nan.pt", f"cannot export to diffusers: tensor 'time_mlp.0.weight' of the "
                                  f"EMA weights of {tmp_path / 'nan.pt'} holds NaN or infinite "
                                  f"values (the run diverged); nothing was written")]:
        before = snapshot(tmp_path)
        r = cli("export", source, "--format", "diffusers", tmp_path / "out")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- export never over the model it exports, nor over a folder of other files ---------------------


@pytest.mark.parametrize("source, out, message", [
    ("{run}", "{run}", "OUT_DIR {run} is the run being exported"),
    ("{run}", "{run}/checkpoints", "OUT_DIR {run}/checkpoints lies inside the run being exported"),
    ("{run}", "{tmp}", "OUT_DIR {tmp} holds the run being exported"),
    ("{run}/checkpoints/ckpt-00000002.pt", "{run}", "is the run being exported"),
    ("{run}/checkpoints/ckpt-00000002.pt", "{run}/checkpoints", "lies inside the run"),
    ("{link}", "{run}", "is the run being exported"),
    ("{run}", "{link}", "OUT_DIR {link} is the run being exported"),
    ("{tmp}/lone.pt", "{tmp}", "holds the checkpoint being exported"),
    ("{run}", "{tmp}/afile/sub", "cannot write {tmp}/afile/sub: {tmp}/afile is a file"),
    ("{run}", "", "OUT_DIR is empty"),
], ids=["run", "its checkpoints", "its parent", "checkpoint to its run", "checkpoint to its folder",
        "link to run", "run to link", "lone checkpoint to its folder", "under a file", "empty"])
def test_export_never_writes_over_the_model_it_exports(run_copy, tmp_path, source, out, message):
    pytest.importorskip("diffusers")
    (tmp_path / "link").symlink_to(run_copy, target_is_directory=True)
    shutil.copy(run_copy / "checkpoints/ckpt-00000002.pt", tmp_path / "lone.pt")
    (tmp_path / "afile").write_text("a file, not a folder")
    fill = {"run": run_copy, "tmp": tmp_path, "link": tmp_path / "link"}
    before = snapshot(tmp_path)
    r = ddpm_in_process("export", source.format(**fill), out.format(**fill), "--format",
                        "diffusers", "--force")
    assert_refused(r, message.format(**fill))
    assert snapshot(tmp_path) == before and (tmp_path / "link").is_symlink()


def test_export_inside_the_run_is_refused_without_force_too(run_copy):
    pytest.importorskip("diffusers")
    r = ddpm_in_process("export", run_copy, run_copy / "hf", "--format", "diffusers")
    assert_refused(r, f"OUT_DIR {run_copy / 'hf'} lies inside the run being exported")
    assert not (run_copy / "hf").exists()


def paths(root: Path) -> list[str]:
    """Every file and folder under ``root``, hidden ones too: what a refusal must leave as it was."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("force", [True, False], ids=["force", "no force"])
@pytest.mark.parametrize("files, message", [
    (["notes.txt", "photos/cat.png", "todo"],
     "holds 3 files that are not part of a diffusers export ('notes.txt', 'photos/', 'todo'); "
     "--force replaces only an empty folder or a previous export: remove them yourself, or "
     "choose a new folder"),
    ([f"f{i}" for i in range(5)], "holds 5 files that are not part of a diffusers export "
                                  "('f0', 'f1', 'f2', ...)"),
    (["model_index.json", "unet/config.json", "notes.txt"],
     "holds 1 file that is not part of a diffusers export ('notes.txt'); --force replaces only "
     "an empty folder or a previous export: remove it yourself"),
    (["model_index.json", "scheduler/notes.txt"],
     "holds 1 file that is not part of a diffusers export ('scheduler/notes.txt')"),
    (["unet/config.json", "ddpm.json"],  # without model_index.json it is no export
     "holds 2 files that are not part of a diffusers export ('ddpm.json', 'unet/config.json')"),
    (["model_index.json/notes.txt"],
     "holds 1 file that is not part of a diffusers export ('model_index.json/')"),
], ids=["home", "many", "export and a note", "a note in scheduler/", "no model_index.json",
        "model_index.json a folder"])
def test_export_never_replaces_a_folder_holding_other_files(world, tmp_path, files, message,
                                                            force):
    pytest.importorskip("diffusers")
    out = tmp_path / "home"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"the user's {name}")
    before = snapshot(tmp_path), paths(tmp_path)
    r = ddpm_in_process("export", world / "run", out, "--format", "diffusers",
                        *["--force"] * force)
    assert_refused(r, f"OUT_DIR {out} exists and {message}")
    assert (snapshot(tmp_path), paths(tmp_path)) == before


def test_export_force_replaces_an_empty_folder_or_an_export_whole_or_not_at_all(
        world, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    out = tmp_path / "hf"
    out.mkdir()
    export = ["export", world / "run", out, "--format", "diffusers", "--force"]
    assert ddpm_in_process(*export).returncode == 0
    before = snapshot(tmp_path), paths(tmp_path)
    with monkeypatch.context() as patch:  # an export that fails its check replaces nothing
        patch.setattr("ddpm.diffusers_io.export._max_output_difference", lambda *args: 1.0)
        assert_refused(ddpm_in_process(*export), "differs from the model by up to 1.00e+00")
    assert (snapshot(tmp_path), paths(tmp_path)) == before
    export[1] = world / "crun"
    assert ddpm_in_process(*export).returncode == 0
    assert json.loads((out / "ddpm.json").read_text())["config"]["model"]["num_classes"] == 10
    assert paths(tmp_path) == before[1]  # the same files, nothing left beside them
