"""Training on several processes through Accelerate (gloo on this CPU), and mixed precision.

Two processes are launched for real with ``ddpm train --num-processes 2`` (``accelerate launch``
underneath) and compared with one process doing the same run.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from ddpm import get_preset
from ddpm.checkpoint import load_run_or_file
from ddpm.models import UNet
from ddpm.runtime import make_accelerator
from ddpm.schedules import make_schedule
from ddpm.step import learning_rate, train_step
from ddpm.train import resume_config

# The update of 2 processes x 8 images equals that of 1 process x 16 in exact arithmetic: both
# see the same images, timesteps and noise, and DDP's mean of two 8-image mean gradients is the
# 16-image mean. In float32 only the summation order differs, a few ulps (~1e-7 relative) per
# gradient; Adam turns a gradient into a step of at most ~lr, so after k steps the weights can
# differ by about k * lr * 1e-7 / (relative size of the smallest gradients). We allow 2e-6, 1/3000
# of the k * lr = 6e-3 the weights can move in 6 steps; a genuinely different update (half the
# batch, checked below) moves them by ~1e-3.
TOLERANCE = 2e-6
# fp32 pinned: the argument above is float32's (under bf16 autocast, on a CPU whose --precision
# auto is bf16, the two batch splits round differently by ~1e-4)
ARGS = ["--preset", "tiny", "--batch-size", "16", "--sample-every", "0", "--no-progress",
        "--precision", "fp32"]


def ddpm_train(*args, processes=1):
    cmd = [sys.executable, "-m", "ddpm", "train", *map(str, args)]
    if processes > 1:
        cmd += ["--num-processes", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def max_difference(run_a, run_b, key="model"):
    a, b = load_run_or_file(run_a)[1][key], load_run_or_file(run_b)[1][key]
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, fake_fashion):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = ddpm_train(*ARGS, "--steps", 6, "--data-dir", fake_fashion, "--out", out, processes=2)
    assert r.returncode == 0, r.stderr
    return out, r


def test_two_processes_make_the_update_of_one_with_the_whole_batch(two_process_run, fake_fashion,
                                                                     tmp_path):
    two, r = two_process_run
    assert "launching 2 processes" in r.stdout
    assert r.stdout.count("trained 6 steps") == 1, "only the main process reports"
    one = tmp_path / "one"
    assert ddpm_train(*ARGS, "--steps", 6, "--data-dir", fake_fashion, "--out", one).returncode == 0
    assert max_difference(one, two) < TOLERANCE
    assert max_difference(one, two, "ema") < TOLERANCE
    # The tolerance can fail: half the batch is a different update, far outside it.
    half = tmp_path / "half"
    args = [a if a != "16" else "8" for a in ARGS]
    assert ddpm_train(*args, "--steps", 6, "--data-dir", fake_fashion, "--out", half).returncode == 0
    assert max_difference(one, half) > 100 * TOLERANCE


def test_main_process_alone_writes(two_process_run):
    two, _ = two_process_run
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 5, 6], "each step logged once, by one process"
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["ckpt-00000006.pt"]
    state = load_run_or_file(two)[1]
    assert state["num_processes"] == 2 and state["step"] == 6


def test_two_process_checkpoint_resumes_in_one(two_process_run, fake_fashion, tmp_path):
    two, _ = two_process_run
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(two), str(resumed)], check=True)
    r = ddpm_train("--resume", resumed, "--steps", 10, "--no-progress")
    assert r.returncode == 0, r.stderr
    straight = tmp_path / "straight"
    assert ddpm_train(*ARGS, "--steps", 10, "--data-dir", fake_fashion, "--out", straight).returncode == 0
    assert load_run_or_file(resumed)[1]["step"] == 10
    assert max_difference(straight, resumed) < TOLERANCE


def test_a_batch_that_does_not_split_is_refused(fake_fashion, tmp_path):
    r = ddpm_train(*ARGS, "--batch-size", 15, "--steps", 2, "--data-dir", fake_fashion,
                   "--out", tmp_path / "run", processes=2)
    assert r.returncode != 0
    assert "batch size 15 is the whole batch of all 2 processes" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bf16_autocast_in_the_training_step():
    config = get_preset("tiny")
    cpu = torch.device("cpu")
    accelerator = make_accelerator(cpu)
    model = UNet(config.model)
    dtypes = []
    model.conv_in.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    optimizer = torch.optim.AdamW(model.parameters())
    for precision in ("bf16", "fp32"):
        loss = train_step(model, make_schedule("linear", 100), optimizer,
                          [(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))],
                          accelerator=accelerator, generator=torch.Generator().manual_seed(0),
                          config=config, device=cpu, lr=1e-3, precision=precision).loss
        assert loss > 0
    assert dtypes == [torch.bfloat16, torch.float32]
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay float32"


@pytest.mark.parametrize("shape, at_quarter", [("cosine", (1 + 0.5 ** 0.5) / 2), ("linear", 0.75)])
def test_decay_over_minutes_follows_the_time_budget(shape, at_quarter):
    c = get_preset("tiny")
    c = dataclasses.replace(c, train=dataclasses.replace(c.train, steps=None, minutes=10.0,
                                                         lr_schedule=shape, warmup_steps=0))
    lr = c.train.lr
    assert learning_rate(c, 500, 0.0) == pytest.approx(lr)
    assert learning_rate(c, 500, 0.25) == pytest.approx(lr * at_quarter)  # cos(pi/4) = 2^-1/2
    assert learning_rate(c, 500, 0.5) == pytest.approx(lr / 2)
    assert learning_rate(c, 500, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(c, 500, 1.3) == pytest.approx(0.0, abs=1e-12)  # past the budget: 0
    with pytest.raises(ValueError, match=f"the {shape} learning-rate schedule needs steps, or"):
        learning_rate(c, 500)


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_decay_over_steps_starts_after_the_warm_up(shape):
    c = get_preset("tiny")
    c = dataclasses.replace(c, train=dataclasses.replace(c.train, steps=110, lr_schedule=shape,
                                                         warmup_steps=10))
    lr = c.train.lr
    assert learning_rate(c, 4) == pytest.approx(lr / 2)  # warm-up: (4 + 1) / 10
    assert learning_rate(c, 10) == pytest.approx(lr)
    assert learning_rate(c, 60) == pytest.approx(lr / 2)  # half-way through the 100 decay steps
    assert learning_rate(c, 110) == pytest.approx(0.0, abs=1e-12)
    constant = dataclasses.replace(c, train=dataclasses.replace(c.train, lr_schedule="constant"))
    assert learning_rate(constant, 60) == learning_rate(constant, 109) == lr


def test_resume_config_keeps_a_two_process_run_trainable(two_process_run):
    config = resume_config(two_process_run[0], steps=8)
    assert config.train.steps == 8 and config.train.batch_size == 16


def test_fp16_on_a_cpu_is_refused_before_launching(fake_fashion, tmp_path):
    r = ddpm_train(*ARGS, "--precision", "fp16", "--steps", 2, "--data-dir", fake_fashion,
                   "--out", tmp_path / "run", "--device", "cpu", processes=2)
    assert r.returncode == 2 and "launching" not in r.stdout
    assert "precision fp16 needs a CUDA device" in r.stderr and "Traceback" not in r.stderr
