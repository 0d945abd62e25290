"""Training: one ``train_step``, a loop you can read top to bottom, the EMA, and resume.

Everything random comes from two generators saved in every checkpoint (data order and flips;
timesteps and noise) plus torch's global RNG (dropout), so a resumed run makes exactly the updates
the uninterrupted run would have made.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, broadcast
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, list_checkpoints, load_run_or_file, save_checkpoint
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


class _Loggers:
    """The metrics JSONL file, TensorBoard, and Weights & Biases when asked for."""

    def __init__(self, run_dir: Path, config: RunConfig, resume_step: int | None):
        self.path = run_dir / METRICS_FILE
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
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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
) -> tuple[float, float]:
    """One optimiser update over ``batches`` of (images, labels) (whole batches of every process;
    gradient accumulation when more than one); returns (this process's loss, the gradient norm).

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
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    optimizer.step()  # Accelerate's wrapper: unscales and skips non-finite fp16 steps
    return total, float(grad_norm)


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
    main, world = accelerator.is_main_process, accelerator.num_processes
    check_run(config, run_dir, resume=resume, num_processes=world)
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

    step, elapsed_before = 0, 0.0
    if resume:
        _, state = load_run_or_file(run_dir, map_location=device)
        net.load_state_dict(state["model"])
        if main:
            ema.model.load_state_dict(state["ema"])
            ema.num_updates = state["ema_state"]["num_updates"]
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data_stream"])
        _set_rng_state(state["rng"], noise_gen, stream)
        step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json.dumps(config.to_dict(), indent=2).encode(), run_dir / CONFIG_FILE)

    pipe = evaluator = loggers = None
    if main:
        pipe = Pipeline(ema.model, schedule, config, step, device, classes=data.classes)
        if tc.fid_every:  # reference statistics once, before training (cached across runs)
            evaluator = Evaluator(dc.dataset, dc.data_dir, split=dc.split, device=device,
                                  data_options=data_options(dc))
        loggers = _Loggers(run_dir, config, step if resume else None)

    def measure_fid() -> None:
        begin = time.perf_counter()
        images = pipe.generate(tc.fid_n, seed=FID_SEED, sampler=tc.fid_sampler,
                               num_sample_steps=tc.fid_steps, batch_size=128)
        r = evaluator.evaluate(to_uint8(images))
        loggers.log(step, {"fid": r.fid, "kid": r.kid, "floor_fid": r.floor_fid,
                           "floor_kid": r.floor_kid, "fid_n": r.n,
                           "fid_seconds": time.perf_counter() - begin})
        bar.write(f"step {step}: FID {r.fid:.2f}, KID {r.kid:.4f} ({r.extractor}, n={r.n}; "
                  f"real images: FID {r.floor_fid:.2f})")

    saved_step = None

    def checkpoint() -> Path | None:
        nonlocal saved_step
        saved_step = step
        if not main:
            return None
        return save_checkpoint(
            {
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
            },
            run_dir,
            keep=tc.keep_checkpoints,
        )

    def time_fraction() -> float | None:
        """The share of ``minutes`` spent, as the main process sees it: every process must stop
        at the same step (or one would wait forever for the others' gradients) and use the
        same learning rate."""
        if tc.minutes is None:
            return None
        fraction = (time.perf_counter() - start) / (60.0 * tc.minutes)
        if world > 1:
            fraction = float(broadcast(torch.tensor([fraction], device=device))[0])
        return fraction

    def done(fraction: float | None) -> bool:
        if tc.steps is not None and step >= tc.steps:
            return True
        return fraction is not None and fraction >= 1.0

    start = time.perf_counter()
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and main), unit="step",
               dynamic_ncols=True, desc="training")
    ckpt_path = None
    window_images, window_start, loss = 0, time.perf_counter(), float("nan")
    model.train()
    try:
        fraction = time_fraction()
        finished = done(fraction)
        while not finished:
            batches = [stream.next() for _ in range(tc.grad_accum)]
            lr = learning_rate(config, step, fraction)
            loss, grad_norm = train_step(
                model, schedule, optimizer, batches, accelerator=accelerator,
                generator=noise_gen, config=config, device=device, lr=lr,
            )
            if world > 1:  # the loss of the whole batch, for the log and the check below
                loss = float(accelerator.reduce(torch.tensor([loss], device=device), "mean")[0])
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at step {step + 1}; the last checkpoint is intact. "
                    f"Lower the learning rate (now {tc.lr}) or use --precision fp32"
                )
            if main:
                ema.update(net)
            step += 1
            window_images += tc.batch_size * tc.grad_accum
            bar.update(1)
            fraction = time_fraction()
            finished = done(fraction)
            if main and (step % tc.log_every == 0 or step == 1 or finished):
                now = time.perf_counter()
                images_per_s = window_images / max(now - window_start, 1e-9)
                loggers.log(step, {
                    "loss": loss, "grad_norm": grad_norm, "lr": lr,
                    "images_per_s": images_per_s, "elapsed_s": elapsed_before + now - start,
                })
                postfix = {"loss": f"{loss:.4f}", "img_s": f"{images_per_s:.0f}"}
                if tc.minutes is not None:
                    postfix["min_left"] = f"{max(0.0, tc.minutes - (now - start) / 60):.1f}"
                bar.set_postfix(postfix)
                window_images, window_start = 0, now
            side_start = time.perf_counter()
            if main and tc.sample_every and step % tc.sample_every == 0:
                sample_grid(pipe, tc.sample_n, run_dir / "samples" / f"step-{step:08d}.png",
                            num_sample_steps=tc.sample_steps)
            if evaluator is not None and (step % tc.fid_every == 0 or finished):
                measure_fid()
                plot_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE)
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                ckpt_path = checkpoint()
            window_start += time.perf_counter() - side_start  # images/s counts training only
        if saved_step != step:
            ckpt_path = checkpoint()
    finally:
        bar.close()
        if loggers is not None:
            loggers.close()
    elapsed = elapsed_before + time.perf_counter() - start
    accelerator.wait_for_everyone()  # the final checkpoint is on disk before any process returns
    if not main:
        return TrainResult(run_dir, step, None, None, elapsed, loss)
    plot_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE)
    grid = None
    if final_grid:
        grid = sample_grid(pipe, tc.sample_n, run_dir / "grid.png", progress=progress)
    animation = progress_animation(run_dir / "samples", run_dir / PROGRESS_FILE)
    return TrainResult(run_dir, step, ckpt_path, grid, elapsed, loss, animation)


def resume_config(run_dir: str | os.PathLike, *, steps: int | None = None,
                  minutes: float | None = None) -> RunConfig:
    """The config a run was trained with, its stopping rule replaced when ``steps`` or ``minutes``
    is given (steps count from the start of the run; minutes from now)."""
    path, state = load_run_or_file(run_dir)
    config = checkpoint_config(state, path)
    if steps is not None or minutes is not None:
        config = replace(config, train=replace(config.train, steps=steps, minutes=minutes))
    return config
