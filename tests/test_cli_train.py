"""`ddpm train` end to end, as a user types it: a run's files, resume, data options and image
folders, a smaller T, the EDM formulation."""

import pytest
from PIL import Image

from conftest import ddpm, ddpm_in_process


def test_train_writes_checkpoint_grid_and_logs(trained_run):
    run, stdout = trained_run
    assert (run / "checkpoints/ckpt-00000006.pt").is_file()
    assert (run / "checkpoints/ckpt-00000003.pt").is_file()
    assert (run / "config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert any((run / "tensorboard").iterdir())
    grid = Image.open(run / "grid.png")
    assert grid.size[0] > 28 and grid.size[1] > 28
    assert "checkpoint:" in stdout and "sample grid:" in stdout


def test_resume_continues_the_run(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    r = ddpm("train", "--resume", run, "--steps", 9, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and (run / "checkpoints/ckpt-00000009.pt").is_file()


def test_existing_run_is_not_overwritten(trained_run):
    run, _ = trained_run
    before = (run / "checkpoints/ckpt-00000006.pt").read_bytes()
    r = ddpm_in_process("train", "--preset", "tiny", "--out", run, "--steps", 2)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (run / "checkpoints/ckpt-00000006.pt").read_bytes() == before


def test_smaller_T_than_the_preset_samples_with_all_steps(tmp_path, fake_fashion):
    r = ddpm("train", "--preset", "tiny", "--steps", 2, "--num-timesteps", 8, "--schedule", "cosine",
             "--sample-every", 1, "--out", tmp_path / "run", "--data-dir", fake_fashion, "--no-progress")
    assert r.returncode == 0, r.stderr
    import json

    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["train"]["sample_steps"] == 8 and config["sample"]["num_sample_steps"] == 8
    assert (tmp_path / "run/samples/step-00000002.png").is_file()


# --- data options and image folders ---------------------------------------------------------------


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


# --- the EDM formulation as one option ------------------------------------------------------------


def test_a_run_of_the_edm_formulation_trains_samples_and_resumes(fake_fashion, tmp_path):
    from ddpm.pipeline import load_pipeline

    from conftest import ddpm_in_process as cli

    run = tmp_path / "edm"
    r = cli("train", "--preset", "tiny", "--formulation", "edm", "--sigma-data", "0.8",
            "--data-dir", fake_fashion, "--steps", "2", "--out", run, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "preset: tiny, formulation edm" in r.stdout
    assert "through EDM's preconditioning (sigma_data 0.8)" in r.stdout and "EDM weights" in r.stdout
    config = load_pipeline(run).config
    assert (config.diffusion.preconditioning, config.diffusion.timestep_sampling,
            config.diffusion.loss_weighting) == ("edm", "log-normal", "edm")
    assert (config.sample.sampler, config.sample.num_sample_steps) == ("heun", 18)
    r = cli("sample", run, "--n", "2", "--steps", "3", "--out", tmp_path / "s.png", "--no-progress")
    assert r.returncode == 0 and (tmp_path / "s.png").exists(), r.stderr
    # a job script run again with --resume added goes on; the formulation named on a run that
    # was not trained with it is refused before anything is written
    r = cli("train", "--resume", run, "--formulation", "edm", "--steps", "3", "--no-progress")
    assert r.returncode == 0 and "trained 3 steps" in r.stdout, r.stderr
    plain = tmp_path / "plain"
    assert cli("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", "1", "--out",
               plain, "--no-progress").returncode == 0
    before = sorted(p.name for p in (plain / "checkpoints").iterdir())
    r = cli("train", "--resume", plain, "--formulation", "edm", "--steps", "2", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "changes diffusion.preconditioning from 'none' to 'edm'" in r.stderr, r.stderr
    assert sorted(p.name for p in (plain / "checkpoints").iterdir()) == before
