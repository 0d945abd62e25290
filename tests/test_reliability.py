"""Reliability: bad input gets one line and exit code 2 with nothing overwritten; faults (signals,
SIGKILL mid-write, NaN, a full disk, a crafted file) lose no training and run no code."""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm import get_preset, train
from ddpm.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_run_or_file

from conftest import ddpm_in_process, snapshot


def tiny_config(data_dir, **train_overrides):
    c = get_preset("tiny")
    return dataclasses.replace(
        c, data=dataclasses.replace(c.data, data_dir=str(data_dir)),
        train=dataclasses.replace(c.train, **{"sample_every": 0, **train_overrides}))


def cli(*args) -> tuple[int, str, str]:
    """``ddpm ARGS`` through the CLI's main, in this process: (exit code, stdout, stderr)."""
    r = ddpm_in_process(*args)
    return r.returncode, r.stdout, r.stderr


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])


# --- bad input: one line, exit code 2, nothing written over existing outputs ------------------


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


def test_a_run_being_trained_cannot_be_trained_twice(world):
    before = snapshot(world / "run")
    with open(world / "run/.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        code, _, err = cli("train", "--resume", world / "run", "--steps", 4, "--no-progress")
    assert code == 2 and "is being trained by another process" in err
    assert snapshot(world / "run") == before


def test_corrupt_images_are_skipped_with_a_count_and_their_paths(world):
    from ddpm.data import load_dataset

    with pytest.warns(UserWarning, match=r"skipped 1 image file\(s\) .* e\.g\. .*dogs/x\.png"):
        data = load_dataset("folder", world / "pets", image_size=16)
    assert len(data.images) == 6


# --- crafted files ---------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls open(marker, 'w'): a stand-in for any code an attacker could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_crafted_to_run_code_does_not_run_it(world, tmp_path):
    marker = tmp_path / "the-code-ran"
    state = load_checkpoint(world / "run/checkpoints/ckpt-00000002.pt")
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    for target in (tmp_path / "evil.pt", *list_checkpoints(run)):
        torch.save({**state, "payload": _RunsCode(marker)}, target)
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the file works: unpickled, it runs
    assert marker.exists()
    marker.unlink()
    for command in (("sample", tmp_path / "evil.pt", "--out", tmp_path / "x.png"),
                    ("eval", tmp_path / "evil.pt", "--n", 4),
                    ("train", "--resume", run, "--steps", 4)):
        code, _, err = cli(*command)
        assert code == 2, err
        assert "not a readable ddpm checkpoint" in err or "no loadable checkpoint" in err, err
        assert not marker.exists(), f"ddpm {command[0]} ran the file's code"
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


# --- NaN, full disk ---------------------------------------------------------------------------


@pytest.fixture
def nan_at(monkeypatch):
    """Make the training loss NaN at the given (1-based) calls, through the real loss's graph."""
    module = importlib.import_module("ddpm.step")  # where train_step looks the loss up
    real = module.training_loss
    calls = []

    def inject(steps):
        def loss(*args, **kwargs):
            calls.append(1)
            value = real(*args, **kwargs)
            return value * float("nan") if len(calls) in steps else value
        monkeypatch.setattr(module, "training_loss", loss)
    return inject


def test_a_nan_loss_stops_and_leaves_the_last_checkpoint_intact(tmp_path, fake_fashion, nan_at):
    reference = train(tiny_config(fake_fashion, steps=4, checkpoint_every=2), tmp_path / "ref",
                      progress=False, final_grid=False)
    nan_at({5})
    with pytest.raises(FloatingPointError) as err:
        train(tiny_config(fake_fashion, steps=6, checkpoint_every=2), tmp_path / "run",
              progress=False, final_grid=False)
    assert "the loss became nan at step 5" in str(err.value)
    assert "ckpt-00000004.pt is intact" in str(err.value) and "--on-nan skip" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt-00000004.pt",
                                                                     "ckpt-00000002.pt"]
    path, state = load_run_or_file(tmp_path / "run")
    assert state["step"] == 4 and same_weights(state, load_checkpoint(reference.checkpoint))


def test_a_nan_loss_is_skipped_and_counted_when_asked(tmp_path, fake_fashion, nan_at):
    nan_at({3, 5})
    code, out, err = cli("train", "--preset", "tiny", "--data-dir", fake_fashion,
                         "--steps", 6, "--checkpoint-every", 1, "--keep-checkpoints", 6,
                         "--sample-every", 0, "--log-every", 1, "--on-nan", "skip",
                         "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    assert "2 updates skipped" in out and "step 3: the loss is nan; update skipped" in err
    ckpt = {int(p.stem[5:]): load_checkpoint(p) for p in list_checkpoints(tmp_path / "run")}
    # a skipped step leaves the weights, the EMA and the optimiser exactly as they were
    for before, after in ((2, 3), (4, 5)):
        assert same_weights(ckpt[before], ckpt[after])
        moments = ckpt[before]["optimizer"]["state"], ckpt[after]["optimizer"]["state"]
        assert all(torch.equal(moments[0][i]["exp_avg"], moments[1][i]["exp_avg"])
                   for i in moments[0])
    assert not same_weights(ckpt[5], ckpt[6]), "training goes on after a skipped step"
    assert all(torch.isfinite(v).all() for v in ckpt[6]["model"].values())
    assert ckpt[6]["skipped_steps"] == 2
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in logged if "loss" in r] == [0, 0, 1, 1, 2, 2]


@pytest.fixture
def full_disk(monkeypatch):
    """Checkpoint writes at the given (1-based) calls go to /dev/full: the kernel's ENOSPC."""
    module = importlib.import_module("ddpm.checkpoint")
    real, calls = os.fdopen, []

    def inject(failing):
        def fdopen(fd, mode="r", *args, **kwargs):
            calls.append(1)
            if len(calls) not in failing:
                return real(fd, mode, *args, **kwargs)
            os.close(fd)
            return open("/dev/full", "wb")
        monkeypatch.setattr(module.os, "fdopen", fdopen)
    return inject


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, fake_fashion, full_disk):
    # writes: config.json, then the checkpoints of steps 1, 2 (fails), 3, 4 (fails) and the last
    # try at the end (fails)
    full_disk({3, 5, 6})
    code, out, err = cli("train", "--preset", "tiny", "--data-dir", fake_fashion,
                         "--steps", 4, "--checkpoint-every", 1, "--sample-every", 0,
                         "--out", tmp_path / "run", "--no-progress")
    checkpoints = tmp_path / "run/checkpoints"
    assert re.search(r"could not write .*ckpt-00000002\.pt \(the disk is full\); the newest "
                     r"checkpoint .*ckpt-00000001\.pt is intact; training goes on", err), err
    assert code == 1 and "Traceback" not in err
    assert re.fullmatch(r"ddpm train: error: could not write \S+ckpt-00000004\.pt \(the disk is "
                        r"full\); the newest checkpoint \S+ckpt-00000003\.pt is intact",
                        err.splitlines()[-1]), err
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "ckpt-00000001.pt", "ckpt-00000003.pt"], "a temporary file was left behind"
    assert load_checkpoint(checkpoints / "ckpt-00000003.pt")["step"] == 3


# --- signals ----------------------------------------------------------------------------------


def ddpm_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpm", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, process, timeout=120.0, poll=0.01):
    end = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(poll)


def logged_steps(run: Path) -> list[int]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]


def test_sigterm_to_the_process_saves_the_step_it_came_at_and_resume_continues(tmp_path,
                                                                               fake_fashion):
    signal_and_resume(tmp_path / "run", signal.SIGTERM, group=False, data=(
        "--data-dir", fake_fashion))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_with_streaming_workers_saves_and_resumes(tmp_path, signum):
    """Ctrl-C at a terminal (and some schedulers' SIGTERM) reaches every process of the group,
    the DataLoader workers that decode the streamed images included."""
    from conftest import make_image_folder

    make_image_folder(tmp_path / "pets")
    signal_and_resume(tmp_path / "run", signum, group=True, data=(
        "--dataset", "folder", "--data-dir", tmp_path / "pets", "--image-size", 16,
        "--max-memory-gb", 1e-6, "--workers", 1, "--batch-size", 4))  # 4.6 KB: streamed


def signal_and_resume(run: Path, signum: int, *, group: bool, data: tuple) -> None:
    p = subprocess.Popen([sys.executable, "-m", "ddpm", "train", "--preset", "tiny", *map(str, data),
                          "--steps", "100000", "--checkpoint-every", "0", "--sample-every", "0",
                          "--log-every", "1", "--out", str(run), "--no-progress"], text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=group)
    wait_for(lambda: len(logged_steps(run)) >= 3, p)
    before = logged_steps(run)[-1]
    if group:
        os.killpg(p.pid, signum)
    else:
        p.send_signal(signum)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signum, err
    m = re.search(rf"stopped by {signum.name} at step (\d+); checkpoint: (\S+); continue with "
                  rf"'ddpm train --resume {run}'", err)
    assert m and "Traceback" not in err, err
    step = int(m.group(1))
    # --checkpoint-every 0: the only checkpoint is the one the signal asked for, of the step the
    # run had reached (every step is logged)
    assert before <= step == logged_steps(run)[-1] <= before + 10
    assert [p.name for p in list_checkpoints(run)] == [f"ckpt-{step:08d}.pt"] == [Path(m.group(2)).name]
    assert load_checkpoint(m.group(2))["step"] == step
    r = subprocess.run([sys.executable, "-m", "ddpm", "train", "--resume", str(run),
                        "--steps", str(step + 2), "--no-progress"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_run_or_file(run)[1]["step"] == step + 2
    assert logged_steps(run)[-3:] == [step, step + 1, step + 2]


def test_sigkill_during_checkpoint_and_log_writes_never_loses_the_run(tmp_path, fake_fashion):
    """Kill training with SIGKILL at random moments, some of them while a checkpoint is being
    written, with a metrics line written every step: a checkpoint always loads, every round
    resumes, and resuming reaches the uninterrupted run's weights. A kill lands between the
    bytes of one 150-byte line write too rarely to schedule, so in every third round the last
    line is cut where such a kill would cut it (such a cut line once made a run unresumable)."""
    steps = 40
    args = ("--preset", "tiny", "--data-dir", fake_fashion, "--steps", steps, "--checkpoint-every",
            1, "--keep-checkpoints", 2, "--sample-every", 0, "--log-every", 1, "--threads", 1,
            "--no-progress")
    reference = subprocess.run([sys.executable, "-m", "ddpm", "train", *map(str, args), "--out",
                                tmp_path / "ref"], capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    run, rng, kills, mid_write, torn = tmp_path / "run", random.Random(0), 0, 0, set()
    folder = run / "checkpoints"
    for round_ in range(6):
        resume = bool(list_checkpoints(run))
        start_step = load_run_or_file(run)[1]["step"] if resume else 0
        if start_step >= steps - 3:
            break
        p = ddpm_process("train", *(("--resume", run) if resume else ("--out", run)), *args)
        # let it get going: a checkpoint newer than the one it started from
        wait_for(lambda start=start_step: any(int(c.stem[5:]) > start for c in list_checkpoints(run)), p)
        if round_ % 2:  # as soon as a checkpoint's temporary file is seen
            wait_for(lambda: any(f.name.endswith(".tmp") for f in folder.iterdir()), p, poll=0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.15))
        p.kill()
        p.wait()
        kills += 1
        mid_write += any(f.name.endswith(".tmp") for f in folder.iterdir())
        for c in list_checkpoints(run):  # every file under a checkpoint's name is whole
            assert load_checkpoint(c)["step"] == int(c.stem[5:])
        if round_ % 3 == 2:  # a kill in the middle of a metrics line
            text = (run / "metrics.jsonl").read_text()
            torn.add(json.loads(text.rstrip("\n").rsplit("\n", 1)[-1])["step"])
            cut = rng.randrange(text.rstrip("\n").rfind("\n") + 2, len(text) - 1)
            (run / "metrics.jsonl").write_text(text[:cut])
    assert kills >= 4 and mid_write >= 1 and torn
    r = subprocess.run([sys.executable, "-m", "ddpm", "train", "--resume", str(run), "--steps",
                        str(steps), "--threads", "1", "--no-progress"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not [f for f in folder.iterdir() if f.name.endswith(".tmp")], "partial writes remain"
    final, expected = load_run_or_file(run)[1], load_run_or_file(tmp_path / "ref")[1]
    assert final["step"] == expected["step"] == steps
    assert same_weights(final, expected)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == steps, "each step once, in order"
    # a step is missing only where its line was cut off after its checkpoint was written
    assert set(range(1, steps + 1)) - set(logged) <= torn


def test_a_side_output_that_cannot_be_written_warns_once_and_training_goes_on(capsys):
    from ddpm.rundir import SideOutputs

    def full(*_):
        raise OSError(28, "No space left on device")

    outputs = SideOutputs()
    assert outputs.best_effort("preview grid", full) is None
    assert outputs.best_effort("preview grid", full) is None
    assert outputs.best_effort("progress animation", lambda: "written") == "written"
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: could not write the preview grid (No space left on device); "
                     "training goes on"]
