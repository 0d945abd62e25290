"""`ddpm sample` end to end, as a user types it: folders and grids, seeds, every sampler and its
options, churn, precision and compile options, grid formats, checkpoints it cannot use."""

import pytest
from PIL import Image

from conftest import ddpm, ddpm_in_process


def test_sample_to_folder_and_grid(trained_run, tmp_path):
    run, _ = trained_run
    r = ddpm("sample", run, "--n", 3, "--out", tmp_path / "imgs", "--steps", 5, "--no-progress")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "imgs").glob("*.png"))
    assert len(files) == 3 and Image.open(files[0]).size == (28, 28)
    r = ddpm("sample", run / "checkpoints/ckpt-00000003.pt", "--n", 4, "--out",
             tmp_path / "g.png", "--steps", 5, "--seed", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "g.png").size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)


def test_same_seed_same_images(trained_run, tmp_path):
    run, _ = trained_run
    for name in ("a.png", "b.png"):
        assert ddpm("sample", run, "--n", 4, "--out", tmp_path / name, "--steps", 4, "--seed", 3,
                    "--no-progress").returncode == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("name, format", [("g.jpg", "JPEG"), ("g.jpeg", "JPEG"), ("g.webp", "WEBP"),
                                          ("g.png", "PNG")])
def test_sample_writes_a_grid_in_the_format_its_name_asks_for(world, tmp_path, name, format):
    r = ddpm_in_process("sample", world / "run", "--n", 4, "--steps", 2, "--out", tmp_path / name,
                        "--no-progress")
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / name) as im:
        assert im.format == format and im.size == (2 * 28 + 3 * 2,) * 2
    assert (tmp_path / name).is_file(), "a file, never a folder named like an image"


def test_sample_steps_beyond_T_is_refused(trained_run, tmp_path):
    r = ddpm_in_process("sample", trained_run[0], "--n", 1, "--steps", 5000, "--out",
                        tmp_path / "x.png")
    assert r.returncode == 2 and "more than the model's 100 training timesteps" in r.stderr


# --- samplers and their options -------------------------------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("ddim", 5), ("dpm++", 4), ("euler", 3), ("heun", 3)])
def test_every_sampler_from_the_command_line(trained_run, tmp_path, sampler, steps):
    import numpy as np

    out = tmp_path / "s.npz"
    r = ddpm("sample", trained_run[0], "--sampler", sampler, "--steps", steps, "--n", 5,
             "--batch-size", 2, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    arr = np.load(out)["arr_0"]
    assert arr.shape == (5, 28, 28, 1) and arr.dtype == np.uint8
    assert f"{sampler}, {steps} steps" in r.stdout


def test_sampler_options_are_checked(trained_run, tmp_path):
    r = ddpm_in_process("sample", trained_run[0], "--sampler", "euler", "--eta", "0.5",
                        "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "--eta is a setting of the ddim sampler, not of euler" in r.stderr
    r = ddpm_in_process("sample", trained_run[0], "--sampler", "ddim", "--eta", "1.5",
                        "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "expected a number in [0, 1], got 1.5" in r.stderr
    r = ddpm_in_process("sample", trained_run[0], "--sampler", "dpm++", "--variance", "beta",
                        "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "--variance is a setting of the ddpm sampler" in r.stderr
    r = ddpm_in_process("sample", trained_run[0], "--sampler", "plms", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "invalid choice: 'plms'" in r.stderr
    r = ddpm_in_process("sample", trained_run[0], "--sampler", "heun", "--churn", "-5",
                        "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "expected a number in [0, 1000], got -5" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_churn_from_the_command_line(trained_run, tmp_path):
    """--churn makes heun Karras et al.'s stochastic sampler: reproducible by seed, and other
    images than the deterministic heun's; --churn 0 is the deterministic sampler."""
    import numpy as np

    def draw(name, *options):
        r = ddpm_in_process("sample", trained_run[0], "--sampler", "heun", "--steps", 6, "--n", 4,
                            "--seed", 1, "--out", tmp_path / name, "--no-progress", *options)
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / name)["arr_0"]

    plain, zero = draw("a.npz"), draw("b.npz", "--churn", "0")
    churned, again = draw("c.npz", "--churn", "40"), draw("d.npz", "--churn", "40")
    assert np.array_equal(plain, zero) and np.array_equal(churned, again)
    assert not np.array_equal(plain, churned)


def test_learned_variance_on_a_fixed_model_is_refused(world, tmp_path):
    from conftest import ddpm_in_process as cli
    r = cli("sample", world / "run", "--variance", "learned", "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "--learn-variance" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


# --- precision and compile ------------------------------------------------------------------------


def test_sampling_precision_and_compile_options(trained_run, tmp_path, monkeypatch):
    """--precision bf16 samples under bf16 autocast (close to fp32, not equal), and so does the
    default (auto) on a CPU with bf16 hardware; --compile that fails to compile samples
    uncompiled with one warning, the same images as without it."""
    import numpy as np
    import torch

    run = trained_run[0]

    def draw(name, *options):
        r = ddpm_in_process("sample", run, "--n", 4, "--steps", 3, "--sampler", "ddim", "--seed", 2,
                            "--out", tmp_path / name, "--no-progress", *options)
        assert r.returncode == 0, r.stderr
        return np.load(tmp_path / name)["arr_0"].astype(int), r.stderr

    fp32, _ = draw("a.npz", "--precision", "fp32")
    bf16, _ = draw("b.npz", "--precision", "bf16")
    assert not np.array_equal(fp32, bf16) and np.abs(fp32 - bf16).mean() < 8
    from ddpm.pipeline import load_pipeline

    default, _ = draw("d.npz")  # auto: what this machine measured faster (then cached)
    chosen = load_pipeline(run, precision="auto").precision
    assert np.array_equal(default, bf16 if chosen == "bf16" else fp32)

    def broken(module, **kwargs):
        def fails(*args, **kw):
            raise RuntimeError("InductorError: no working C compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    compiled, err = draw("c.npz", "--compile", "--precision", "fp32")
    assert np.array_equal(compiled, fp32)
    assert err.count("torch.compile failed (RuntimeError: InductorError") == 1, err
    r = ddpm_in_process("sample", run, "--precision", "fp16", "--device", "cpu", "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "fp16 needs a CUDA device" in r.stderr


# --- checkpoints it cannot use --------------------------------------------------------------------


def test_checkpoint_from_another_version_is_explained(trained_run, tmp_path):
    import torch

    state = torch.load(trained_run[0] / "checkpoints/ckpt-00000006.pt", weights_only=True)
    state["config"]["sample"]["clip_x0"] = True  # a field this version does not know
    torch.save(state, tmp_path / "old.pt")
    r = ddpm_in_process("sample", tmp_path / "old.pt", "--n", 1, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "written by another version" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    r = ddpm_in_process("sample", tmp_path / "junk.pt", "--n", 1, "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "not a readable ddpm checkpoint" in r.stderr
