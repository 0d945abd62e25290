"""End-to-end runs of the ``ddpm`` command, as a user types it."""

import subprocess
import sys

import pytest
from PIL import Image

from conftest import ddpm_in_process


def ddpm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ddpm", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fake_fashion):
    run = tmp_path_factory.mktemp("cli") / "run"
    r = ddpm("train", "--preset", "tiny", "--steps", 6, "--out", run, "--data-dir", fake_fashion,
             "--checkpoint-every", 3, "--no-progress")
    assert r.returncode == 0, r.stderr
    return run, r.stdout


def test_train_writes_checkpoint_grid_and_logs(trained_run):
    run, stdout = trained_run
    assert (run / "checkpoints/ckpt-00000006.pt").is_file()
    assert (run / "checkpoints/ckpt-00000003.pt").is_file()
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert any((run / "tensorboard").iterdir())
    grid = Image.open(run / "grid.png")
    assert grid.size[0] > 28 and grid.size[1] > 28
    assert "checkpoint:" in stdout and "sample grid:" in stdout


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


def test_resume_continues_the_run(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    r = ddpm("train", "--resume", run, "--steps", 9, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and (run / "checkpoints/ckpt-00000009.pt").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--steps", "-3"], "expected a number >= 1, got -3"),
        (["train", "--steps", "5", "--minutes", "2"], "not allowed with argument"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--schedule", "cosin"], "invalid choice: 'cosin'"),
        (["sample", "/no/such/run", "--out", "x.png"], "neither a checkpoint file nor a run"),
        (["train", "--resume", "/no/such/run"], "has no checkpoints"),
        (["train", "--preset", "tiny", "--data-dir", "/no/such/dir", "--out", "{tmp}/r"],
         "apt-get install dataset-fashion-mnist"),
        (["train", "--preset", "tiny", "--precision", "fp16", "--device", "cpu", "--out", "{tmp}/r"],
         "fp16 needs a CUDA device"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    r = ddpm_in_process(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert message in lines[0]


def test_existing_run_is_not_overwritten(trained_run):
    run, _ = trained_run
    before = (run / "checkpoints/ckpt-00000006.pt").read_bytes()
    r = ddpm_in_process("train", "--preset", "tiny", "--out", run, "--steps", 2)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (run / "checkpoints/ckpt-00000006.pt").read_bytes() == before


def test_sample_steps_beyond_T_is_refused(trained_run, tmp_path):
    r = ddpm_in_process("sample", trained_run[0], "--n", 1, "--steps", 5000, "--out",
                        tmp_path / "x.png")
    assert r.returncode == 2 and "more than the model's 100 training timesteps" in r.stderr


def test_help_explains_every_option():
    r = ddpm_in_process("train", "--help")
    assert r.returncode == 0
    for option in ("--preset", "--steps", "--minutes", "--out", "--resume", "--checkpoint-every",
                   "--precision", "--lr", "--ema-decay"):
        assert option in r.stdout
    assert "default" in r.stdout
    assert ddpm_in_process("sample", "--help").returncode == 0
    assert ddpm_in_process("--help").returncode == 0


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


def test_smaller_T_than_the_preset_samples_with_all_steps(tmp_path, fake_fashion):
    r = ddpm("train", "--preset", "tiny", "--steps", 2, "--num-timesteps", 8, "--schedule", "cosine",
             "--sample-every", 1, "--out", tmp_path / "run", "--data-dir", fake_fashion, "--no-progress")
    assert r.returncode == 0, r.stderr
    import json

    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["train"]["sample_steps"] == 8 and config["sample"]["num_sample_steps"] == 8
    assert (tmp_path / "run/samples/step-00000002.png").is_file()


def test_train_on_an_image_folder_with_labels_follows_its_size_and_classes(tmp_path):
    """The CLI path of a file dataset: the model takes the folder's size and channels, the
    labels come from subfolders, the corrupt file is skipped with a warning, and a class can be
    asked for by its folder's name."""
    import json

    import numpy as np

    from conftest import make_image_folder

    make_image_folder(tmp_path / "pets")
    run = tmp_path / "run"
    r = ddpm("train", "--preset", "tiny", "--dataset", "folder", "--data-dir", tmp_path / "pets",
             "--image-size", 16, "--folder-labels", "--conditional", "--batch-size", 4,
             "--steps", 2, "--sample-every", 0, "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "x.png" in r.stderr and "skip" in r.stderr.lower()
    config = json.loads((run / "config.json").read_text())
    assert (config["model"]["in_channels"], config["model"]["image_size"]) == (3, 16)
    assert config["model"]["num_classes"] == 2
    assert config["data"]["image_size"] == 16 and config["data"]["data_dir"] == str(tmp_path / "pets")
    r = ddpm("sample", run, "--class", "dogs", "--n", 2, "--steps", 3, "--out", tmp_path / "d.npz",
             "--no-progress")
    assert r.returncode == 0 and "of class 1 (dogs)" in r.stdout, r.stderr
    with np.load(tmp_path / "d.npz") as z:
        assert z["arr_0"].shape == (2, 16, 16, 3)


def test_conditional_training_on_unlabelled_images_is_refused(tmp_path):
    from conftest import make_image_folder

    make_image_folder(tmp_path / "pets")
    r = ddpm_in_process("train", "--preset", "tiny", "--dataset", "folder", "--data-dir",
                        tmp_path / "pets", "--conditional", "--out", tmp_path / "run")
    assert r.returncode == 2 and "add --folder-labels" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (("--dataset", "folder"), "pass --data-dir"),
    (("--dataset", "cifar10", "--data-dir", "{tmp}/none"), "--download"),
    (("--image-size", "29"), "image size 29 cannot be halved"),
    (("--dataset", "folder", "--data-dir", "{tmp}", "--split", "test"), "no test split"),
])
def test_bad_data_options_are_one_line_errors(tmp_path, args, message):
    r = ddpm_in_process("train", "--preset", "tiny",
                        *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", tmp_path / "run")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


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
