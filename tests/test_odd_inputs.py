"""Reliability, second round: careless and hostile inputs, and what crashes leave behind.

Each case of issue 18 is driven through the command line with its reproduction, and so are the
odd inputs tried after it (ODD_INPUTS, beyond the 27 of test_reliability.BAD_INPUT). A bad input
gets one line, exit code 2, no traceback, and the files already there stay as they were.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ddpm_in_process, snapshot
from ddpm.checkpoint import load_checkpoint, load_run_or_file
from ddpm.config import RunConfig, get_preset

SEED_RANGE = "[0, 9223372036854775806]"

# (command, what its one line must say, what it must not say)
ODD_INPUTS = [
    # --- issue 18, item 5: inf is refused where nan is (no float setting means anything by it)
    ("sample {root}/run --guidance inf --out {root}/existing.png",
     "argument --guidance: expected a finite number >= 0, got inf", ()),
    ("eval {root}/crun --guidance inf", "argument --guidance: expected a finite number >= 0", ()),
    ("train --preset tiny --minutes inf --out {root}/new", "argument --minutes: expected a finite", ()),
    ("viz reverse {root}/run --out {root}/r.gif --fps inf", "argument --fps: expected a finite", ()),
    # --- item 6: raw messages
    ("sample {root}/run --seed 1180591620717411303424 --out {root}/existing.png",
     f"argument --seed: expected a number in {SEED_RANGE}, got 1180591620717411303424", ()),
    ("train --preset tiny --seed 1180591620717411303424 --out {root}/new",
     f"argument --seed: expected a number in {SEED_RANGE}", ()),
    ("eval --images {root}/text.npz --dataset fashion-mnist",
     "text.npz: it is not an .npz file", ("pickle", "unsafe")),
    ("sample {root}/text.pt --out {root}/existing.png",
     "text.pt is not a readable ddpm checkpoint: it is not a torch file", ("weights_only",)),
    ("sample {root}/folder_run --out {root}/existing.png",
     "ckpt-00000002.pt is a folder, not a ddpm checkpoint file", ("1 files", "written by 'ddpm train'")),
    ("train --preset tiny --attention-resolutions 1,x --out {root}/new", "e.g. 14,7", ("1,2,2",)),
    ("train --preset tiny --data-dir {fake} --split test --batch-size 99 --no-progress "
     "--out {root}/new", "batch size 99 is larger than the dataset (64 images); use "
                         "--batch-size 64 or less", ()),
    # --- item 7: FID of too few images
    ("eval {root}/run --n 10", "FID of 10 images with fashion-mnist-cnn features is not "
                               "estimable: their covariance needs at least 128 images", ()),
    ("train --preset tiny --data-dir {fake} --fid-every 5 --fid-n 10 --out {root}/new",
     "FID of 10 images with fashion-mnist-cnn features is not estimable: their covariance needs "
     "at least 128 images, one per feature dimension; give --fid-n 128 or more", ()),
    # --- item 8: output paths taken too literally
    ("sample {root}/run --out {root}/run", "is a training run's folder; give a new folder", ()),
    ("sample {root}/run --out {root}/s.gif", "sample writes no .gif files", ()),
    ("sample {root}/run --out {root}/s.bmp", "sample writes no .bmp files", ()),
    # --- the campaign after issue 18 --------------------------------------------------------
    ("train --preset tiny --lr nan --out {root}/new", "argument --lr: expected a finite number > 0", ()),
    ("train --preset tiny --lr -0.1 --out {root}/new", "argument --lr: expected a number > 0, got -0.1", ()),
    ("train --preset tiny --ema-decay 1 --out {root}/new", "expected a number in (0, 1), got 1", ()),
    ("train --preset tiny --batch-size 0 --out {root}/new", "expected a number >= 1, got 0", ()),
    ("train --preset tiny --channel-mults 1,0 --out {root}/new", "expected a number >= 1, got 0 in '1,0'", ()),
    ("train --preset tiny --adam-betas 0.9 --out {root}/new",
     "expected 2 comma-separated values such as 0.9,0.999, got '0.9'", ()),
    ("train --preset tiny --adam-betas 0.9,1.5 --out {root}/new", "expected a number in [0, 1), got 1.5", ()),
    ("train --preset tiny --dropout 1 --out {root}/new", "expected a number in [0, 1), got 1", ()),
    ("train --preset tiny --num-timesteps 1 --out {root}/new", "expected a number >= 2, got 1", ()),
    ("train --preset tiny --min-snr-gamma 0 --out {root}/new", "expected a number > 0, got 0", ()),
    ("train --preset tiny --warmup-steps -1 --out {root}/new", "expected a number >= 0, got -1", ()),
    ("train --preset tiny --seed -1 --out {root}/new", f"expected a number in {SEED_RANGE}, got -1", ()),
    ("train --preset tiny --image-size 7 --out {root}/new", "expected a number >= 8, got 7", ()),
    ("train --preset tiny --max-memory-gb 0 --out {root}/new", "expected a number > 0, got 0", ()),
    ("train --preset tiny --keep-checkpoints 0 --out {root}/new", "expected a number >= 1, got 0", ()),
    ("train --preset tiny --num-processes 0 --out {root}/new", "expected a number >= 1, got 0", ()),
    ("train --preset tiny --data-dir {fake} --fid-steps 2000 --out {root}/new",
     "--fid-steps is 2000 but must be between 1 and T = 100", ()),
    ("train --preset tiny --data-dir {fake} --zero-terminal-snr --out {root}/new",
     "use prediction_type v (or x0)", ()),
    ("train --preset tiny --hflip --no-hflip --out {root}/new", "give --hflip or --no-hflip, not both", ()),
    ("train --preset tiny --device tpu --out {root}/new", "unknown device 'tpu'", ()),
    ("train --preset tiny --config {root}/nowhere.json --out {root}/new", "cannot read --config", ()),
    ("train --preset tiny --config {root}/afile --out {root}/new", "afile is not JSON", ()),
    ("train --preset tiny --data-dir {fake} --class-dropout 0.2 --out {root}/new",
     "--class-dropout is a setting of a class-conditional model; add --conditional", ()),
    ("train --resume {root}/run --out {root}/elsewhere", "--resume continues a run in place", ()),
    ("train --resume {root}/run --preset fashion-cpu --steps 4",
     f"changes model.base_channels from 8 to {get_preset('fashion-cpu').model.base_channels}", ()),
    ("train --resume {root}/empty", "has no checkpoints", ()),
    ("sample {root}/run --eta 0.5 --out {root}/existing.png",
     "--eta is a setting of the ddim sampler, not of ddpm", ()),
    ("sample {root}/run --variance beta --sampler dpm++ --out {root}/existing.png",
     "--variance is a setting of the ddpm sampler, not of dpm++", ()),
    ("sample {root}/run --churn 40 --sampler ddim --out {root}/existing.png",
     "--churn is a setting of the euler and heun samplers, not of ddim; add --sampler heun", ()),
    ("sample {root}/run --n 0 --out {root}/existing.png", "expected a number >= 1, got 0", ()),
    ("sample {root}/run --batch-size 0 --out {root}/existing.png", "expected a number >= 1, got 0", ()),
    ("sample {root}/run --class all --out {root}/existing.png", "trained without class labels", ()),
    ("sample {root}/crun --class all --guidance -1 --out {root}/existing.png",
     "expected a number >= 0, got -1", ()),
    ("sample {root}/run --x0 sigmoid --out {root}/existing.png", "invalid choice: 'sigmoid'", ()),
    ("eval {root}/run --split val", "invalid choice: 'val'", ()),
    ("eval {root}/run --npz-key a", "--npz-key names an array of --images", ()),
    ("eval --images {root}/few.npz --dataset fashion-mnist", "FID of 4 images", ()),
    ("viz forward --timesteps 5000 --out {root}/f.png", "--timesteps 5000 is outside 0..999", ()),
    ("viz reverse {root}/run --out {root}/r.gif --frames 500",
     "--frames 500 is more than the 20 sampling steps", ()),
    ("viz reverse {root}/run --out {root}/r.gif --steps 1", "needs --steps 2 or more", ()),
    ("viz curves {root}/empty --out {root}/c.png", "has no metrics.jsonl", ()),
    ("viz schedule --out {root}/s.txt", "the file must end in .png", ()),
    ("presets huge", "invalid choice: 'huge'", ()),
    ("bench --seconds 0", "expected a number > 0, got 0", ()),
    ("train-classifier --dataset cifar10 --out {root}/c.pt", "invalid choice: 'cifar10'", ()),
]


@pytest.mark.parametrize("command, message, absent", ODD_INPUTS,
                         ids=[c.split(" --out")[0][:60] for c, _, _ in ODD_INPUTS])
def test_odd_input_is_one_line_exit_2_and_changes_nothing(world, fake_fashion, command, message,
                                                          absent):
    before = snapshot(world)
    fill = {"root": world, "fake": fake_fashion}
    r = ddpm_in_process(*command.format(**fill).split())
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message.format(**fill) in lines[0], r.stderr
    assert not any(word in lines[0] for word in absent), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert snapshot(world) == before, "an odd command changed the files that were there"
    assert not (world / "new").exists() and not (world / "elsewhere").exists()


def test_an_empty_output_path_is_refused(world):
    before = snapshot(world)
    r = ddpm_in_process("sample", world / "run", "--out", "")
    assert r.returncode == 2 and "--out is empty" in r.stderr
    assert snapshot(world) == before


# --- item 1: a decompression bomb -----------------------------------------------------------------


def write_bomb(path: Path, side: int = 100_000) -> None:
    """A PNG whose header declares side x side grey pixels (10 gigapixels), and no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def bomb_folder(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_bomb(folder / "bomb.png")
    for i in range(2):
        Image.new("RGB", (20, 20), (60 * i, 10, 200)).save(folder / f"ok{i}.png")
    return folder


def test_a_decompression_bomb_is_skipped_and_counted(bomb_folder, tmp_path):
    args = ("train", "--preset", "tiny", "--steps", 1, "--dataset", "folder", "--data-dir",
            bomb_folder, "--image-size", 16, "--batch-size", 1, "--sample-every", 0, "--no-progress")
    r = ddpm_in_process(*args, "--out", tmp_path / "R")
    assert r.returncode == 0, r.stderr
    assert "warning: skipped 1 image file(s)" in r.stderr and "bomb.png" in r.stderr
    r = ddpm_in_process(*args, "--strict", "--cache-dir", tmp_path / "fresh", "--out", tmp_path / "S")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "bomb.png" in lines[0], r.stderr
    assert "DecompressionBombError" in lines[0] and not (tmp_path / "S").exists()
    r = ddpm_in_process("eval", "--images", bomb_folder, "--dataset", "fashion-mnist")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "cannot read image" in lines[0] and "bomb.png" in lines[0] and "Traceback" not in r.stderr


def test_a_streamed_folder_skips_the_bomb_too(bomb_folder, tmp_path):
    r = ddpm_in_process("train", "--preset", "tiny", "--steps", 1, "--dataset", "folder",
                        "--data-dir", bomb_folder, "--image-size", 16, "--batch-size", 1,
                        "--max-memory-gb", 1e-9, "--workers", 0, "--sample-every", 0,
                        "--no-progress", "--out", tmp_path / "R")
    assert r.returncode == 0 and "skipped 1 image file(s)" in r.stderr, r.stderr


# --- items 2-4: what a crash or a careless edit leaves in a run -----------------------------------


@pytest.fixture
def run_copy(world, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    return run


def test_a_metrics_line_cut_off_mid_write_is_dropped_on_resume(run_copy, tmp_path):
    text = (run_copy / "metrics.jsonl").read_text()
    (run_copy / "metrics.jsonl").write_text(text[: len(text) - 20])  # a write cut short
    r = ddpm_in_process("viz", "curves", run_copy, "--out", tmp_path / "c.png")
    assert r.returncode == 0 and "warning: skipped line 2 of" in r.stderr, r.stderr
    r = ddpm_in_process("train", "--resume", run_copy, "--steps", 4, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "warning: dropped line 2 of" in r.stderr and "cut off by an interrupted write" in r.stderr
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [1, 4]  # the torn line of step 2 is gone


def test_resume_to_fewer_steps_than_done_is_refused_and_to_as_many_does_nothing(run_copy):
    before = snapshot(run_copy)
    r = ddpm_in_process("train", "--resume", run_copy, "--steps", 1)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "has trained 2 steps already, more than --steps 1" in lines[0]
    r = ddpm_in_process("train", "--resume", run_copy, "--steps", 2)
    assert r.returncode == 0 and "at step 2 already" in r.stdout and "nothing to train" in r.stdout
    r = ddpm_in_process("train", "--resume", run_copy)  # the run's own --steps 2
    assert r.returncode == 0 and "nothing to train" in r.stdout
    assert snapshot(run_copy) == before, "nothing may be rewritten"


def test_resume_from_python_to_fewer_steps_is_refused(run_copy):
    from ddpm.train import resume_config, train

    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="has trained 2 steps already, more than train.steps = 1"):
        train(resume_config(run_copy, steps=1), run_copy, resume=True, progress=False)
    assert train(resume_config(run_copy, steps=2), run_copy, resume=True, progress=False).step == 2
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("damage", ["cut", "missing", "other"])
def test_a_damaged_config_json_is_written_again_from_the_checkpoint(run_copy, damage):
    path = run_copy / "config.json"
    whole = path.read_text()
    if damage == "cut":
        path.write_text(whole[: len(whole) // 2])
    elif damage == "missing":
        path.unlink()
    else:
        edited = json.loads(whole)
        edited["model"]["base_channels"] = 64
        path.write_text(json.dumps(edited))
    r = ddpm_in_process("train", "--resume", run_copy, "--steps", 3, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "config.json was not the run's config" in r.stderr and "wrote it again from" in r.stderr
    saved = RunConfig.from_dict(load_checkpoint(run_copy / "checkpoints/ckpt-00000002.pt")["config"])
    assert RunConfig.from_dict(json.loads(path.read_text())) == saved
    assert "resuming" in r.stdout and "with the config saved in it" in r.stdout
    assert load_run_or_file(run_copy)[1]["step"] == 3


# --- item 7: found only at the end --------------------------------------------------------------


def test_a_cache_folder_that_is_a_file_is_said_first_and_the_scores_are_kept(world, tmp_path):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    r = ddpm_in_process("eval", world / "run", "--n", 128, "--steps", 2, "--sampler", "ddim",
                        "--json", "--no-progress", "--cache-dir", blocker)
    assert r.returncode == 0, r.stderr
    assert "warning: cannot cache reference statistics in" in r.stderr and "is a file" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 128
    assert blocker.read_text() == "not a folder"


def test_images_unlike_the_dataset_are_scored_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", arr_0=rng.integers(0, 256, (128, 40, 40, 3), dtype=np.uint8))
    r = ddpm_in_process("eval", "--images", tmp_path / "rgb.npz", "--dataset", "fashion-mnist",
                        "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "warning: the images are 3x40x40 but the fashion-mnist train images are 1x28x28" in r.stderr


# --- item 8: grids in the formats their names ask for ---------------------------------------------


@pytest.mark.parametrize("name, format", [("g.jpg", "JPEG"), ("g.jpeg", "JPEG"), ("g.webp", "WEBP"),
                                          ("g.png", "PNG")])
def test_sample_writes_a_grid_in_the_format_its_name_asks_for(world, tmp_path, name, format):
    r = ddpm_in_process("sample", world / "run", "--n", 4, "--steps", 2, "--out", tmp_path / name,
                        "--no-progress")
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / name) as im:
        assert im.format == format and im.size == (2 * 28 + 3 * 2,) * 2
    assert (tmp_path / name).is_file(), "a file, never a folder named like an image"


def test_nothing_refused_here_runs_code_or_loads_unsafely(world):
    """The messages above never advise an unsafe load, and the loaders never unpickle objects."""
    with pytest.raises(Exception) as info:
        load_checkpoint(world / "text.pt")
    assert "weights_only" not in str(info.value)
    assert torch.load(world / "run/checkpoints/ckpt-00000002.pt", weights_only=True)["step"] == 2
