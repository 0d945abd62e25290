"""The `ddpm` entry point's contract: help for every option; bad input gets one line, exit
code 2 and no traceback, and writes nothing (the tables of odd and bad inputs below, each
driven through the command line); output paths; a reader that stops early; nothing refused
runs code. Each command's own runs: test_cli_train.py, test_cli_sample.py, test_cli_eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.presets import get_preset

from conftest import assert_refused, cli, ddpm_in_process, snapshot


def test_help_explains_every_option():
    r = ddpm_in_process("train", "--help")
    assert r.returncode == 0
    for option in ("--preset", "--steps", "--minutes", "--out", "--resume", "--checkpoint-every",
                   "--precision", "--lr", "--ema-decay"):
        assert option in r.stdout
    assert "default" in r.stdout
    assert ddpm_in_process("sample", "--help").returncode == 0
    assert ddpm_in_process("--help").returncode == 0


# --- bad input: one line, exit code 2, nothing written over existing outputs ----------------------


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


BAD_INPUT = [
    # an image size the U-Net's downsampling cannot take
    ("train --preset tiny --data-dir {fake} --image-size 29 --out {root}/new",
     "image size 29 cannot be halved"),
    # channels the data cannot be converted to (1 and 3 are; the model follows the data)
    ("train --preset tiny --data-dir {fake} --channels 2 --out {root}/new",
     "invalid choice: 2 (choose from 1, 3)"),
    # unknown names, each message listing the valid ones (quoted or not, by Python's version)
    ("sample {root}/run --sampler plms --out {root}/existing.png",
     ("invalid choice: 'plms' (choose from", "ddim", "dpm++")),
    ("train --preset tiny --schedule cosin --out {root}/new",
     ("invalid choice: 'cosin' (choose from", "cosine", "sigmoid")),
    ("train --dataset imagenet --out {root}/new",
     ("invalid choice: 'imagenet' (choose from", "tinyimagenet", "cifar100")),
    ("train --preset huge --out {root}/new", ("invalid choice: 'huge' (choose from", "fashion-cpu")),
    # steps larger than T or below 1
    ("sample {root}/run --steps 101 --out {root}/existing.png",
     "--steps 101 is more than the model's 100 training timesteps; use 1..100"),
    ("sample {root}/run --steps 0 --out {root}/existing.png", "expected a number >= 1, got 0"),
    # checkpoints: another configuration, another version, truncated, not a checkpoint
    ("sample {root}/other_config.pt --out {root}/existing.png", "holds weights of another model"),
    ("train --resume {root}/other_config_run --steps 4", "holds weights of another model"),
    ("sample {root}/other_version.pt --out {root}/existing.png", "has checkpoint format 99"),
    ("sample {root}/truncated.pt --out {root}/existing.png", "it may be truncated"),
    ("sample {root}/junk.pt --out {root}/existing.png", "is not a readable ddpm checkpoint"),
    ("sample {root}/foreign.pt --out {root}/existing.png", "a torch file but not a ddpm checkpoint"),
    ("train --resume {root}/run --lr 0.5 --steps 4",
     "the command line changes train.lr from 0.001 to 0.5; drop that option"),
    # data: missing, an empty folder, a corrupt file under --strict
    ("train --preset tiny --data-dir {root}/nowhere --out {root}/new",
     "apt-get install dataset-fashion-mnist"),
    ("train --preset tiny --dataset folder --data-dir {root}/empty --out {root}/new", "holds no images"),
    ("train --preset tiny --dataset folder --data-dir {root}/pets --image-size 16 --strict "
     "--no-progress --out {root}/new", "cannot decode image {root}/pets/dogs/x.png"),  # no bar
    # unwritable outputs
    ("train --preset tiny --data-dir {fake} --out {root}/afile/run", "{root}/afile is a file"),
    ("train --preset tiny --data-dir {fake} --out /proc/ddpm-run", "files cannot be made in /proc"),
    ("sample {root}/run --out {root}/afile/grid.png", "which is a file; choose a folder"),
    ("sample {root}/run --out {root}/afile", "is a file; give a folder, a grid (.png, .jpg or .webp)"),
    # classes and guidance
    ("sample {root}/run --guidance 2 --out {root}/existing.png", "needs a class-conditional model"),
    ("sample {root}/run --class 3 --out {root}/existing.png", "trained without class labels"),
    ("sample {root}/crun --class 10 --out {root}/existing.png",
     "--class 10 is out of range: this model has classes 0..9"),
    ("sample {root}/crun --class pyjamas --out {root}/existing.png", "give one of T-shirt/top"),
]


@pytest.mark.parametrize("command, message", BAD_INPUT, ids=[c.split(" --out")[0] for c, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, fake_fashion, command, message):
    before = snapshot(world)
    fill = {"root": world, "fake": fake_fashion}
    code, out, err = cli(*command.format(**fill).split())
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    for fragment in (message,) if isinstance(message, str) else message:
        assert fragment.format(**fill) in lines[0], err
    assert "Traceback" not in err + out
    assert snapshot(world) == before, "a bad command changed the files that were there"
    assert not (world / "new").exists()


# --- odd inputs: careless and hostile ones, each with what it gets --------------------------------


SEED_RANGE = "[0, 9223372036854775806]"


ODD_INPUTS = [
    # --- inf is refused where nan is (no float setting means anything by it)
    ("sample {root}/run --guidance inf --out {root}/existing.png",
     "argument --guidance: expected a finite number in [0, 100], got inf", ()),
    ("eval {root}/crun --guidance inf", "argument --guidance: expected a finite number in [0, 100]", ()),
    ("train --preset tiny --minutes inf --out {root}/new", "argument --minutes: expected a finite", ()),
    ("viz reverse {root}/run --out {root}/r.gif --fps inf", "argument --fps: expected a finite", ()),
    # --- raw library messages, refused in our words
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
    # --- FID of too few images
    ("eval {root}/run --n 10", "FID of 10 images with fashion-mnist-cnn features is not "
                               "estimable: their covariance needs at least 128 images", ()),
    ("train --preset tiny --data-dir {fake} --fid-every 5 --fid-n 10 --out {root}/new",
     "FID of 10 images with fashion-mnist-cnn features is not estimable: their covariance needs "
     "at least 128 images, one per feature dimension; give --fid-n 128 or more", ()),
    # --- output paths taken too literally
    ("sample {root}/run --out {root}/run", "is a training run's folder; give a new folder", ()),
    ("sample {root}/run --out {root}/s.gif", "sample writes no .gif files", ()),
    ("sample {root}/run --out {root}/s.bmp", "sample writes no .bmp files", ()),
    # --- non-finite, empty, huge and wrong-typed values ------------------------------------------
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
    ("sample {root}/run --workers 0 --out {root}/existing.png",
     "argument --workers: expected a number >= 1, got 0 (or auto: one process per core)", ()),
    ("sample {root}/run --workers two --out {root}/existing.png",
     "argument --workers: expected a whole number, got 'two' (or auto: one process per core)", ()),
    ("sample {root}/run --workers 2 --compile --out {root}/existing.png",
     "--workers 2 and --compile do not mix (each worker would compile the network again)", ()),
    ("eval {root}/run --workers 2 --compile", "--workers 2 and --compile do not mix", ()),
    ("posthoc-ema {root}/run --workers 0", "argument --workers: expected a number >= 1, got 0", ()),
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


# --- output paths ---------------------------------------------------------------------------------


def test_an_empty_output_path_is_refused(world):
    before = snapshot(world)
    r = ddpm_in_process("sample", world / "run", "--out", "")
    assert r.returncode == 2 and "--out is empty" in r.stderr
    assert snapshot(world) == before


def test_an_output_in_a_new_folder_gets_the_folder(tmp_path):
    out = tmp_path / "new" / "sub" / "s.png"
    r = ddpm_in_process("viz", "schedule", "--out", out)
    assert r.returncode == 0 and out.is_file(), r.stderr


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


# --- nothing refused runs code --------------------------------------------------------------------


def test_nothing_refused_here_runs_code_or_loads_unsafely(world):
    """The messages above never advise an unsafe load, and the loaders never unpickle objects."""
    with pytest.raises(Exception) as info:
        load_checkpoint(world / "text.pt")
    assert "weights_only" not in str(info.value)
    assert torch.load(world / "run/checkpoints/ckpt-00000002.pt", weights_only=True)["step"] == 2
