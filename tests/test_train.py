"""train.py, step.py and monitor.py: the training loop, its step and EMA, resume, the Python API,
the forecast; and the faults training meets (resuming to fewer steps, a run trained twice, NaN, a
full disk, signals, SIGKILL mid-write), which lose no training."""

import dataclasses
import fcntl
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm import get_preset, train
from ddpm.checkpoint import list_checkpoints, load_checkpoint, load_run_or_file
from ddpm.diffusion import q_sample
from ddpm.models import UNet, UNetConfig
from ddpm.schedules import make_schedule
from ddpm.step import EMA
from ddpm.train import resume_config

from conftest import another_thread_count, cli, ddpm_in_process, snapshot, tiny_config


def test_tiny_model_overfits_one_batch():
    """Same x0, t and noise every step: a working model + optimiser drives the loss far down."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(8,), dropout=0.0, norm_groups=4))
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 16, 16, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = q_sample(schedule, x0, t, eps)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = ((model(x_t, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9  # the zero-initialised output predicts 0: loss = E[eps^2] ~ 1
    assert losses[-1] < losses[0] / 100  # about 1/500 after 80 steps when the model works


def test_ema_follows_the_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(5):
        ema.update(model)
    # after n updates towards a constant 1 from 0: 1 - decay^n
    assert ema.model.weight.item() == pytest.approx(1 - 0.9**5)


def _weights(run_dir):
    _, state = load_run_or_file(run_dir)
    return state


def test_resume_is_bit_identical(tmp_path, fake_fashion):
    n = 8
    full = train(tiny_config(fake_fashion, steps=n, checkpoint_every=0), tmp_path / "full",
                 progress=False, final_grid=False)
    train(tiny_config(fake_fashion, steps=n // 2, checkpoint_every=0), tmp_path / "split",
          progress=False, final_grid=False)
    resumed = train(resume_config(tmp_path / "split", steps=n), tmp_path / "split", resume=True,
                    progress=False, final_grid=False)
    assert full.step == resumed.step == n
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    # the metrics log holds each step once, even across the resume
    steps = [json.loads(s)["step"] for s in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == n


def test_train_leaves_torch_global_state_as_it_found_it(tmp_path, fake_fashion):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(tiny_config(fake_fashion, steps=2, threads=another_thread_count()), tmp_path / "run",
          progress=False, final_grid=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected), "train() moved the global random state"


def test_train_fits_the_model_to_the_data_from_python(tmp_path, fake_fashion):
    """The Python API resolves the config as the command line does: the preset's 28 px U-Net
    (here with attention at its 7 px level) trains on 32 px images with its attention kept at
    the same level."""
    c = get_preset("fashion-cpu")
    config = dataclasses.replace(
        c, data=dataclasses.replace(c.data, data_dir=str(fake_fashion), image_size=32),
        model=dataclasses.replace(c.model, attention_resolutions=(7,)),
        train=dataclasses.replace(c.train, steps=1, batch_size=8, sample_every=0, fid_every=0))
    train(config, tmp_path / "run", progress=False, final_grid=False)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["model"]["image_size"] == 32 and saved["model"]["attention_resolutions"] == [8]


def test_sampling_steps_beyond_T_are_refused_before_training(tmp_path, fake_fashion):
    config = tiny_config(fake_fashion, steps=2, sample_steps=500)  # tiny preset: T = 100
    with pytest.raises(ValueError, match="train.sample_steps is 500 but must be between 1 and T = 100"):
        train(config, tmp_path / "run", progress=False, final_grid=False)
    assert not (tmp_path / "run").exists(), "nothing may be written before the check"


def test_the_sync_free_step_equals_a_straightforward_one(fake_fashion):
    """train_step decides on the device (fused AdamW's found_inf, a masked EMA, on-device
    counters) what a plain loop decides on the host: with the same batches, noise and a NaN
    batch in the middle, the weights, the EMA and the optimiser's state come out equal."""
    import copy

    from ddpm.data import ImageData
    from ddpm.diffusion import draw_t_eps, training_loss
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    config = tiny_config(fake_fashion)  # dropout 0.1: the global RNG is reseeded for each
    # fp32, as the plain loop computes (auto would be bf16 autocast on a CPU with bf16 hardware)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision="fp32"))
    cpu = torch.device("cpu")
    data = ImageData(torch.zeros(32, 1, 28, 28, dtype=torch.uint8), torch.zeros(32, dtype=torch.long), "x")
    run = build_training(config, make_accelerator(cpu), cpu, lambda: data)
    net = copy.deepcopy(run.net)
    ema = copy.deepcopy(run.net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=config.train.lr, betas=config.train.adam_betas,
                            weight_decay=config.train.weight_decay, fused=True)
    noise = torch.Generator().manual_seed(7)
    run.noise_generator.manual_seed(7)
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, 1, 28, 28, generator=g) * 2 - 1 for _ in range(6)]
    batches[2][0, 0, 0, 0] = float("nan")  # step 3: a non-finite loss
    labels = torch.zeros(16, dtype=torch.long)
    updates = 0
    for i, x0 in enumerate(batches):
        torch.manual_seed(100 + i)
        stats = run.update([(x0, labels)], lr=1e-3)
        # the plain loop, on the host
        torch.manual_seed(100 + i)
        for group in opt.param_groups:
            group["lr"] = 1e-3
        opt.zero_grad(set_to_none=True)
        t, eps = draw_t_eps(run.schedule, x0.shape, noise)
        loss = training_loss(net, run.schedule, x0, t=t, eps=eps)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), config.train.grad_clip)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
        assert bool(stats.updated) == finite and bool(stats.faulty) == (not finite)
        if finite:
            opt.step()
            decay = min(config.train.ema_decay, (1 + updates) / (10 + updates))
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()],
                                 1.0 - decay)
            updates += 1
    assert updates == 5 and run.ema.num_updates == 5
    for mine, theirs in ((run.net, net), (run.ema.model, ema)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    for a, b in zip(run.optimizer.state.values(), opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_compile_that_fails_falls_back_to_eager_with_one_warning(fake_fashion, monkeypatch):
    """--compile's first step compiles; if that fails (no C compiler, an unsupported op), the
    step runs uncompiled from the same random state: the weights equal an uncompiled run's."""
    from ddpm.data import ImageData
    from ddpm.runtime import make_accelerator
    from ddpm.train import build_training

    class FailsToCompile(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("InductorError: no working C compiler found\nmore detail")

    cpu = torch.device("cpu")
    data = ImageData(torch.zeros(32, 1, 28, 28, dtype=torch.uint8), torch.zeros(32, dtype=torch.long), "x")
    runs = {}
    monkeypatch.setattr(torch, "compile", FailsToCompile)
    for compile_ in (True, False):
        config = tiny_config(fake_fashion, compile=compile_)
        runs[compile_] = build_training(config, make_accelerator(cpu), cpu, lambda: data)
        if compile_:
            with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError: "
                                                 r"InductorError: no working C compiler found\); "
                                                 r"training goes on without it"):
                runs[compile_].update(runs[compile_].next_batches(), 1e-3)
            assert runs[compile_].model is not None and runs[compile_].eager is None
            runs[compile_].update(runs[compile_].next_batches(), 1e-3)  # no second warning
        else:
            for _ in range(2):
                runs[compile_].update(runs[compile_].next_batches(), 1e-3)
    for a, b in zip(runs[True].net.parameters(), runs[False].net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_random_state_from_another_kind_of_device_gives_a_warning_not_a_crash(tmp_path,
                                                                                  fake_fashion):
    """--device may change on resume; a GPU's generator states do not fit a CPU's (here: a state
    of the wrong size stands for one), so the run goes on from new seeds and says so."""
    train(tiny_config(fake_fashion, steps=2), tmp_path / "run", progress=False, final_grid=False)
    path = list_checkpoints(tmp_path / "run")[0]
    state = load_checkpoint(path)
    state["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state's size
    torch.save(state, path)
    with pytest.warns(UserWarning, match="saved on another kind of device than cpu"):
        result = train(resume_config(tmp_path / "run", steps=3), tmp_path / "run", resume=True,
                       progress=False, final_grid=False)
    assert result.step == 3


def test_a_run_forecasts_its_length_after_its_first_steps(fake_fashion, tmp_path, monkeypatch):
    """After FORECAST_STEPS timed steps the run says how long it will take: the steps left at
    the rate measured, and the network evaluations its previews, FID and final grid will spend
    at the rate of one evaluation timed then (here fixed at 0.3 s, so the sampling part is exact)."""
    from ddpm.monitor import FORECAST_STEPS
    from ddpm.pipeline import Pipeline

    from conftest import ddpm_in_process

    monkeypatch.setattr(Pipeline, "seconds_per_evaluation", lambda self, **kw: 0.3)
    steps, every, n, sample_steps = FORECAST_STEPS + 11, 20, 4, 5
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps", steps,
                        "--sample-every", every, "--sample-n", n, "--sample-steps", sample_steps,
                        "--precision", "fp32", "--no-progress", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith(f"{FORECAST_STEPS} steps at")]
    assert f"the run's {steps} steps should take about" in line and "in all on this machine" in line
    # due after step 51 of 61: the preview at step 60 (n images x 5 steps) and the final grid
    # (n images x the run's own sampling steps), at 0.3 s an evaluation
    tiny_sampling_steps = get_preset("tiny").sample.num_sample_steps
    expected = (n * sample_steps + n * tiny_sampling_steps) * 0.3
    assert f"{expected / 60:.1f} sampling preview grids, FID and the final grid" in line
    short = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--steps",
                            FORECAST_STEPS, "--sample-every", 0, "--no-progress", "--out",
                            tmp_path / "short")
    assert short.returncode == 0 and "should take about" not in short.stdout, "nothing left to say"


# --- resuming to fewer steps, and a run trained twice ---------------------------------------------


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


def test_a_run_being_trained_cannot_be_trained_twice(world):
    before = snapshot(world / "run")
    with open(world / "run/.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a training process holds it
        code, _, err = cli("train", "--resume", world / "run", "--steps", 4, "--no-progress")
    assert code == 2 and "is being trained by another process" in err
    assert snapshot(world / "run") == before


# --- NaN, full disk -------------------------------------------------------------------------------


def plain_tiny_config(data_dir, **train_overrides):
    """The tiny preset on ``data_dir``, without conftest.tiny_config's dropout and flips."""
    c = get_preset("tiny")
    return dataclasses.replace(
        c, data=dataclasses.replace(c.data, data_dir=str(data_dir)),
        train=dataclasses.replace(c.train, **{"sample_every": 0, **train_overrides}))


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])


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
    reference = train(plain_tiny_config(fake_fashion, steps=4, checkpoint_every=2), tmp_path / "ref",
                      progress=False, final_grid=False)
    nan_at({5})
    with pytest.raises(FloatingPointError) as err:
        train(plain_tiny_config(fake_fashion, steps=6, checkpoint_every=2), tmp_path / "run",
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


# --- signals --------------------------------------------------------------------------------------


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
    reference = ddpm_in_process("train", *args, "--out", tmp_path / "ref")  # the same weights
    assert reference.returncode == 0, reference.stderr                     # as in a process
    run, rng, kills, mid_write, torn = tmp_path / "run", random.Random(0), 0, 0, set()
    folder = run / "checkpoints"
    for round_ in range(4):
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
    r = ddpm_in_process("train", "--resume", run, "--steps", steps, "--threads", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not [f for f in folder.iterdir() if f.name.endswith(".tmp")], "partial writes remain"
    final, expected = load_run_or_file(run)[1], load_run_or_file(tmp_path / "ref")[1]
    assert final["step"] == expected["step"] == steps
    assert same_weights(final, expected)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == steps, "each step once, in order"
    # a step is missing only where its line was cut off after its checkpoint was written
    assert set(range(1, steps + 1)) - set(logged) <= torn
