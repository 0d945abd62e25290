"""Training: the set-up that ``train`` and ``bench`` share, and the loop that calls the step
(``step.py``: ``train_step``, the learning rate, the EMA).

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
import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .autoencoder import LoadedAutoencoder
from .autoprecision import choose
from .checkpoint import (
    TrainState,
    check_writable,
    checkpoint_config,
    list_checkpoints,
    load_run_or_file,
    remove_partial_writes,
)
from .config import RunConfig, resolve, resumed
from .data import BatchStream, ImageData, LatentData, StreamingImages, open_dataset, to_model_range
from .data.registry import default_cache_dir
from .latent import encode_split, resolve_latent
from .metrics import check_image_count, resolve_extractor
from .models import UNet
from .monitor import Forecast, LogWindow, NonFinite, StopRequest, StopRule, TrainingClock
from .pipeline import build_schedule
from .posthoc import PowerEMA
from .rundir import RunOutputs, repair_config_file, run_lock, write_config
from .runtime import (
    PrecisionProbe,
    gradient_scaler,
    make_accelerator,
    resolve_device,
    torch_state_kept,
    training_precision,
    warn_compile_failed,
)
from .schedules import NoiseSchedule
from .sde import largest_pairwise_distance
from .settings import SettingError
from .step import EMA, StepStats, learning_rate, train_step

if TYPE_CHECKING:  # (accelerate is imported where a process is made: runtime.make_accelerator)
    from accelerate import Accelerator

# --- the set-up ---------------------------------------------------------------------------------


@dataclass
class Training:
    """What a training process works with (:func:`build_training`); ``train`` and ``bench`` both
    run their steps through :meth:`next_batches` and :meth:`update`."""

    config: RunConfig
    accelerator: Accelerator
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, resolved
    precision_why: str  # how it was resolved ("auto: bf16, bf16 measured 1.55x fp32 here")
    schedule: NoiseSchedule  # on the CPU, for the samplers of the preview grids
    train_schedule: NoiseSchedule  # the same on the training device
    net: nn.Module  # the network whose weights are saved and averaged
    model: nn.Module  # what the step calls: net, wrapped for DDP and compiled when asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: EMA | None  # None on the processes that do not keep one
    posthoc: list[PowerEMA]  # the --posthoc-ema averages (the main process's)
    data: ImageData | StreamingImages | LatentData
    stream: BatchStream
    noise_generator: torch.Generator  # t and eps of every step
    eager: nn.Module | None = None  # with --compile: the model uncompiled, until compiling works
    decoder: LoadedAutoencoder | None = None  # a latent run's autoencoder, for previews and FID

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
            except Exception as exc:  # a failure to compile: the first call compiles
                torch.set_rng_state(random_states[0])
                self.noise_generator.set_state(random_states[1])
                self.model = self.eager
                warn_compile_failed(exc, "training")
                stats = step()
            self.eager = None  # compiled, or given up: nothing more to try
        for average in ([self.ema] if self.ema is not None else []) + self.posthoc:
            average.update(self.net, stats.updated)
        return stats

    def state(self) -> TrainState:
        """The state a checkpoint saves and a resume restores, at step 0."""
        classes = getattr(self.data, "classes", ())
        return TrainState(config=self.config, model=self.net, ema=self.ema,
                          optimizer=self.optimizer, scaler=self.scaler, stream=self.stream,
                          noise_generator=self.noise_generator, classes=classes,
                          num_processes=self.accelerator.num_processes, posthoc=self.posthoc)


def build_training(config: RunConfig, accelerator: Accelerator, device: torch.device,
                   open_data: Callable[[], ImageData | StreamingImages | LatentData], *,
                   keep_ema: bool = True, decoder: LoadedAutoencoder | None = None) -> Training:
    """Seed, network, AdamW (fused), DDP wrapper and compile, EMA, data stream and noise
    generator, in the order that makes a run's random draws the same every time.

    ``open_data`` is called after the network is made (so a decoding DataLoader cannot shift
    the network's initialisation); every process walks the same shuffled stream of whole batches
    and keeps its rows of each."""
    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    precision, why = training_precision(tc.precision, device, training_probe(config, device))
    torch.manual_seed(tc.seed)
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
    posthoc = [PowerEMA(net, std) for std in tc.posthoc_ema] if keep_ema else []
    data = open_data()
    # A split that fits is held on the GPU, batches made there; otherwise made on the host in
    # pinned memory, for an asynchronous copy. (On a CPU both are the same thing.)
    on_device = device.type == "cuda" and not isinstance(data, StreamingImages) and _fits(data, device)
    stream = BatchStream(data, tc.batch_size, hflip=bool(config.data.hflip),
                         generator=torch.Generator(device if on_device else "cpu").manual_seed(tc.seed),
                         crop_size=config.data.image_size if config.data.crop == "random" else None,
                         workers=config.data.workers,
                         pin_memory=device.type == "cuda" and not on_device)
    noise_generator = torch.Generator(device).manual_seed(tc.seed + 1)
    return Training(config, accelerator, device, precision, why, schedule, schedule.to(device), net,
                    model, optimizer, gradient_scaler(precision, device), ema, posthoc, data, stream,
                    noise_generator, eager if tc.compile else None, decoder)


class _LoneProcess:
    """What ``train_step`` asks of the Accelerate handle for one process with one micro-batch:
    a measurement is never one of several processes (it must not wait for the others)."""

    process_index, num_processes = 0, 1


def training_probe(config: RunConfig, device: torch.device, *, processes: int = 1) -> PrecisionProbe:
    """``--precision auto``'s measurement of this run's training step (``autoprecision``): an
    update of a throwaway network of the run's shape (AdamW, the run's loss, one process's
    micro-batch of noise, channels-last when asked) in fp32 and in bf16, with the threads one of
    ``processes`` processes gets. Measured once per machine and shape (then read from the
    cache folder); the run's random state and thread count are left as they were."""
    tc, m = config.train, config.model
    batch = max(1, tc.batch_size // processes)
    shape = {"model": config.to_dict()["model"], "batch": batch, "channels_last": tc.channels_last}
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format

    def make_step(precision: str) -> Callable[[], StepStats]:
        # (Module.to takes a device and a memory_format together; torch's overloads omit the pair)
        net = UNet(m).to(device, memory_format=memory_format)  # type: ignore[call-overload]
        optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, fused=device.type in ("cpu", "cuda"))
        generator = torch.Generator(device).manual_seed(0)
        x0 = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        schedule = build_schedule(config).to(device)
        return lambda: train_step(net, schedule, optimizer, [(x0, y)],
                                  accelerator=_LoneProcess(), generator=generator, config=config,
                                  device=device, lr=tc.lr, precision=precision)

    def probe() -> tuple[str, str]:
        with torch_state_kept():
            threads = tc.threads or max(1, torch.get_num_threads() // processes)
            torch.set_num_threads(threads)
            found = choose("train", shape, make_step,
                           cache_dir=config.data.cache_dir or default_cache_dir())
        return found.precision, found.why()

    return probe


def _fits(data: ImageData | LatentData, device: torch.device) -> bool:
    """Whether a split's uint8 images (or latents) take at most a quarter of the GPU's free
    memory."""
    free, _ = torch.cuda.mem_get_info(device)
    size = data.nbytes() if isinstance(data, LatentData) else data.images.numel()
    return size <= free // 4


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
    # so config.json says exactly what was read and built (and which autoencoder, by its hash)
    config, autoencoder = resolve_latent(resolve(config))
    config = resolve_sigma_max(config, progress=progress)
    with torch_state_kept(), contextlib.ExitStack() as hold:
        device = resolve_device(config.train.device)
        accelerator = make_accelerator(device)
        check_run(config, run_dir, resume=resume, num_processes=accelerator.num_processes)
        if accelerator.num_processes > 1:
            device = accelerator.device  # launched: the launcher's choice of device
        return _train(config, run_dir, accelerator, device, hold, resume=resume,
                      progress=progress, final_grid=final_grid, autoencoder=autoencoder)


# Song & Ermon 2020's technique 1 over this many training images at most (a seeded draw): the
# exact largest distance over all of them grows as N^2 (60,000 Fashion-MNIST images: minutes on
# two cores), and the largest of 10,000 takes seconds.
SIGMA_MAX_IMAGES = 10_000


def resolve_sigma_max(config: RunConfig, *, progress: bool = False) -> RunConfig:
    """A VE run's sigma_max, when not given, measured as the largest distance between two
    training images (at most ``SIGMA_MAX_IMAGES`` of them, drawn by the run's seed) in the
    model's [-1, 1] range, and written into the config (so config.json and every checkpoint hold
    it, and a resumed run keeps it)."""
    d = config.diffusion
    if d.sde != "ve" or d.sigma_max is not None:
        return config
    if config.latent.autoencoder:
        raise SettingError("diffusion.sigma_max", "a VE run in an autoencoder's latents needs "
                           "{setting} given: the distances that set it are between latents, "
                           "which are not encoded yet when training starts")
    data = open_dataset(config.data, progress=progress)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.train.seed))
    chosen = order[:SIGMA_MAX_IMAGES]
    if isinstance(data, ImageData):
        images = data.images[chosen]
    else:
        images = torch.stack([data[int(i)][1] for i in chosen])
    sigma_max = largest_pairwise_distance(to_model_range(images))
    if sigma_max <= d.sigma_min:
        raise SettingError("diffusion.sigma_max", f"the training images are at most "
                           f"{sigma_max:.3g} apart, not above --sigma-min {d.sigma_min:g}; give "
                           f"{{setting}} yourself")
    if progress:
        print(f"sigma_max = {sigma_max:.4g}: the largest distance between two of {len(chosen):,} "
              f"training images (Song & Ermon 2020, technique 1)", flush=True)
    return dataclasses.replace(config, diffusion=dataclasses.replace(d, sigma_max=sigma_max))


def _train(config: RunConfig, run_dir: Path, accelerator: Accelerator, device: torch.device,
           hold: contextlib.ExitStack, *, resume: bool, progress: bool, final_grid: bool,
           autoencoder: LoadedAutoencoder | None) -> TrainResult:
    """The body of :func:`train`; it takes the run directory's lock into ``hold``."""
    tc, main = config.train, accelerator.is_main_process
    if autoencoder is not None:
        autoencoder.model.to(device)  # (in place) it encodes the split and decodes the previews there
    run = build_training(config, accelerator, device, functools.partial(
        _open_data, config, accelerator, autoencoder, progress=progress and main), keep_ema=main,
        decoder=autoencoder)
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
    stop_rule = StopRule(tc.steps, tc.minutes, accelerator)
    clock = TrainingClock()
    window = LogWindow(tc.batch_size * tc.grad_accum, clock)
    run.model.train()
    state.start_clock()
    faults = NonFinite(device, state.skipped_steps)
    forecast = Forecast(state.step, tc.steps, clock) if main else None
    stats = None
    with outputs, StopRequest() as signals:
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
            if forecast is not None and forecast.due(state.step):
                outputs.bar.write(forecast.say(state, outputs, final_grid))
            with clock.paused():
                outputs.periodic(state, finished)  # images/s and the forecast count training only
        faults.check(state, run_dir, outputs.bar)
        outputs.snapshot(state)
        outputs.checkpoint(state, final=True)
    loss = float(stats.loss) if stats is not None else float("nan")
    elapsed, stopped_by = state.elapsed_s, signals.signum if main else None
    accelerator.wait_for_everyone()  # the final checkpoint is on disk before any process returns
    grid, animation = outputs.finish(stopped=signals.signum is not None, final_grid=final_grid)
    return TrainResult(run_dir, state.step, outputs.path, grid, elapsed, loss, animation,
                       stopped_by, state.skipped_steps)


def _open_data(config: RunConfig, accelerator: Accelerator, autoencoder: LoadedAutoencoder | None,
               *, progress: bool) -> ImageData | StreamingImages | LatentData:
    """The training split (one download and one cache, which the other processes then read),
    with an autoencoder its latents (encoded once, cached likewise), checked against a
    class-conditional model's number of classes."""
    with accelerator.main_process_first():
        data: ImageData | StreamingImages | LatentData = open_dataset(config.data, progress=progress)
        if autoencoder is not None:
            assert not isinstance(data, LatentData)
            data = encode_split(data, autoencoder, hflip=bool(config.data.hflip),
                                sample=config.latent.posterior == "sample",
                                cache_dir=config.data.cache_dir, progress=progress)
    k = config.model.num_classes
    if k and k != len(data.classes):
        raise ValueError(
            f"the model is conditioned on {k} classes but {data.name} has "
            f"{len(data.classes) or 'no'} labelled classes"
            + ("; use --folder-labels to take labels from subfolders" if not data.classes else ""))
    return data


def resume_config(run_dir: str | os.PathLike, *, steps: int | None = None,
                  minutes: float | None = None) -> RunConfig:
    """The config a run was trained with, its stopping rule replaced when ``steps`` or ``minutes``
    is given (steps count from the start of the run; minutes from now)."""
    path, state = load_run_or_file(run_dir)
    stop = {k: v for k, v in (("steps", steps), ("minutes", minutes)) if v is not None}
    return resumed(checkpoint_config(state, path), {"train": stop})
