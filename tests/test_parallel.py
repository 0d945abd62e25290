"""parallel.py and the batches of Pipeline.generate: each batch seeded on its own, so that worker
processes give the images one process gives; how many workers ``auto`` takes; a worker's error,
death or Ctrl-C ends the call cleanly, with no worker left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddpm import parallel
from ddpm.parallel import WorkerError, resolve_workers, run_batches
from ddpm.pipeline import batch_seed, load_pipeline

from conftest import ddpm_in_process

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def pipe(trained_run):
    return load_pipeline(trained_run[0])


def _no_workers_left() -> bool:
    return not [p for p in multiprocessing.active_children() if p.name.startswith("ddpm-sampling")]


# --- the images: the same in any number of processes ---------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("dpm++", 4), ("ddpm", 5)])  # one draws noise each step
def test_workers_make_the_images_one_process_makes(pipe, sampler, steps):
    settings = dict(seed=5, batch_size=2, sampler=sampler, num_sample_steps=steps)
    one = pipe.generate(7, workers=1, **settings)
    assert pipe.last_workers == 1 and pipe.last_evaluations == steps
    for workers in (2, 3):
        split = pipe.generate(7, workers=workers, **settings)
        assert pipe.last_workers == workers
        assert pipe.last_evaluations == steps, "every worker's network calls are counted"
        torch.testing.assert_close(split, one, atol=1e-5, rtol=0)
    assert not torch.allclose(pipe.generate(7, workers=2, **{**settings, "seed": 6}), one, atol=0.1)
    assert _no_workers_left()


def test_each_batch_draws_from_its_own_seed_and_the_first_from_the_seed_itself(pipe):
    settings = dict(batch_size=3, sampler="ddpm", num_sample_steps=4)
    six = pipe.generate(6, seed=11, **settings)
    torch.testing.assert_close(six[:3], pipe.generate(3, seed=11, **settings), atol=0, rtol=0)
    torch.testing.assert_close(six[3:], pipe.generate(3, seed=batch_seed(11, 1), **settings),
                               atol=0, rtol=0)
    assert not torch.allclose(six[:3], six[3:], atol=0.1), "two batches, two draws of noise"


def test_batch_seeds_are_distinct_63_bit_numbers():
    seeds = {batch_seed(s, k) for s in range(100) for k in range(100)}
    assert len(seeds) == 100 * 100, "no two (seed, batch) pairs share their noise"
    assert all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(0, 1) != batch_seed(1, 0) == 1  # not seed + index
    assert batch_seed(2**63 - 2, 5) == batch_seed(2**63 - 2, 5)  # a function of its arguments


def test_a_batch_size_below_one_is_refused(pipe):
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"batch_size must be a whole number >= 1, got {bad}"):
            pipe.generate(4, batch_size=bad, num_sample_steps=2)


def test_a_step_callback_needs_one_process(pipe):
    with pytest.raises(ValueError, match="a step callback runs in this process; sample with one "
                                         "worker, not 2"):
        pipe.generate(4, batch_size=2, workers=2, callback=lambda *a: None, num_sample_steps=2)


# --- how many: auto, and numbers refused with their reason -----------------------------------------


def test_auto_is_one_worker_per_thread_and_core_and_batch(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    assert resolve_workers("auto", 10, CPU) == 3
    assert resolve_workers("auto", 2, CPU) == 2
    assert resolve_workers("auto", 1, CPU) == 1
    monkeypatch.setattr(parallel, "cores", lambda: 2)  # taskset -c 0,1
    assert resolve_workers("auto", 10, CPU) == 2
    assert resolve_workers("auto", 10, CUDA) == 1
    assert resolve_workers("auto", 10, CPU, compiled=True) == 1
    monkeypatch.setattr(parallel, "_daemonic", lambda: True)
    assert resolve_workers("auto", 10, CPU) == 1
    monkeypatch.setattr(parallel, "_daemonic", lambda: False)
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    assert resolve_workers("auto", 10, CPU) == 1


def test_a_number_of_workers_is_taken_or_refused_with_the_reason(monkeypatch):
    assert resolve_workers(4, 10, CPU) == 4
    assert resolve_workers(5, 3, CPU) == 3, "no worker without a batch"
    assert resolve_workers(1, 10, CUDA) == 1
    with pytest.raises(ValueError, match="on cuda one process drives the device"):
        resolve_workers(2, 10, CUDA)
    with pytest.raises(ValueError, match="and a compiled model do not mix"):
        resolve_workers(2, 10, CPU, compiled=True)
    for bad in (0, -1, "two", True):
        with pytest.raises(ValueError, match=f"whole number >= 1 or 'auto', got {bad!r}"):
            resolve_workers(bad, 10, CPU)
    monkeypatch.setattr(parallel, "_daemonic", lambda: True)
    with pytest.raises(ValueError, match="a daemonic one"):
        resolve_workers(2, 10, CPU)
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    with pytest.raises(ValueError, match="need fork"):
        resolve_workers(2, 10, CPU)


# --- run_batches: results in order, progress, and every way a worker can fail ---------------------


def _work(index, progress):
    for _ in range(index + 1):
        progress(1)
    return torch.full((2,), float(index))


def test_run_batches_returns_every_batch_in_order_with_its_progress():
    for workers in (1, 2, 3):
        counted = []
        out = run_batches(_work, 5, workers, counted.append)
        assert [t.tolist() for t in out] == [[float(i)] * 2 for i in range(5)]
        assert sum(counted) == 1 + 2 + 3 + 4 + 5
    assert _no_workers_left()


def _tiny(index, progress):
    return torch.tensor([index])


def test_thousands_of_batches_do_not_block_on_a_full_pipe():
    out = run_batches(_tiny, 20_000, 2, lambda m: None)
    assert torch.equal(torch.cat(out), torch.arange(20_000))


def test_workers_share_the_callers_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        seen = run_batches(lambda i, p: torch.tensor([torch.get_num_threads()]), 4, 2, lambda m: None)
        assert {t.item() for t in seen} == {2}
        seen = run_batches(lambda i, p: torch.tensor([torch.get_num_threads()]), 6, 3, lambda m: None)
        assert {t.item() for t in seen} == {1}
    finally:
        torch.set_num_threads(before)


def _fails_on_3(index, progress):
    if index == 3:
        raise ValueError("batch 3 is bad")
    return torch.zeros(1)


class _Unpicklable(Exception):
    def __init__(self, a, b):  # pickle cannot make it again from its args
        super().__init__(f"{a} and {b}")


def _fails_oddly(index, progress):
    raise _Unpicklable("this", "that")


def _dies_on_1(index, progress):
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.zeros(1)


def test_a_worker_error_is_raised_here_as_itself():
    with pytest.raises(ValueError, match="batch 3 is bad"):
        run_batches(_fails_on_3, 6, 2, lambda m: None)
    with pytest.raises(WorkerError, match="a sampling worker process failed: _Unpicklable: this "
                                          "and that"):
        run_batches(_fails_oddly, 2, 2, lambda m: None)
    assert _no_workers_left()


def test_a_killed_worker_is_named_with_what_to_do():
    with pytest.raises(WorkerError, match=r"was killed by signal 9 \(SIGKILL\) with \d batch"
                                          ".*lower --batch-size or --workers"):
        run_batches(_dies_on_1, 4, 2, lambda m: None)
    assert _no_workers_left()


def test_ctrl_c_in_the_caller_stops_every_worker():
    def interrupted(m):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batches(_work, 8, 2, interrupted)
    assert _no_workers_left()


# --- the command line -----------------------------------------------------------------------------


def test_sample_with_workers_writes_the_images_of_one_process(trained_run, tmp_path):
    outs = {}
    for workers in ("1", "3"):
        out = tmp_path / f"w{workers}.npz"
        r = ddpm_in_process("sample", trained_run[0], "--n", 5, "--batch-size", 2, "--steps", 3,
                            "--sampler", "ddpm", "--workers", workers, "--out", out, "--no-progress")
        assert r.returncode == 0, r.stderr
        assert ("3 processes" in r.stdout) == (workers == "3"), r.stdout
        outs[workers] = np.load(out)["arr_0"]
    assert np.array_equal(outs["1"], outs["3"])


def _sampling(run, out, *, group: bool) -> tuple[subprocess.Popen, list[int]]:
    """'ddpm sample' with two workers, started and waited for until both workers run."""
    # (SIGINT as a terminal leaves it: pytest-xdist's workers ignore it, and a child would inherit
    # that, so that Python installed no KeyboardInterrupt at all)
    p = subprocess.Popen([sys.executable, "-m", "ddpm", "sample", str(run), "--n", "100000",
                          "--batch-size", "16", "--steps", "50", "--workers", "2", "--out", str(out),
                          "--no-progress"], text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=group,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                  text=True).stdout.split()
        if len(children) == 2:
            time.sleep(1)  # well into their batches
            return p, [int(c) for c in children]
        time.sleep(0.2)
    p.kill()
    raise AssertionError(f"no two workers came: {p.communicate()}")


def _gone(pids, seconds=20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _state(pid) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((line for line in f if line.startswith("State:")), "").lower()
    except OSError:
        return ""


@pytest.mark.skipif(not os.path.exists("/proc"), reason="reads /proc (Linux)")
def test_ctrl_c_at_a_terminal_stops_the_command_and_its_workers_and_writes_nothing(trained_run,
                                                                                   tmp_path):
    p, children = _sampling(trained_run[0], tmp_path / "s.npz", group=True)
    try:
        os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and err.strip() == "ddpm sample: interrupted", err
        assert _gone(children) and not (tmp_path / "s.npz").exists()
    finally:
        _kill(p, children)  # whatever failed, nothing samples on beside the other tests


@pytest.mark.skipif(not os.path.exists("/proc"), reason="reads /proc (Linux)")
def test_workers_end_themselves_when_the_command_is_killed(trained_run, tmp_path):
    p, children = _sampling(trained_run[0], tmp_path / "s.npz", group=False)
    try:
        p.kill()  # SIGKILL to the command alone: nothing of it runs to stop the workers
        p.communicate(timeout=60)
        assert _gone(children), "the workers sampled on for no one"
        assert not (tmp_path / "s.npz").exists()
    finally:
        _kill(p, children)


def _kill(p: subprocess.Popen, children: list[int]) -> None:
    for pid in (p.pid, *children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.communicate()


def test_a_killed_worker_ends_the_command_in_one_line(trained_run, tmp_path, monkeypatch):
    """The machine's fault (memory, most likely), not the user's: exit 1, one line, no file."""
    import ddpm.cli.sample

    def killed(*args, **kwargs):
        raise WorkerError("a sampling worker process was killed by signal 9 (SIGKILL) with 3 "
                          "batches still to do; if the machine ran out of memory, lower "
                          "--batch-size or --workers")

    monkeypatch.setattr(ddpm.cli.sample, "generate", killed)
    r = ddpm_in_process("sample", trained_run[0], "--n", 8, "--batch-size", 2, "--workers", 2,
                        "--out", tmp_path / "s.npz", "--no-progress")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("ddpm sample: error: a sampling worker process was killed by signal 9")
    assert not (tmp_path / "s.npz").exists()
