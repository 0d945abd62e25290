"""Reliability, second round: careless and hostile inputs, and what crashes leave behind.

Each case found by a campaign of careless and hostile inputs is driven through the command line
with its reproduction, and so are the odd inputs tried after it (ODD_INPUTS, beyond the 27 of
test_reliability.BAD_INPUT). A bad input gets one line, exit code 2, no traceback, and the files
already there stay as they were.
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

from ddpm.checkpoint import load_checkpoint, load_run_or_file
from ddpm.config import RunConfig, get_preset

from conftest import ddpm_in_process, snapshot

SEED_RANGE = "[0, 9223372036854775806]"

# (command, what its one line must say, what it must not say)
ODD_INPUTS = [
    # --- inf is refused where nan is (no float setting means anything by it)
    ("sample {root}/run --guidance inf --out {root}/existing.png",
     "argument --guidance: expected a finite number in [0, 100], got inf", ()),
    ("eval {root}/crun --guidance inf", "argument --guidance: expected a finite number in [0, 100]", ()),
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
    # --- the campaign that followed ---------------------------------------------------------
    ("train --preset tiny --lr nan --out {root}/new", "argument --lr: expected a finite number > 0", ()),
    ("train --preset tiny --lr -0.1 --out {root}/new", "argument --lr: expected a number > 0, got -0.1", ()),
    ("train --preset tiny --ema-decay 1 --out {root}/new", "expected a number in (0, 1), got 1", ()),
    ("train --preset tiny --batch-size 0 --out {root}/new", "expected a number >= 1, got 0", ()),
    ("train --preset tiny --channel-mults 1,0 --out {root}/new",
     "expected a number >= 1, got 0 in '1,0'", ()),
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
     "expected a number in [0, 100], got -1", ()),
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
    # --- config files of every shape (files of the fixture odd_configs) -------------------------
    ("train --preset tiny --dry-run --config {odd}/null.json",
     "--config {odd}/null.json: config section 'train' must be an object of settings such as "
     "{{\"batch_size\": ...}}, got null", ()),
    ("train --resume {root}/run --config {odd}/null.json",
     "config section 'train' must be an object of settings", ()),
    ("train --preset tiny --dry-run --config {odd}/deep.json",
     "--config {odd}/deep.json nests lists or objects too deep to read", ()),
    ("train --resume {root}/run --config {odd}/deep.json", "nests lists or objects too deep", ()),
    ("train --preset tiny --dry-run --config {odd}/list.json",
     "config section 'train' must be an object of settings such as", ()),
    ("train --preset tiny --dry-run --config {odd}/zero.json", "an object of settings", ()),
    ("train --preset tiny --dry-run --config {odd}/empty.json",
     "--config {odd}/empty.json is empty; write the settings to change", ()),
    ("train --preset tiny --dry-run --config {odd}/folder.json",
     "--config {odd}/folder.json is a folder; give a JSON file", ()),
    ("train --preset tiny --dry-run --config {odd}/huge.json", "is more than 1 MiB", ()),
    ("train --preset tiny --dry-run --config {odd}/binary.json",
     "--config {odd}/binary.json is not JSON text (byte 128 is not UTF-8)", ("codec",)),
    ("train --preset tiny --dry-run --config {odd}/twice.json",
     "'train' is given twice in one object; give each key once", ()),
    ("train --preset tiny --dry-run --config {odd}/digits.json",
     "a whole number of 5,000 digits, more than any setting takes", ("set_int_max_str_digits",)),
    ("train --preset tiny --dry-run --config {odd}/long_section.json",
     "unknown config section(s) 'xxxxxxxx", ("x" * 100,)),
    ("train --preset tiny --dry-run --config {odd}/long_value.json",
     "train.lr must be a number, got 'yyyyyyyy", ("y" * 100,)),
    ("train --resume {root}/run --config {odd}/lr.json",
     "--config {odd}/lr.json changes train.lr from 0.001 to 0.5; drop it from the file, or start "
     "a new run with --out (--resume may change only --device, --minutes, --steps, --threads)",
     ("base_channels",)),
    (f"train --preset tiny --seed {'9' * 5000} --out {{root}}/new",
     f"argument --seed: expected a number in {SEED_RANGE}, got a whole number of 5,000 digits",
     ("9" * 100,)),
    (f"train --preset tiny --lr {'z' * 500} --out {{root}}/new",
     "argument --lr: expected a number, got 'zzzz", ("z" * 100,)),
    # --- outputs that would replace what a command reads, or a folder ----------------------------
    ("train-classifier --data-dir {fake} --epochs 1 --out {root}/empty --force",
     "--out {root}/empty is a folder; give a file name", ()),
    ("train-classifier --noisy --like {root}/run --epochs 1 --out {root}/afile/c.pt",
     "cannot write in {root}/afile, which is a file", ()),
    # --- a command refused after its --out was checked makes no folder for it
    ("sample {root}/junk.pt --out {root}/new/g.png", "junk.pt is not a readable ddpm checkpoint", ()),
    ("sample {root}/junk.pt --out {root}/new/s.npz", "junk.pt is not a readable ddpm checkpoint", ()),
    ("viz reverse {root}/junk.pt --out {root}/new/r.gif --sheet {root}/elsewhere/s.png",
     "junk.pt is not a readable ddpm checkpoint", ()),
    ("viz curves {root}/empty --out {root}/new/c.png", "has no metrics.jsonl", ()),
    ("viz forward --timesteps 5000 --out {root}/new/f.png", "--timesteps 5000 is outside 0..999", ()),
]


@pytest.fixture(scope="module")
def odd_configs(tmp_path_factory) -> Path:
    """--config files of every odd shape: sections that are not objects, JSON nested 200,000 deep,
    empty, a folder, over 1 MiB, not text, a key twice, a 5,000-digit number, names and values
    too long to echo, and a partial one that changes a setting --resume may not change."""
    root = tmp_path_factory.mktemp("odd-configs")
    files = {
        "null.json": '{"train": null}',
        "list.json": '{"train": []}',
        "zero.json": '{"train": 0}',
        "deep.json": "[" * 200_000 + "]" * 200_000,
        "empty.json": "",
        "twice.json": '{"train": {"lr": 0.001}, "train": {"steps": 5}}',
        "digits.json": '{"train": {"seed": ' + "9" * 5000 + "}}",
        "long_section.json": '{"' + "x" * 10_000 + '": {}}',
        "long_value.json": '{"train": {"lr": "' + "y" * 10_000 + '"}}',
        "lr.json": '{"train": {"lr": 0.5}}',
        "huge.json": json.dumps({"train": {"lr": 0.001}, "note": " " * 2_000_000}),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "binary.json").write_bytes(bytes(range(256)))
    (root / "folder.json").mkdir()
    return root


def assert_refused(r, message: str, absent=()) -> None:
    """One line on stderr saying ``message`` (and none of ``absent``), exit code 2, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message in lines[0], r.stderr
    assert not any(word in lines[0] for word in absent), r.stderr
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("command, message, absent", ODD_INPUTS,
                         ids=[c.split(" --out")[0][:60] for c, _, _ in ODD_INPUTS])
def test_odd_input_is_one_line_exit_2_and_changes_nothing(world, fake_fashion, odd_configs, command,
                                                          message, absent):
    before = snapshot(world), snapshot(odd_configs)
    fill = {"root": world, "fake": fake_fashion, "odd": odd_configs}
    r = ddpm_in_process(*command.format(**fill).split())
    assert_refused(r, message.format(**fill), absent)
    assert (snapshot(world), snapshot(odd_configs)) == before, \
        "an odd command changed the files that were there"
    assert not (world / "new").exists() and not (world / "elsewhere").exists()


def test_an_empty_output_path_is_refused(world):
    before = snapshot(world)
    r = ddpm_in_process("sample", world / "run", "--out", "")
    assert r.returncode == 2 and "--out is empty" in r.stderr
    assert snapshot(world) == before


def test_an_output_in_a_new_folder_gets_the_folder(tmp_path):
    out = tmp_path / "new" / "sub" / "s.png"
    r = ddpm_in_process("viz", "schedule", "--out", out)
    assert r.returncode == 0 and out.is_file(), r.stderr


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


# --- config files that are right, and a partial one on --resume ----------------------------------


def test_a_config_file_with_a_byte_order_mark_is_read(world, tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"train": {"lr": 0.002}}')  # as some editors save it
    r = ddpm_in_process("train", "--preset", "tiny", "--config", path, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["train"]["lr"] == 0.002


def test_a_partial_config_on_resume_lies_over_the_runs_own_settings(world, tmp_path):
    """What the file leaves out is the run's, not the default preset's: a file that sets the
    stopping rule and the run's own lr resumes; one that changes lr is refused, naming lr."""
    path = tmp_path / "more.json"
    path.write_text('{"train": {"lr": 0.001, "steps": 3}}')
    before = snapshot(world)
    r = ddpm_in_process("train", "--resume", world / "run", "--config", path, "--dry-run")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)["config"]
    saved = RunConfig.from_dict(load_checkpoint(world / "run/checkpoints/ckpt-00000002.pt")["config"])
    assert config["train"]["steps"] == 3 and RunConfig.from_dict(config).model == saved.model
    path.write_text('{"train": {"lr": 0.002}}')
    r = ddpm_in_process("train", "--resume", world / "run", "--config", path, "--steps", 3)
    assert_refused(r, f"--config {path} changes train.lr from 0.001 to 0.002", ("base_channels",))
    assert snapshot(world) == before


# --- a closed stdout ------------------------------------------------------------------------------


def test_a_reader_that_stops_early_gets_no_traceback():
    """'ddpm presets | head -c 400': the pipe is closed before ddpm writes; it stops quietly
    with the shell's code for SIGPIPE."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "ddpm", "presets"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first byte
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


# --- export: never over the model it exports ------------------------------------------------------


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
        patch.setattr("ddpm.diffusers_io._max_output_difference", lambda *args: 1.0)
        assert_refused(ddpm_in_process(*export), "differs from the model by up to 1.00e+00")
    assert (snapshot(tmp_path), paths(tmp_path)) == before
    export[1] = world / "crun"
    assert ddpm_in_process(*export).returncode == 0
    assert json.loads((out / "ddpm.json").read_text())["config"]["model"]["num_classes"] == 10
    assert paths(tmp_path) == before[1]  # the same files, nothing left beside them


# --- posthoc-ema: a step with a snapshot, and outputs that keep the run ---------------------------


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory, fake_fashion) -> Path:
    """A tiny run with EMA snapshots at steps 5, 10, 15 and 20 and checkpoints at 10 and 20."""
    run = tmp_path_factory.mktemp("snapshots") / "run"
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", 20,
                        "--posthoc-ema", "0.05,0.1", "--ema-snapshot-every", 5,
                        "--checkpoint-every", 10, "--sample-every", 0, "--no-progress",
                        "--out", run)
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.parametrize("args, message, absent", [
    ("--step 7", "step 7 has no EMA snapshot, and an average is rebuilt at a step that has one; "
                 "choose one of steps 5, 10, 15, 20", ()),
    (f"--step {'9' * 400}", "(400 characters) is outside the run's snapshots", ("9" * 100,)),
    ("--out {run}/checkpoints/ckpt-00000020.pt --force",
     "--out {run}/checkpoints/ckpt-00000020.pt is a file of the run", ()),
    ("--out {run}/ema/snapshot-00000010.pt --force", "is a file of the run", ()),
    ("--out {run}/config.json --force", "is a file of the run", ()),
    ("--out {run} --force", "--out {run} is a folder; give a file name", ()),
    ("--out {run}/config.json/x.pt", "which is a file; choose a folder", ()),
], ids=["step without a snapshot", "huge step", "checkpoint", "snapshot", "config", "the run",
        "under a file"])
def test_posthoc_ema_refuses_a_step_without_a_snapshot_and_outputs_over_the_run(
        snapshot_run, args, message, absent):
    before = snapshot(snapshot_run)
    r = ddpm_in_process("posthoc-ema", snapshot_run, "--std", "0.1",
                        *args.format(run=snapshot_run).split(), "--no-progress")
    assert_refused(r, message.format(run=snapshot_run), absent)
    assert snapshot(snapshot_run) == before


def test_posthoc_ema_refuses_an_empty_out_and_snapshots_not_of_the_run(snapshot_run, tmp_path):
    before = snapshot(snapshot_run)
    r = ddpm_in_process("posthoc-ema", snapshot_run, "--std", "0.1", "--out", "")
    assert_refused(r, "--out is empty")
    assert snapshot(snapshot_run) == before
    run = tmp_path / "run"
    shutil.copytree(snapshot_run, run)
    torch.save({"step": 25, "note": "not averages"}, run / "ema/snapshot-00000025.pt")
    before = snapshot(run)
    r = ddpm_in_process("posthoc-ema", run, "--std", "0.1", "--out", tmp_path / "p.pt")
    assert_refused(r, "snapshot-00000025.pt is a torch file but not an EMA snapshot")
    assert snapshot(run) == before and not (tmp_path / "p.pt").exists()
    last = torch.load(run / "ema/snapshot-00000020.pt", weights_only=True)
    for profile in last["profiles"]:  # the averages of a wider model, copied in from its run
        profile["weights"] = {k: torch.zeros(v.numel() + 1) for k, v in profile["weights"].items()}
    torch.save(last, run / "ema/snapshot-00000025.pt")
    before = snapshot(run)
    r = ddpm_in_process("posthoc-ema", run, "--std", "0.1", "--out", tmp_path / "p.pt")
    assert_refused(r, "snapshot-00000005.pt and snapshot-00000025.pt hold averages of different "
                      "models; keep only this run's snapshots")
    assert snapshot(run) == before and not (tmp_path / "p.pt").exists()


# --- the noise-aware classifier: its output, and damaged files of it -----------------------------


def test_train_classifier_never_writes_over_the_run_it_is_like(run_copy):
    before = snapshot(run_copy)
    for like in (run_copy, run_copy / "checkpoints/ckpt-00000002.pt"):
        r = ddpm_in_process("train-classifier", "--noisy", "--like", like, "--epochs", 1,
                            "--out", run_copy / "checkpoints/ckpt-00000002.pt", "--force",
                            "--no-progress")
        assert_refused(r, f"is a file of the run {run_copy.resolve()} that this command reads")
    assert snapshot(run_copy) == before


@pytest.fixture(scope="module")
def damaged_classifiers(world, tmp_path_factory) -> Path:
    """Noise-aware classifiers for the world's run with one piece of metadata damaged each."""
    root = tmp_path_factory.mktemp("classifiers")
    r = ddpm_in_process("train-classifier", "--noisy", "--like", world / "run", "--epochs", 1,
                        "--out", root / "clf.pt", "--no-progress")
    assert r.returncode == 0, r.stderr
    blob = torch.load(root / "clf.pt", weights_only=True)
    torch.save({**blob, "accuracy_by_t": [0.5, 0.4]}, root / "accuracy-list.pt")
    torch.save({**blob, "dataset": "x" * 5000}, root / "long-dataset.pt")
    return root


@pytest.mark.parametrize("name, message, absent", [
    ("accuracy-list.pt", "accuracy-list.pt is a damaged noisy classifier", ()),
    ("long-dataset.pt", "is a damaged noisy classifier (unknown dataset 'xxxx", ("x" * 100,)),
])
def test_sample_with_a_damaged_classifier_is_one_line(world, damaged_classifiers, name, message,
                                                      absent):
    before = snapshot(world)
    r = ddpm_in_process("sample", world / "run", "--classifier", damaged_classifiers / name,
                        "--class", 1, "--n", 2, "--steps", 2, "--out", world / "existing.png")
    assert_refused(r, message, absent)
    assert snapshot(world) == before
