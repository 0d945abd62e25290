"""What the training loop watches and says as it goes: when to stop (steps, minutes, SIGINT and
SIGTERM, non-finite losses), the clock of training seconds, the forecast of the run's length and
the images/s of each log window."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .checkpoint import TrainState, list_checkpoints
from .rundir import RunOutputs
from .step import StepStats

if TYPE_CHECKING:  # (accelerate is imported where a process is made: runtime.make_accelerator)
    from accelerate import Accelerator

# With --on-nan skip, this many non-finite steps in a row stop the run anyway: the weights do not
# change on a skipped step, so a fault that persists this long will not pass by skipping.
MAX_SKIPS_IN_A_ROW = 100
# The run's expected length is said after this many steps (timed after the first).
FORECAST_STEPS = 50


class NonFinite:
    """Steps whose loss (or gradient) was not finite, counted on the device as the steps go, and
    read by :meth:`check` only where the host needs the answer: before a log line, a preview,
    an FID measurement or a checkpoint, and at the end. Such a step never changed the weights,
    the EMA or the optimiser (``train_step``); what is decided here is whether to go on: stop
    (--on-nan stop) at the first, or count them and stop after MAX_SKIPS_IN_A_ROW in a row."""

    def __init__(self, device: torch.device, initial: int):
        def zero(dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)
        self.count, self.run, self.longest_run = zero(), zero(), zero()
        self.first_step, self.first_loss = zero() - 1, zero(torch.float32)
        self.last_step, self.last_loss = zero() - 1, zero(torch.float32)
        self.seen, self.initial = 0, initial  # read so far; skipped before this invocation

    def add(self, stats: StepStats, step: int) -> None:
        faulty = stats.faulty
        self.count += faulty
        self.run = (self.run + 1) * faulty  # the non-finite steps in a row, ending here
        self.longest_run = torch.maximum(self.longest_run, self.run)
        first = faulty & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, stats.loss, self.first_loss)
        self.last_step = torch.where(faulty, step, self.last_step)
        self.last_loss = torch.where(faulty, stats.loss, self.last_loss)

    def check(self, state: TrainState, run_dir: Path, bar: tqdm) -> None:
        """Stop or go on after the steps since the last check (waits for the device)."""
        count = int(self.count)
        if count == self.seen:
            return
        tc = state.config.train
        newest = list_checkpoints(run_dir)
        kept = (f"the newest checkpoint {newest[0]} is intact" if newest
                else "no checkpoint was written yet")
        if tc.on_nan == "stop":
            raise FloatingPointError(
                f"the loss became {float(self.first_loss)} at step {int(self.first_step)}; the "
                f"weights were not updated and {kept}. Lower the learning rate (now {tc.lr:g}), "
                f"use --precision fp32, or skip such steps with --on-nan skip")
        state.skipped_steps = self.initial + count
        if int(self.longest_run) >= MAX_SKIPS_IN_A_ROW:
            raise FloatingPointError(
                f"{int(self.longest_run)} steps in a row had a non-finite loss (the last at step "
                f"{int(self.last_step)}); skipping does not help, so training stops and {kept}. "
                f"Lower the learning rate (now {tc.lr:g}) or check the data")
        new, self.seen = count - self.seen, count
        what = (f"step {int(self.last_step)}: the loss is {float(self.last_loss)}; update skipped"
                if new == 1 else f"{new} updates skipped for a non-finite loss, the last at step "
                                 f"{int(self.last_step)}")
        bar.write(f"{what} ({state.skipped_steps} so far)", file=sys.stderr)


class StopRule:
    """When training ends: at ``steps`` in total, after ``minutes`` of this invocation, or at a
    signal. Every process must stop at the same step (or one would wait forever for the others'
    gradients) and use the same learning rate, so the processes agree on both."""

    def __init__(self, steps: int | None, minutes: float | None, accelerator: Accelerator):
        self.steps, self.minutes = steps, minutes
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.device = accelerator.device
        self.start = time.perf_counter()

    def time_fraction(self) -> float | None:
        """The share of ``minutes`` spent (None without a time budget)."""
        if self.minutes is None:
            return None
        return (time.perf_counter() - self.start) / (60.0 * self.minutes)

    def minutes_left(self) -> float | None:
        if self.minutes is None:
            return None
        return max(0.0, self.minutes - (time.perf_counter() - self.start) / 60)

    def check(self, signals: StopRequest) -> tuple[float | None, bool]:
        """(the share of minutes spent as the main process sees it, whether a signal asked any
        process to stop)."""
        fraction, stopping = self.time_fraction(), signals.signum is not None
        if self.world > 1:  # one collective: the main process's share (the others give 0), the flag
            both = torch.tensor([fraction if fraction is not None and self.main else 0.0,
                                 float(stopping)], device=self.device)
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
            fraction = None if fraction is None else float(both[0])
            stopping = bool(both[1] > 0)
        return fraction, stopping

    def done(self, step: int, fraction: float | None) -> bool:
        if self.steps is not None and step >= self.steps:
            return True
        return fraction is not None and fraction >= 1.0


class TrainingClock:
    """Seconds of training: wall time less what side outputs (grids, FID, checkpoints) take,
    which run inside :meth:`paused`. Images/s and the forecast both read it."""

    def __init__(self) -> None:
        self.start, self.paused_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - begin

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused_s


class Forecast:
    """How long the run will take on this machine, said once, :data:`FORECAST_STEPS` steps
    after the first step of this invocation (which builds kernels, and is not counted): the
    steps left at the rate of those steps, and the sampling that the preview grids, FID
    measurements and final grid still due will do (``RunOutputs.sampling_seconds``)."""

    def __init__(self, first_step: int, last_step: int | None, clock: TrainingClock):
        self.first, self.last, self.clock, self.start = first_step + 1, last_step, clock, 0.0

    def due(self, step: int) -> bool:
        """Called after each step; True at the step whose forecast is to be said."""
        if step == self.first:
            self.start = self.clock.seconds()
        return (self.last is not None and step == self.first + FORECAST_STEPS
                and self.last > step)

    def say(self, state: TrainState, outputs: RunOutputs, final_grid: bool) -> str:
        assert self.last is not None  # due() is True only for a run with a last step
        step_s = (self.clock.seconds() - self.start) / FORECAST_STEPS
        training_s = (self.last - state.step) * step_s
        sampling_s = outputs.sampling_seconds(state.step, self.last, final_grid=final_grid)
        left = training_s + sampling_s
        return (f"{FORECAST_STEPS} steps at {step_s:.3f} s each: the run's {self.last:,} steps "
                f"should take about {(state.elapsed_s + left) / 60:.1f} min in all on this machine, "
                f"{left / 60:.1f} min from now ({training_s / 60:.1f} training, "
                f"{sampling_s / 60:.1f} sampling preview grids, FID and the final grid)")


class LogWindow:
    """Images per second of training since the last metrics line."""

    def __init__(self, images_per_step: int, clock: TrainingClock):
        self.images_per_step, self.images, self.clock = images_per_step, 0, clock
        self.start = clock.seconds()

    def add(self) -> None:
        self.images += self.images_per_step

    def close(self) -> float:
        """Images per second over the window; starts the next one."""
        now = self.clock.seconds()
        rate = self.images / max(now - self.start, 1e-9)
        self.images, self.start = 0, now
        return rate


class StopRequest:
    """SIGINT and SIGTERM while training: remembered, so the loop finishes its step, writes a
    checkpoint and returns (a scheduler's SIGTERM before a kill, Ctrl-C at a terminal). The same
    signal a second time interrupts at once; the other one is ignored, since a launcher that
    got Ctrl-C passes it on to its processes as SIGTERM."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signum:
            self.__exit__()
            raise KeyboardInterrupt
        if self.signum is not None:
            return
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                   f"(send it again to stop at once, without saving)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
