"""Training: one ``train_step``, a loop you can read top to bottom, the EMA, and resume.

Everything random comes from two generators saved in every checkpoint (data order and flips;
timesteps and noise) plus torch's global RNG (dropout), so a resumed run makes exactly the updates
the uninterrupted run would have made.

Nothing is lost to a fault: SIGINT or SIGTERM ends the current step and writes a checkpoint of
it; checkpoints are written atomically (``checkpoint.py``), so SIGKILL at any moment leaves the
previous one loadable; a non-finite loss never reaches the weights; a checkpoint that cannot be
written (a full disk) keeps the previous one and says so.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (CheckpointError, SaveError, atomic_write_bytes, list_checkpoints,
                         load_run_or_file, remove_partial_writes, save_best_checkpoint,
                         save_checkpoint)
from .config import RunConfig
from .data import BatchStream, open_dataset, to_uint8
from .data import resolve as resolve_data_config
from .diffusion import draw_t_eps, training_loss
from .models import count_parameters
from .pipeline import (Pipeline, build_model, build_schedule, checkpoint_config, resolve_device,
                       resolve_precision)
from .samplers import get_sampler
from .schedules import NoiseSchedule
from .metrics import Evaluator, data_options
from .viz import plot_curves, progress_animation, save_grid

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PREVIEW_SEED = 1234  # fixed noise, so successive preview grids show the same samples improving
FID_SEED = 4321  # the same noise at every FID measurement: the curve shows the model, not luck
CURVES_FILE = "curves.png"
PROGRESS_FILE = "progress.gif"  # the preview grids of the run as one animation
LOCK_FILE = ".lock"  # held by the training process, so two cannot write one run at once
ON_NAN = ("stop", "skip")
# With --on-nan skip, this many non-finite steps in a row stop the run anyway: the weights do not
# change on a skipped step, so a fault that persists this long will not pass by skipping.
MAX_SKIPS_IN_A_ROW = 100


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging), sampled from."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        # Short memory while the weights move fast early on: (1 + n) / (10 + n).
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        # ema <- ema + (1 - decay) (param - ema)
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}


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


class _Loggers:
    """The metrics JSONL file, TensorBoard, and Weights & Biases when asked for."""

    def __init__(self, run_dir: Path, config: RunConfig, resume_step: int | None,
                 warnings: _Warnings):
        self.path, self.warnings = run_dir / METRICS_FILE, warnings
        if resume_step is not None and self.path.exists():
            # Drop lines logged after the checkpoint we resume from: they will be logged again.
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            atomic_write_bytes(("\n".join(kept) + "\n" if kept else "").encode(), self.path)
        self.file = open(self.path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)
        self.wandb = None
        if config.train.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "--wandb needs the wandb package: pip install wandb (or drop --wandb)"
                ) from None
            self.wandb = wandb.init(
                project=config.train.wandb_project, config=config.to_dict(), dir=str(run_dir),
                resume="allow",
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # On a full disk the metrics are lost, the training is not.
        self.warnings.best_effort(f"metrics in {self.path}", self.file.write,
                                  json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class _Warnings:
    """A run's warnings about side outputs, each said once (a full disk would repeat them)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def best_effort(self, what: str, write, *args, **kwargs):
        """Write a side output (grid, plot, metrics line); if that fails, say so once, train on."""
        try:
            return write(*args, **kwargs)
        except OSError as exc:
            if what not in self.said:
                self.said.add(what)
                tqdm.write(f"warning: could not write the {what} ({exc.strerror or exc}); "
                           f"training goes on", file=sys.stderr)
            return None


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


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Hold an exclusive lock on the run while training it (released by the OS, even on SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; nothing to hold
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{run_dir} is being trained by another process; wait for it to end "
                             f"or choose another folder") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


LR_SCHEDULES = ("constant", "cosine")


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
) -> "StepStats":
    """One optimiser update over ``batches`` of (images, labels) (whole batches of every process;
    gradient accumulation when more than one); returns the loss of the whole batch, the gradient
    norm and whether the weights were updated: a non-finite loss or gradient leaves them as
    they were (every process sees the same loss, so all of them skip together).

    Each process draws t and eps (and, for a class-conditional model, which labels to drop) for
    the whole batch from the same generator and keeps its own rows, so N processes with B/N
    images each make the update one process makes with B.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    dc = config.diffusion
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    total = 0.0
    num_classes = config.model.num_classes
    for i, (x0, y) in enumerate(batches):
        t, eps = draw_t_eps(schedule, x0.shape, generator)
        rows = slice(rank * x0.shape[0] // world, (rank + 1) * x0.shape[0] // world)
        denoiser = model
        if num_classes:
            # Ho & Salimans 2022, Algorithm 1, line 3: c <- null with probability p_uncond.
            drop = torch.rand(x0.shape[0], generator=generator, device=generator.device).cpu()
            y = torch.where(drop < config.train.class_dropout, num_classes, y)
            denoiser = functools.partial(model, y=y[rows].to(device))
        # Gradients are averaged across processes once per update, after the last micro-batch.
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                x = x0[rows].to(device, memory_format=memory_format)
                loss = training_loss(denoiser, schedule, x, t=t[rows], eps=eps[rows],
                                     loss=dc.loss, prediction_type=dc.prediction_type,
                                     weighting=dc.loss_weighting, min_snr_gamma=dc.min_snr_gamma)
            accelerator.backward(loss / len(batches))  # scaled for fp16 by Accelerate
        total += loss.item() / len(batches)
    if world > 1:  # the loss of the whole batch, for the log and the check below
        total = float(accelerator.reduce(torch.tensor([total], device=device), "mean")[0])
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.train.grad_clip))
    scaled = accelerator.scaler is not None
    updated = math.isfinite(total) and (scaled or math.isfinite(grad_norm))
    if updated or scaled:
        # Accelerate's wrapper: with fp16's scaler it unscales, and skips a non-finite step itself
        # while lowering the scale (which it must see, so it is called for those steps too).
        optimizer.step()
    return StepStats(total, grad_norm, updated)


class StepStats(NamedTuple):
    loss: float  # mean over the whole batch (all processes)
    grad_norm: float  # before clipping
    updated: bool  # False: non-finite, and the weights were left as they were


MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # ours -> Accelerate's names


def make_accelerator(precision: str, device: torch.device) -> Accelerator:
    """The Accelerate handle of this process: one of ``accelerate launch``'s processes, or alone.

    ``precision`` auto follows ``accelerate launch --mixed_precision`` (or ``accelerate config``)
    when that asks for bf16 or fp16, and is otherwise bf16 on CUDA and fp32 on a CPU.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched:
        # Accelerate keeps its state in a process-wide singleton; a second run in one Python
        # process (a notebook, the tests) may use another precision, so start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "auto" and from_launcher in ("bf16", "fp16"):
        precision = from_launcher
    precision = resolve_precision(precision, device)
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=MIXED_PRECISION[precision],
        # The main process alone draws preview grids and measures FID while the others wait.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))],
    )


def _rng_state(noise_gen: torch.Generator, stream: BatchStream) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "noise": noise_gen.get_state(),
        "data": stream.generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], noise_gen: torch.Generator, stream: BatchStream) -> None:
    torch.set_rng_state(state["torch"])
    noise_gen.set_state(state["noise"])
    stream.generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def grid_labels(n: int, num_classes: int) -> tuple[torch.Tensor | None, int | None]:
    """Labels and row length for a grid of about ``n`` samples: for a class-conditional model, one
    row per class (``n // num_classes`` each), or one image per class when there are more classes
    than images; for an unconditional one, (None, None)."""
    if num_classes == 0:
        return None, None
    if num_classes > n:
        return torch.arange(n), None
    per_class = n // num_classes
    return torch.arange(num_classes).repeat_interleave(per_class), per_class


def sample_grid(pipe: Pipeline, n: int, path: Path, *, progress: bool = False, **settings) -> Path:
    """A grid of EMA samples from the fixed preview noise (one row per class when conditional)."""
    labels, nrow = grid_labels(n, pipe.num_classes)
    count = n if labels is None else len(labels)
    images = pipe.generate(count, seed=PREVIEW_SEED, labels=labels, progress=progress, **settings)
    return save_grid(images, path, nrow=nrow)


def build_training(
    config: RunConfig, accelerator: Accelerator, device: torch.device
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """The network, what the training step calls (DistributedDataParallel when launched, compiled
    with ``train.compile``) and the AdamW optimiser wrapped by Accelerate (fp16 loss scaling)."""
    tc = config.train
    net = build_model(config).to(device)
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    # One fused kernel for the whole update: PyTorch's fast path on CUDA, and measured neutral
    # on the CPU (BENCHMARKS.md); other devices keep torch's default.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                  weight_decay=tc.weight_decay, fused=fused or None)
    model = accelerator.prepare_model(net, device_placement=False)
    if tc.compile:
        model = torch.compile(model)
    return net, model, accelerator.prepare_optimizer(optimizer, device_placement=False)


def check_run(config: RunConfig, run_dir: str | os.PathLike, *, resume: bool,
              num_processes: int = 1) -> None:
    """Raise ValueError, before anything is written or launched, for a run that would fail later."""
    run_dir, tc = Path(run_dir), config.train
    if not resume and list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already holds a run; continue it with 'ddpm train --resume {run_dir}' "
            f"(train(..., resume=True) in Python) or choose a new folder"
        )
    config.model.validate()
    config.diffusion.validate()
    model, data = config.model, resolve_data_config(config.data)
    if (model.in_channels, model.image_size) != (data.channels, data.image_size):
        raise ValueError(
            f"the data are {data.channels}x{data.image_size}x{data.image_size} images but the "
            f"model takes {model.in_channels}x{model.image_size}x{model.image_size}; give the "
            f"same --channels and --image-size to both"
        )
    if not 0.0 <= tc.class_dropout < 1.0:
        raise ValueError(f"class dropout must be in [0, 1), got {tc.class_dropout}")
    if tc.on_nan not in ON_NAN:
        raise ValueError(f"on_nan is {tc.on_nan!r}; choose one of {', '.join(ON_NAN)}")
    check_writable(run_dir, "the run directory")
    T = config.diffusion.num_train_timesteps
    for name, steps in (("train.sample_steps", tc.sample_steps),
                        ("sample.num_sample_steps", config.sample.num_sample_steps),
                        ("train.fid_steps", tc.fid_steps)):
        if not 1 <= steps <= T:  # checked now, not at the first preview grid mid-run
            raise ValueError(f"{name} is {steps} but must be between 1 and T = {T}")
    if tc.fid_every:
        get_sampler(tc.fid_sampler)  # an unknown name fails now, not at the first measurement
    resolve_precision(tc.precision, resolve_device(tc.device))  # e.g. fp16 on a CPU
    if tc.batch_size % num_processes:
        raise ValueError(
            f"batch size {tc.batch_size} is the whole batch of all {num_processes} processes and "
            f"must split evenly between them; use a multiple of {num_processes}"
        )


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why files cannot be made in ``folder`` (which may not exist yet), or None; creates
    nothing: the nearest existing folder above it is tested with a nameless temporary file."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        with tempfile.TemporaryFile(dir=existing):  # gone when closed
            return None
    except OSError as exc:
        return f"files cannot be made in {existing} ({exc.strerror})"


def check_writable(folder: str | os.PathLike, what: str = "the folder") -> None:
    """Raise ValueError, without creating anything, if ``folder`` cannot be made and written."""
    reason = unwritable(folder)
    if reason is not None:
        raise ValueError(f"cannot create {what} {folder}: {reason}; choose a writable folder")


def train(
    config: RunConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    final_grid: bool = True,
) -> TrainResult:
    """Train (or, with ``resume=True``, continue training) the run in ``run_dir``.

    A new run writes ``config.json``; a resumed run reads its state from the newest checkpoint
    and trains to ``config.train.steps`` in total (or for ``config.train.minutes`` more minutes).

    Under ``accelerate launch`` every process calls this: each computes its share of every batch
    (``batch_size`` is the whole batch, split evenly), and the main process alone keeps the EMA,
    draws grids, measures FID, logs and writes checkpoints. The checkpoint holds nothing
    per-process, so a run resumes with any number of processes.
    """
    run_dir = Path(run_dir)
    # The dataset's defaults made explicit, so config.json says exactly what was read.
    config = replace(config, data=resolve_data_config(config.data))
    tc = config.train
    accelerator = make_accelerator(tc.precision, resolve_device(tc.device))
    check_run(config, run_dir, resume=resume, num_processes=accelerator.num_processes)
    with contextlib.ExitStack() as hold:  # the run directory's lock, from its first write
        return _train(config, run_dir, accelerator, hold, resume=resume, progress=progress,
                      final_grid=final_grid)


def _train(config: RunConfig, run_dir: Path, accelerator: Accelerator,
           hold: contextlib.ExitStack, *, resume: bool, progress: bool,
           final_grid: bool) -> TrainResult:
    """The body of :func:`train`; it takes the run directory's lock into ``hold``."""
    tc = config.train
    main, world = accelerator.is_main_process, accelerator.num_processes
    # One process: the device asked for (cuda:1 stays cuda:1); launched: the launcher's choice.
    device = resolve_device(tc.device) if world == 1 else accelerator.device
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    schedule = build_schedule(config)
    net, model, optimizer = build_training(config, accelerator, device)
    ema = EMA(net, tc.ema_decay, tc.ema_warmup) if main else None

    dc = config.data
    with accelerator.main_process_first():  # one download and one cache, which the others read
        data = open_dataset(dc, progress=progress and main)
    if config.model.num_classes and config.model.num_classes != len(data.classes):
        raise ValueError(
            f"the model is conditioned on {config.model.num_classes} classes but {data.name} "
            f"has {len(data.classes) or 'no'} labelled classes"
            + ("; use --folder-labels to take labels from subfolders" if not data.classes else "")
        )
    # Every process walks the same shuffled stream of whole batches and keeps its rows of each.
    stream = BatchStream(data, tc.batch_size, hflip=dc.hflip,
                         generator=torch.Generator().manual_seed(tc.seed),
                         crop_size=dc.image_size if dc.crop == "random" else None,
                         workers=dc.workers)
    noise_gen = torch.Generator(device).manual_seed(tc.seed + 1)

    if main:  # the first write to the run directory; held until train() returns
        hold.enter_context(_run_lock(run_dir))
        remove_partial_writes(run_dir)  # the temporary files of a killed checkpoint write
    step, elapsed_before, skipped, best_fid = 0, 0.0, 0, math.inf
    if resume:
        path, state = load_run_or_file(run_dir, map_location=device)
        try:
            net.load_state_dict(state["model"])
            if main:
                ema.model.load_state_dict(state["ema"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path} holds weights of another model than its config describes "
                f"({str(exc).splitlines()[0]}); it was not written by this run's 'ddpm train'"
            ) from None
        if main:
            ema.num_updates = state["ema_state"]["num_updates"]
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data_stream"])
        _set_rng_state(state["rng"], noise_gen, stream)
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        skipped = int(state.get("skipped_steps", 0))
        best_fid = float(state.get("best_fid", math.inf))
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json.dumps(config.to_dict(), indent=2).encode(), run_dir / CONFIG_FILE)

    pipe = evaluator = loggers = None
    outputs = _Warnings()  # about side outputs that could not be written
    if main:
        pipe = Pipeline(ema.model, schedule, config, step, device, classes=data.classes)
        if tc.fid_every:  # reference statistics once, before training (cached across runs)
            evaluator = Evaluator(dc.dataset, dc.data_dir, split=dc.split, device=device,
                                  data_options=data_options(dc))
        loggers = _Loggers(run_dir, config, step if resume else None, outputs)

    def state() -> dict[str, Any]:
        """Everything a resume needs, as it stands after ``step`` updates."""
        if not all(torch.isfinite(p).all() for p in net.parameters()):  # never save NaN weights
            raise FloatingPointError(f"the weights are not finite at step {step}; nothing was "
                                     f"saved over the existing checkpoints")
        return {
            "step": step,
            "elapsed_s": elapsed_before + (time.perf_counter() - start),
            "config": config.to_dict(),
            "model": net.state_dict(),
            "ema": ema.model.state_dict(),
            "ema_state": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "data_stream": stream.state_dict(),
            "rng": _rng_state(noise_gen, stream),
            "num_params": count_parameters(net),
            "classes": list(data.classes),
            "num_processes": world,
            "skipped_steps": skipped,
            "best_fid": best_fid,
        }

    def measure_fid() -> None:
        nonlocal best_fid
        begin = time.perf_counter()
        images = pipe.generate(tc.fid_n, seed=FID_SEED, sampler=tc.fid_sampler,
                               num_sample_steps=tc.fid_steps, batch_size=128)
        r = evaluator.evaluate(to_uint8(images))
        loggers.log(step, {"fid": r.fid, "kid": r.kid, "floor_fid": r.floor_fid,
                           "floor_kid": r.floor_kid, "fid_n": r.n,
                           "fid_seconds": time.perf_counter() - begin})
        bar.write(f"step {step}: FID {r.fid:.2f}, KID {r.kid:.4f} ({r.extractor}, n={r.n}; "
                  f"real images: FID {r.floor_fid:.2f})")
        if r.fid < best_fid:
            best_fid = r.fid  # set first: best.pt records its own FID as the best
            try:
                save_best_checkpoint({**state(), "fid": r.fid}, run_dir)
            except SaveError as exc:
                bar.write(f"warning: the best checkpoint (FID {r.fid:.2f}) was not saved: {exc}",
                          file=sys.stderr)

    saved_step, ckpt_path = None, None

    def checkpoint(final: bool) -> None:
        """Write the checkpoint of ``step`` (the main process). A failed write keeps the
        previous checkpoint; it ends the run only when it was the last chance to save."""
        nonlocal saved_step, ckpt_path
        if main:
            try:
                ckpt_path = save_checkpoint(state(), run_dir, keep=tc.keep_checkpoints)
            except SaveError as exc:
                if final:
                    raise
                bar.write(f"warning: {exc}; training goes on and tries again at the next "
                          f"checkpoint", file=sys.stderr)
                return
        saved_step = step

    def agree(fraction: float | None, stop: _StopRequest) -> tuple[float | None, bool]:
        """The share of ``minutes`` spent (as the main process sees it) and whether a signal
        asked any process to stop: every process must stop at the same step, or one would wait
        forever for the others' gradients, and use the same learning rate."""
        stopping = stop.signum is not None
        if world > 1:  # one collective: the main process's share (the others give 0) and the flag
            both = torch.tensor([fraction if fraction is not None and main else 0.0,
                                 float(stopping)], device=device)
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
            fraction = None if fraction is None else float(both[0])
            stopping = bool(both[1] > 0)
        return fraction, stopping

    def time_fraction() -> float | None:
        if tc.minutes is None:
            return None
        return (time.perf_counter() - start) / (60.0 * tc.minutes)

    def done(fraction: float | None) -> bool:
        if tc.steps is not None and step >= tc.steps:
            return True
        return fraction is not None and fraction >= 1.0

    start = time.perf_counter()
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and main), unit="step",
               dynamic_ncols=True, desc="training")
    in_a_row = 0  # non-finite steps in a row
    window_images, window_start, loss = 0, time.perf_counter(), float("nan")
    model.train()
    try:
        with _StopRequest() as stop:
            fraction, interrupted = agree(time_fraction(), stop)
            finished = done(fraction) or interrupted
            while not finished:
                try:
                    batches = [stream.next() for _ in range(tc.grad_accum)]
                except Exception:
                    if stop.signum is None:
                        raise
                    # The signal reached the DataLoader workers as well (a scheduler signalling
                    # every process of the job) and ended them: save the steps done.
                    break
                lr = learning_rate(config, step, fraction)
                loss, grad_norm, updated = train_step(
                    model, schedule, optimizer, batches, accelerator=accelerator,
                    generator=noise_gen, config=config, device=device, lr=lr,
                )
                if not updated:
                    newest = list_checkpoints(run_dir)
                    kept = f"the newest checkpoint {newest[0]} is intact" if newest else \
                        "no checkpoint was written yet"
                    if tc.on_nan == "stop":
                        raise FloatingPointError(
                            f"the loss became {loss} at step {step + 1}; the weights were not "
                            f"updated and {kept}. Lower the learning rate (now {tc.lr:g}), use "
                            f"--precision fp32, or skip such steps with --on-nan skip")
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    if in_a_row >= MAX_SKIPS_IN_A_ROW:
                        raise FloatingPointError(
                            f"{in_a_row} steps in a row had a non-finite loss (the last at step "
                            f"{step + 1}); skipping does not help, so training stops and {kept}. "
                            f"Lower the learning rate (now {tc.lr:g}) or check the data")
                    bar.write(f"step {step + 1}: the loss is {loss}; update skipped "
                              f"({skipped} so far)", file=sys.stderr)
                else:
                    in_a_row = 0
                    if main:
                        ema.update(net)
                step += 1
                window_images += tc.batch_size * tc.grad_accum
                bar.update(1)
                fraction, interrupted = agree(time_fraction(), stop)
                finished = done(fraction) or interrupted
                if main and (step % tc.log_every == 0 or step == 1 or finished):
                    now = time.perf_counter()
                    images_per_s = window_images / max(now - window_start, 1e-9)
                    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                               "images_per_s": images_per_s,
                               "elapsed_s": elapsed_before + now - start}
                    if tc.on_nan == "skip":
                        metrics["skipped_steps"] = skipped
                    loggers.log(step, metrics)
                    postfix = {"loss": f"{loss:.4f}", "img_s": f"{images_per_s:.0f}"}
                    if tc.minutes is not None:
                        postfix["min_left"] = f"{max(0.0, tc.minutes - (now - start) / 60):.1f}"
                    bar.set_postfix(postfix)
                    window_images, window_start = 0, now
                if interrupted:  # save now; grids and FID would only delay a scheduler's kill
                    break
                side_start = time.perf_counter()
                if main and tc.sample_every and step % tc.sample_every == 0:
                    outputs.best_effort("preview grid", sample_grid, pipe, tc.sample_n,
                                 run_dir / "samples" / f"step-{step:08d}.png",
                                 num_sample_steps=tc.sample_steps)
                if evaluator is not None and (step % tc.fid_every == 0 or finished):
                    measure_fid()
                    outputs.best_effort("FID curves", plot_curves, run_dir / METRICS_FILE,
                                 run_dir / CURVES_FILE)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                    checkpoint(final=False)
                window_start += time.perf_counter() - side_start  # images/s counts training only
            if saved_step != step:
                checkpoint(final=True)
            stopped_by = stop.signum
    finally:
        bar.close()
        if loggers is not None:
            loggers.close()
    elapsed = elapsed_before + time.perf_counter() - start
    accelerator.wait_for_everyone()  # the final checkpoint is on disk before any process returns
    if not main:
        return TrainResult(run_dir, step, None, None, elapsed, loss, skipped_steps=skipped)
    outputs.best_effort("loss curves", plot_curves, run_dir / METRICS_FILE, run_dir / CURVES_FILE)
    grid = animation = None
    if stopped_by is None:
        if final_grid:
            grid = outputs.best_effort("final grid", sample_grid, pipe, tc.sample_n,
                                run_dir / "grid.png", progress=progress)
        animation = outputs.best_effort("progress animation", progress_animation, run_dir / "samples",
                                 run_dir / PROGRESS_FILE)
    return TrainResult(run_dir, step, ckpt_path, grid, elapsed, loss, animation, stopped_by,
                       skipped)


def resume_config(run_dir: str | os.PathLike, *, steps: int | None = None,
                  minutes: float | None = None) -> RunConfig:
    """The config a run was trained with, its stopping rule replaced when ``steps`` or ``minutes``
    is given (steps count from the start of the run; minutes from now)."""
    path, state = load_run_or_file(run_dir)
    config = checkpoint_config(state, path)
    if steps is not None or minutes is not None:
        config = replace(config, train=replace(config.train, steps=steps, minutes=minutes))
    return config
