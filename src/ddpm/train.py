"""Training: one ``train_step``, the loop that calls it, the EMA, and the set-up they share.

Everything random comes from two generators saved in every checkpoint (data order and flips;
timesteps and noise) plus torch's global RNG (dropout), so a resumed run makes exactly the updates
the uninterrupted run would have made (``checkpoint.TrainState``).

Nothing is lost to a fault: SIGINT or SIGTERM ends the current step and writes a checkpoint of
it; checkpoints are written atomically (``checkpoint.py``), so SIGKILL at any moment leaves the
previous one loadable; a non-finite loss never reaches the weights; a checkpoint that cannot be
written (a full disk) keeps the previous one and says so.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (TrainState, check_writable, checkpoint_config, list_checkpoints,
                         load_run_or_file, remove_partial_writes)
from .config import RunConfig, SettingError, resolve, resumed
from .data import BatchStream, ImageData, StreamingImages, open_dataset
from .diffusion import draw_t_eps, training_loss
from .metrics import check_image_count, resolve_extractor
from .models import UNet
from .pipeline import build_schedule
from .rundir import RunOutputs, repair_config_file, run_lock, write_config
from .runtime import (autocast, gradient_scaler, make_accelerator, resolve_device,
                      torch_state_kept, training_precision)
from .schedules import NoiseSchedule

# With --on-nan skip, this many non-finite steps in a row stop the run anyway: the weights do not
# change on a skipped step, so a fault that persists this long will not pass by skipping.
MAX_SKIPS_IN_A_ROW = 100


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging), sampled from.

    Its count of updates lives on the model's device, so that an update masked by a skipped
    step (``update(model, mask)``) needs no answer from the device."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        device = next(model.parameters()).device
        self._updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def num_updates(self) -> int:
        return int(self._updates)

    def current_decay(self) -> torch.Tensor:
        """The decay of the next update, float64 on the device."""
        # (a fill, not torch.tensor(): a copy from the host would wait for the device)
        decay = torch.full((), self.decay, dtype=torch.float64, device=self._updates.device)
        if not self.warmup:
            return decay
        # Short memory while the weights move fast early on: (1 + n) / (10 + n).
        n = self._updates.double()
        return torch.minimum(decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, mask: torch.Tensor | None = None) -> None:
        """One step towards ``model``'s weights; none where ``mask`` (a bool on the device:
        whether the step updated the weights) is False."""
        weight = 1.0 - self.current_decay()  # float64, rounded to float32 once, as the weights are
        if mask is not None:
            weight = weight * mask
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # ema <- ema + (1 - decay) (param - ema)
        torch._foreach_lerp_(ema_params, params, weight.float())
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b if mask is None else torch.where(mask, b, ema_b))
        self._updates += 1 if mask is None else mask.long()

    def state_dict(self) -> dict[str, Any]:
        """The averaging's own state (the averaged weights are ``self.model.state_dict()``)."""
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._updates.fill_(int(state["num_updates"]))


def learning_rate(config: RunConfig, step: int, time_fraction: float | None = None) -> float:
    """Linear warm-up over ``warmup_steps``, then constant (Ho et al. 2020) or a cosine decay
    to zero (Loshchilov & Hutter 2017), which helps short runs end sharper. The cosine runs over
    ``steps``, or, for a run limited by minutes only, over ``time_fraction`` of the budget."""
    tc = config.train
    lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else tc.lr
    if tc.lr_schedule == "cosine" and step >= tc.warmup_steps:
        if tc.steps is not None:
            progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
        elif time_fraction is not None:
            progress = time_fraction
        else:
            raise ValueError("the cosine learning-rate schedule needs steps, or minutes and the "
                             "fraction of them spent")
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


class StepStats(NamedTuple):
    """One step's figures, as tensors on the device: reading one waits for the device, so the
    loop reads them only when it logs or saves."""

    loss: torch.Tensor  # mean over the whole batch (all processes)
    grad_norm: torch.Tensor  # before clipping
    updated: torch.Tensor  # bool: False when the weights were left as they were
    faulty: torch.Tensor  # bool: a non-finite loss (or, without fp16's scaler, gradient)


def train_step(
    model: nn.Module,
    schedule: NoiseSchedule,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    accelerator: Accelerator,
    generator: torch.Generator,
    config: RunConfig,
    device: torch.device,
    lr: float,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> StepStats:
    """One optimiser update over ``batches`` of (images, labels) (whole batches of every process;
    gradient accumulation when more than one). A non-finite loss or gradient leaves the weights
    and the optimiser's state as they were, decided on the device: the step never waits for it.
    Every process sees the same loss and gradients, so all of them skip together.

    Each process draws t and eps (and, for a class-conditional model, which labels to drop) for
    the whole batch from the same generator on the device and keeps its own rows, so N
    processes with B/N images each make the update one process makes with B.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    dc = config.diffusion
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    total = torch.zeros((), device=device)
    num_classes = config.model.num_classes
    for i, (x0, y) in enumerate(batches):
        t, eps = draw_t_eps(schedule, x0.shape, generator)
        rows = slice(rank * x0.shape[0] // world, (rank + 1) * x0.shape[0] // world)
        denoiser = model
        if num_classes:
            # Ho & Salimans 2022, Algorithm 1, line 3: c <- null with probability p_uncond.
            drop = torch.rand(x0.shape[0], generator=generator, device=generator.device)
            y = torch.where(drop < config.train.class_dropout, num_classes, y.to(drop.device))
            denoiser = functools.partial(model, y=y[rows].to(device))
        # Gradients are averaged across processes once per update, after the last micro-batch.
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with autocast(device, precision):
                x = x0[rows].to(device, memory_format=memory_format, non_blocking=True)
                loss = training_loss(denoiser, schedule, x, t=t[rows], eps=eps[rows],
                                     loss=dc.loss, prediction_type=dc.prediction_type,
                                     weighting=dc.loss_weighting, min_snr_gamma=dc.min_snr_gamma)
            scaled = loss / len(batches)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total = total + loss.detach().float() / len(batches)
    if world > 1:  # the loss of the whole batch, for the log and the check below
        total = accelerator.reduce(total.reshape(1), "mean")[0]
    if scaler is not None:
        scaler.unscale_(optimizer)  # the norm and the clip are of the true gradients
    params = [p for p in model.parameters()]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.grad_clip)
    updated = torch.isfinite(total) & torch.isfinite(grad_norm)
    if scaler is not None:
        # The scaler skips a step with non-finite gradients itself while lowering the scale,
        # which it must see, so it is called for those steps too; an overflow is routine there,
        # and only a non-finite loss counts as a fault.
        scaler.step(optimizer)
        scaler.update()
        faulty = ~torch.isfinite(total)
    else:
        _step_unless(optimizer, updated)
        faulty = ~updated
    return StepStats(total, grad_norm, updated, faulty)


def _step_unless(optimizer: torch.optim.Optimizer, updated: torch.Tensor) -> None:
    """``optimizer.step()``, a no-op where ``updated`` is False. A fused AdamW takes the answer
    as a tensor (its ``found_inf``, as for fp16's scaler) and skips the whole update on the
    device, its step count included; another optimiser waits for the device to answer."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~updated).float()
        optimizer.step()
    elif bool(updated):
        optimizer.step()


# --- the set-up ---------------------------------------------------------------------------------


@dataclass
class Training:
    """What a training process works with (:func:`build_training`); ``train`` and ``bench`` both
    run their steps through :meth:`next_batches` and :meth:`update`."""

    config: RunConfig
    accelerator: Accelerator
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, resolved
    schedule: NoiseSchedule  # on the CPU, for the samplers of the preview grids
    train_schedule: NoiseSchedule  # the same on the training device
    net: nn.Module  # the network whose weights are saved and averaged
    model: nn.Module  # what the step calls: net, wrapped for DDP and compiled when asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: EMA | None  # None on the processes that do not keep one
    data: ImageData | StreamingImages
    stream: BatchStream
    noise_generator: torch.Generator  # t and eps of every step
    eager: nn.Module | None = None  # with --compile: the model uncompiled, until compiling works

    def next_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of one optimiser step."""
        return [self.stream.next() for _ in range(self.config.train.grad_accum)]

    def update(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> StepStats:
        """One optimiser update (:func:`train_step`); the EMA follows an update that happened.
        With --compile, the first update compiles; if that fails, training goes on uncompiled
        from the same random state, with a one-line warning."""
        def step() -> StepStats:
            return train_step(self.model, self.train_schedule, self.optimizer, batches,
                              accelerator=self.accelerator, generator=self.noise_generator,
                              config=self.config, device=self.device, lr=lr,
                              precision=self.precision, scaler=self.scaler)

        if self.eager is None:
            stats = step()
        else:
            random_states = torch.get_rng_state(), self.noise_generator.get_state()
            try:
                stats = step()
            except Exception as exc:  # dynamo's and inductor's failures have many types
                torch.set_rng_state(random_states[0])
                self.noise_generator.set_state(random_states[1])
                self.model = self.eager
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {reason[:200]}); "
                              f"training goes on without it", stacklevel=2)
                stats = step()
            self.eager = None  # compiled, or given up: nothing more to try
        if self.ema is not None:
            self.ema.update(self.net, stats.updated)
        return stats

    def state(self) -> TrainState:
        """The state a checkpoint saves and a resume restores, at step 0."""
        classes = getattr(self.data, "classes", ())
        return TrainState(config=self.config, model=self.net, ema=self.ema,
                          optimizer=self.optimizer, scaler=self.scaler, stream=self.stream,
                          noise_generator=self.noise_generator, classes=classes,
                          num_processes=self.accelerator.num_processes)


def build_training(config: RunConfig, accelerator: Accelerator, device: torch.device,
                   open_data: Callable[[], ImageData | StreamingImages], *,
                   keep_ema: bool = True) -> Training:
    """Seed, network, AdamW (fused), DDP wrapper and compile, EMA, data stream and noise
    generator, in the order that makes a run's random draws the same every time.

    ``open_data`` is called after the network is made (so a decoding DataLoader cannot shift
    the network's initialisation); every process walks the same shuffled stream of whole batches
    and keeps its rows of each."""
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    precision, _ = training_precision(tc.precision, device)
    schedule = build_schedule(config)
    net = UNet(config.model).to(device)
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # One fused kernel for the whole update: PyTorch's fast path on CUDA, and measured neutral
    # on the CPU (BENCHMARKS.md); other devices keep torch's default.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                  weight_decay=tc.weight_decay, fused=fused or None)
    model = eager = accelerator.prepare_model(net, device_placement=False)
    if tc.compile:
        model = torch.compile(model)
    ema = EMA(net, tc.ema_decay, tc.ema_warmup) if keep_ema else None
    data = open_data()
    # A split that fits is held on the GPU, batches made there; otherwise made on the host in
    # pinned memory, for an asynchronous copy. (On a CPU both are the same thing.)
    on_device = device.type == "cuda" and isinstance(data, ImageData) and _fits(data, device)
    stream = BatchStream(data, tc.batch_size, hflip=config.data.hflip,
                         generator=torch.Generator(device if on_device else "cpu").manual_seed(tc.seed),
                         crop_size=config.data.image_size if config.data.crop == "random" else None,
                         workers=config.data.workers,
                         pin_memory=device.type == "cuda" and not on_device)
    noise_generator = torch.Generator(device).manual_seed(tc.seed + 1)
    return Training(config, accelerator, device, precision, schedule, schedule.to(device), net,
                    model, optimizer, gradient_scaler(precision, device), ema, data, stream,
                    noise_generator, eager if tc.compile else None)


def _fits(data: ImageData, device: torch.device) -> bool:
    """Whether a split's uint8 images take at most a quarter of the GPU's free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return data.images.numel() <= free // 4


def check_run(config: RunConfig, run_dir: str | os.PathLike, *, resume: bool,
              num_processes: int = 1) -> None:
    """Raise ValueError, before anything is written or launched, for a run that would fail
    later: the config's own rules (``RunConfig.validate``), the device and precision, a run
    already in ``run_dir``, a folder that cannot be written."""
    run_dir = Path(run_dir)
    if not resume and list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already holds a run; continue it with 'ddpm train --resume {run_dir}' "
            f"(train(..., resume=True) in Python) or choose a new folder"
        )
    config.validate(num_processes=num_processes)
    training_precision(config.train.precision, resolve_device(config.train.device))  # fp16 on a CPU
    if config.train.fid_every:  # found now, not at the first measurement
        try:
            check_image_count(config.train.fid_n, resolve_extractor("auto", config.data.dataset),
                              "{setting}")
        except ValueError as exc:
            raise SettingError("train.fid_n", str(exc)) from None
    check_writable(run_dir, "the run directory")


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None  # None on the processes that are not the main one
    grid: Path | None
    elapsed_s: float
    last_loss: float
    progress: Path | None = None  # the preview grids as a GIF, when there were two or more
    stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that ended the run early
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss (--on-nan skip)


def train(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    final_grid: bool = True,
) -> TrainResult:
    """Train (or, with ``resume=True``, continue training) the run in ``run_dir``.

    ``config`` is resolved first (``config.resolve``: the dataset's defaults filled in, the
    U-Net fitted to the data's channels and size). A new run writes ``config.json``; a resumed
    run reads its state from the newest checkpoint and trains to ``config.train.steps`` in total
    (or for ``config.train.minutes`` more minutes). Torch's thread count and global random state
    are as they were when it returns.

    Under ``accelerate launch`` every process calls this: each computes its share of every batch
    (``batch_size`` is the whole batch, split evenly), and the main process alone keeps the EMA,
    draws grids, measures FID, logs and writes checkpoints.
    """
    run_dir = Path(run_dir)
    config = resolve(config)  # so config.json says exactly what was read and built
    with torch_state_kept(), contextlib.ExitStack() as hold:
        device = resolve_device(config.train.device)
        accelerator = make_accelerator(device)
        check_run(config, run_dir, resume=resume, num_processes=accelerator.num_processes)
        if accelerator.num_processes > 1:
            device = accelerator.device  # launched: the launcher's choice of device
        return _train(config, run_dir, accelerator, device, hold, resume=resume,
                      progress=progress, final_grid=final_grid)


def _train(config: RunConfig, run_dir: Path, accelerator: Accelerator, device: torch.device,
           hold: contextlib.ExitStack, *, resume: bool, progress: bool,
           final_grid: bool) -> TrainResult:
    """The body of :func:`train`; it takes the run directory's lock into ``hold``."""
    tc, main = config.train, accelerator.is_main_process
    run = build_training(config, accelerator, device, functools.partial(
        _open_data, config, accelerator, progress=progress and main), keep_ema=main)
    state = run.state()
    if main:  # the first write to the run directory; held until train() returns
        hold.enter_context(run_lock(run_dir))
        remove_partial_writes(run_dir)  # the temporary files of a killed checkpoint write
    if resume:
        path, saved = load_run_or_file(run_dir, map_location=device)
        state.load_state_dict(saved, path)
        if tc.steps is not None and state.step >= tc.steps:  # nothing to train: write nothing
            if state.step > tc.steps:
                raise ValueError(f"{run_dir} has trained {state.step} steps already, more than "
                                 f"train.steps = {tc.steps} (counted from the start of the run)")
            return TrainResult(run_dir, state.step, path, None, state.elapsed_s, float("nan"))
        if main:
            repair_config_file(run_dir, checkpoint_config(saved, path), path)
    elif main:
        write_config(config, run_dir)
    outputs = RunOutputs(run, run_dir, state, main=main, resume=resume, progress=progress)
    stop_rule = _StopRule(tc.steps, tc.minutes, accelerator)
    window = _LogWindow(tc.batch_size * tc.grad_accum)
    run.model.train()
    state.start_clock()
    faults = _NonFinite(device, state.skipped_steps)
    stats = None
    with outputs, _StopRequest() as signals:
        fraction, interrupted = stop_rule.check(signals)
        finished = stop_rule.done(state.step, fraction) or interrupted
        while not finished:
            try:
                batches = run.next_batches()
            except Exception:
                if signals.signum is None:
                    raise
                break  # the signal ended the DataLoader workers too: save the steps done
            lr = learning_rate(config, state.step, fraction)
            stats = run.update(batches, lr)  # queued on the device; nothing here waits for it
            faults.add(stats, state.step + 1)
            state.step += 1
            window.add()
            outputs.bar.update(1)
            fraction, interrupted = stop_rule.check(signals)
            finished = stop_rule.done(state.step, fraction) or interrupted
            log = state.step % tc.log_every == 0 or state.step == 1 or finished
            if log or interrupted or outputs.due(state.step):
                faults.check(state, run_dir, outputs.bar)  # the one wait for the device
            if main and log:
                outputs.log(state, float(stats.loss), float(stats.grad_norm), lr, window.close(),
                            stop_rule.minutes_left())
            if interrupted:  # save now; grids and FID would only delay a scheduler's kill
                break
            with window.paused():  # images/s counts training only
                outputs.periodic(state, finished)
        faults.check(state, run_dir, outputs.bar)
        outputs.checkpoint(state, final=True)
    loss = float(stats.loss) if stats is not None else float("nan")
    elapsed, stopped_by = state.elapsed_s, signals.signum if main else None
    accelerator.wait_for_everyone()  # the final checkpoint is on disk before any process returns
    grid, animation = outputs.finish(stopped=signals.signum is not None, final_grid=final_grid)
    return TrainResult(run_dir, state.step, outputs.path, grid, elapsed, loss, animation,
                       stopped_by, state.skipped_steps)


def _open_data(config: RunConfig, accelerator: Accelerator, *, progress: bool):
    """The training split (one download and one cache, which the other processes then read),
    checked against a class-conditional model's number of classes."""
    with accelerator.main_process_first():
        data = open_dataset(config.data, progress=progress)
    k = config.model.num_classes
    if k and k != len(data.classes):
        raise ValueError(
            f"the model is conditioned on {k} classes but {data.name} has "
            f"{len(data.classes) or 'no'} labelled classes"
            + ("; use --folder-labels to take labels from subfolders" if not data.classes else ""))
    return data


class _NonFinite:
    """Steps whose loss (or gradient) was not finite, counted on the device as the steps go, and
    read by :meth:`check` only where the host needs the answer: before a log line, a preview,
    an FID measurement or a checkpoint, and at the end. Such a step never changed the weights,
    the EMA or the optimiser (``train_step``); what is decided here is whether to go on: stop
    (--on-nan stop) at the first, or count them and stop after MAX_SKIPS_IN_A_ROW in a row."""

    def __init__(self, device: torch.device, initial: int):
        def zero(dtype=torch.int64):
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


class _StopRule:
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

    def check(self, signals: "_StopRequest") -> tuple[float | None, bool]:
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


class _LogWindow:
    """Images per second since the last metrics line, not counting side outputs."""

    def __init__(self, images_per_step: int):
        self.images_per_step, self.images, self.start = images_per_step, 0, time.perf_counter()

    def add(self) -> None:
        self.images += self.images_per_step

    @contextlib.contextmanager
    def paused(self):
        begin = time.perf_counter()
        yield
        self.start += time.perf_counter() - begin

    def close(self) -> float:
        """Images per second over the window; starts the next one."""
        now = time.perf_counter()
        rate = self.images / max(now - self.start, 1e-9)
        self.images, self.start = 0, now
        return rate


class _StopRequest:
    """SIGINT and SIGTERM while training: remembered, so the loop finishes its step, writes a
    checkpoint and returns (a scheduler's SIGTERM before a kill, Ctrl-C at a terminal). The same
    signal a second time interrupts at once; the other one is ignored, since a launcher that
    got Ctrl-C passes it on to its processes as SIGTERM."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
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


def resume_config(run_dir: str | os.PathLike, *, steps: int | None = None,
                  minutes: float | None = None) -> RunConfig:
    """The config a run was trained with, its stopping rule replaced when ``steps`` or ``minutes``
    is given (steps count from the start of the run; minutes from now)."""
    path, state = load_run_or_file(run_dir)
    stop = {k: v for k, v in (("steps", steps), ("minutes", minutes)) if v is not None}
    return resumed(checkpoint_config(state, path), {"train": stop})
