"""A run directory: what a training run writes while it trains, and the guards around it.

::

    RUN/config.json          the resolved configuration (CONFIG_FILE)
    RUN/checkpoints/         ckpt-STEP.pt and best.pt (checkpoint.py)
    RUN/metrics.jsonl        one JSON line per log (METRICS_FILE), also to TensorBoard in tensorboard/
    RUN/samples/step-N.png   preview grids; RUN/progress.gif, RUN/grid.png, RUN/curves.png
    RUN/.lock                held by the training process (LOCK_FILE)

:class:`RunOutputs` writes them at the steps they fall due (metrics, preview grids, FID and
best.pt, checkpoints) and at the end. Side outputs (grids, plots, metric lines) are best effort:
one that cannot be written (a full disk) is skipped with one warning, and training goes on.
Checkpoints are not side outputs: a failed write keeps the previous one and is reported.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import SaveError, TrainState, atomic_write_bytes, save_best_checkpoint, save_checkpoint
from .config import RunConfig, differences
from .data import held_out_images, to_model_range, to_uint8
from .metrics import Evaluator, data_options
from .pipeline import Pipeline
from .posthoc import save_snapshot
from .step import TrainedConfig
from .superres import downsample
from .viz import metric_records, plot_curves, progress_animation, save_grid

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
PROGRESS_FILE = "progress.gif"  # the preview grids of the run as one animation
GRID_FILE = "grid.png"  # the final grid
SAMPLES_DIR = "samples"  # preview grids, samples/step-00000175.png ...
LOCK_FILE = ".lock"  # held by the training process, so two cannot write one run at once
PREVIEW_SEED = 1234  # fixed noise, so successive preview grids show the same samples improving
FID_SEED = 4321  # the same noise at every FID measurement: the curve shows the model, not luck


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
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


def write_config(config: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json.dumps(config.to_dict(), indent=2).encode(), run_dir / CONFIG_FILE)


def repair_config_file(run_dir: Path, saved: RunConfig, source: Path) -> None:
    """On resume: a config.json that is missing, cut off, unreadable or at odds with the
    checkpoint's own copy of the config (the one the run goes on with) is written again from
    that copy, with a warning saying what was wrong. Settings ``--resume`` may change are allowed
    to differ: config.json records how the run started."""
    path = run_dir / CONFIG_FILE
    try:
        on_disk = RunConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        problem = "it is missing"
    except (OSError, ValueError) as exc:  # a JSONDecodeError too: a file cut off mid-write
        problem = f"it does not read as a config ({str(exc).splitlines()[0]})"
    else:
        changed = differences(on_disk, saved, resumable=False)
        if not changed:
            return
        key, old, new = changed[0]
        problem = f"it says {key} = {old!r} where the checkpoint says {new!r}"
    write_config(saved, run_dir)
    warnings.warn(f"{path} was not the run's config: {problem}; wrote it again from the copy in "
                  f"{source}, which the run goes on with", stacklevel=2)


class SideOutputs:
    """A run's warnings about side outputs, each said once (a full disk would repeat them)."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def best_effort(self, what: str, write: Callable, *args: Any, **kwargs: Any) -> Any:
        """Write a side output (grid, plot, metrics line); if that fails, say so once, train on."""
        try:
            return write(*args, **kwargs)
        except OSError as exc:
            if what not in self.said:
                self.said.add(what)
                tqdm.write(f"warning: could not write the {what} ({exc.strerror or exc}); "
                           f"training goes on", file=sys.stderr)
            return None


class Loggers:
    """The metrics JSONL file, TensorBoard, and Weights & Biases when asked for."""

    def __init__(self, run_dir: Path, config: TrainedConfig, resume_step: int | None,
                 outputs: SideOutputs):
        self.path, self.outputs = run_dir / METRICS_FILE, outputs
        if resume_step is not None and self.path.exists():
            # Drop lines logged after the checkpoint we resume from (they will be logged again)
            # and a line that a crash cut off mid-write.
            records, bad = metric_records(self.path)
            if bad:
                warnings.warn(f"dropped line {', '.join(map(str, bad[:3]))} of {self.path}, cut "
                              f"off by an interrupted write; the run goes on", stacklevel=2)
            kept = [json.dumps(r) for r in records if r["step"] <= resume_step]
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
        self.outputs.best_effort(f"metrics in {self.path}", self.file.write,
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


class RunOutputs:
    """What a run writes while it trains: metrics, preview grids, FID, checkpoints (the main
    process; the others only keep count), and at the end its curves, grid and animation."""

    def __init__(self, run: Any, run_dir: Path, state: TrainState, *, main: bool,
                 resume: bool, progress: bool):
        """``run`` is the ``train.Training`` whose EMA and schedule the previews sample."""
        tc = run.config.train
        self.run, self.run_dir, self.tc, self.main, self.progress = run, run_dir, tc, main, progress
        self.saved_step: int | None = None
        self.path: Path | None = None
        self.snapshot_step: int | None = None
        self.side = SideOutputs()  # warnings about side outputs that could not be written
        # The main process's (None in the others); the evaluator only with --fid-every.
        self.pipe: Pipeline | None = None
        self.evaluator: Evaluator | None = None
        self.loggers: Loggers | None = None
        # a super-resolution run's preview and FID inputs, with their labels
        self.low_res: tuple[torch.Tensor, torch.Tensor] | None = None
        if main:
            dc = run.config.data
            if run.config.superres.low is not None:
                self.low_res = low_res_inputs(run.config, max(tc.sample_n, tc.fid_n if tc.fid_every else 0))
            # Previews and FID sample in the training's precision (bf16 where it trains in bf16).
            self.pipe = Pipeline(run.ema.model, run.schedule, run.config, state.step, run.device,
                                 run.precision, classes=state.classes, decoder=run.decoder)
            if tc.fid_every:  # reference statistics once, before training (cached across runs)
                self.evaluator = Evaluator(dc.dataset, dc.data_dir, split=dc.split,
                                           device=run.device, data_options=data_options(dc))
            self.loggers = Loggers(run_dir, run.config, state.step if resume else None, self.side)
        self.bar = tqdm(total=tc.steps, initial=state.step, disable=not (progress and main),
                        unit="step", dynamic_ncols=True, desc="training")

    def __enter__(self) -> RunOutputs:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        if self.loggers is not None:
            self.loggers.close()

    def log(self, state: TrainState, loss: float, grad_norm: float, lr: float,
            images_per_s: float, minutes_left: float | None) -> None:
        """A metrics line (and the progress bar's figures)."""
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "images_per_s": images_per_s, "elapsed_s": state.elapsed_s}
        if self.tc.on_nan == "skip":
            metrics["skipped_steps"] = state.skipped_steps
        assert self.loggers is not None, "only the main process logs"
        self.loggers.log(state.step, metrics)
        postfix = {"loss": f"{loss:.4f}", "img_s": f"{images_per_s:.0f}"}
        if minutes_left is not None:
            postfix["min_left"] = f"{minutes_left:.1f}"
        self.bar.set_postfix(postfix)

    def due(self, step: int) -> bool:
        """Whether a preview grid, an FID measurement or a checkpoint falls due at ``step``."""
        return any(every and step % every == 0 for every in
                   (self.tc.sample_every, self.tc.fid_every, self.tc.checkpoint_every,
                    self.snapshot_every))

    @property
    def snapshot_every(self) -> int:
        """Steps between snapshots of the --posthoc-ema averages (0: none)."""
        if not self.tc.posthoc_ema:
            return 0
        return self.tc.ema_snapshot_every or self.tc.checkpoint_every

    def periodic(self, state: TrainState, finished: bool) -> None:
        """After a step: the preview grid, FID and checkpoint that fall due."""
        step, tc = state.step, self.tc
        if self.main and tc.sample_every and step % tc.sample_every == 0:
            self.side.best_effort("preview grid", sample_grid, self.pipe, tc.sample_n,
                                  self.run_dir / SAMPLES_DIR / f"step-{step:08d}.png",
                                  low_res=self.low_res, num_sample_steps=tc.sample_steps)
        if self.evaluator is not None and (step % tc.fid_every == 0 or finished):
            self.measure_fid(state)
            self.side.best_effort("FID curves", plot_curves, self.run_dir / METRICS_FILE,
                                  self.run_dir / CURVES_FILE)
        if self.snapshot_every and step % self.snapshot_every == 0:
            self.snapshot(state)
        if tc.checkpoint_every and step % tc.checkpoint_every == 0:
            self.checkpoint(state, final=False)

    def sampling_seconds(self, step: int, last_step: int, *, final_grid: bool = True) -> float:
        """The seconds that the preview grids, FID measurements and final grid still due after
        ``step`` (to ``last_step``) will spend sampling: their network evaluations, at the rate
        of one evaluation of the EMA model timed now (batch 128, the run's precision)."""
        tc, pipe = self.tc, self.pipe
        if pipe is None:  # not the main process
            return 0.0
        def due(every: int) -> int:  # multiples of ``every`` in (step, last_step]
            return last_step // every - step // every if every else 0

        fids = due(tc.fid_every) + (1 if tc.fid_every and last_step % tc.fid_every else 0)
        evaluations = (due(tc.sample_every) * tc.sample_n * pipe.evaluations_per_image(
                           num_sample_steps=tc.sample_steps)
                       + fids * tc.fid_n * pipe.evaluations_per_image(
                           sampler=tc.fid_sampler, num_sample_steps=tc.fid_steps)
                       + (tc.sample_n * pipe.evaluations_per_image() if final_grid else 0))
        return evaluations * pipe.seconds_per_evaluation(batch_size=128)

    def snapshot(self, state: TrainState) -> None:
        """Save the power EMAs of this step (the main process), unless saved already; before the
        step's checkpoint, so a checkpoint never has a later step than the snapshots."""
        if self.main and self.run.posthoc and self.snapshot_step != state.step:
            try:
                save_snapshot(self.run.posthoc, self.run_dir, state.step)
            except (OSError, RuntimeError) as exc:  # a full disk: the run matters more
                self.bar.write(f"warning: the EMA snapshot of step {state.step} was not saved "
                               f"({str(exc).splitlines()[0]}); training goes on", file=sys.stderr)
            self.snapshot_step = state.step

    def measure_fid(self, state: TrainState) -> None:
        assert self.pipe is not None and self.evaluator is not None and self.loggers is not None
        begin = time.perf_counter()
        n, low_res, labels = self.tc.fid_n, None, None
        if self.low_res is not None:  # (labels: those of the images, for a conditional model)
            low_res, labels = (part[:n] for part in self.low_res)
        images = self.pipe.generate(n, seed=FID_SEED, sampler=self.tc.fid_sampler,
                                    num_sample_steps=self.tc.fid_steps, batch_size=128,
                                    low_res=low_res, labels=labels if self.pipe.num_classes else None)
        r = self.evaluator.evaluate(to_uint8(images))
        self.loggers.log(state.step, {"fid": r.fid, "kid": r.kid, "floor_fid": r.floor_fid,
                                      "floor_kid": r.floor_kid, "fid_n": r.n,
                                      "fid_seconds": time.perf_counter() - begin})
        self.bar.write(f"step {state.step}: FID {r.fid:.2f}, KID {r.kid:.4f} ({r.extractor}, "
                       f"n={r.n}; real images: FID {r.floor_fid:.2f})")
        if r.fid < state.best_fid:
            state.best_fid = r.fid  # set first: best.pt records its own FID as the best
            try:
                save_best_checkpoint({**state.state_dict(), "fid": r.fid}, self.run_dir)
            except SaveError as exc:
                self.bar.write(f"warning: the best checkpoint (FID {r.fid:.2f}) was not saved: "
                               f"{exc}", file=sys.stderr)

    def checkpoint(self, state: TrainState, *, final: bool) -> None:
        """Write the checkpoint of this step (the main process), unless it is written already.
        A failed write keeps the previous checkpoint; it ends the run only when it was the last
        chance to save."""
        if self.saved_step == state.step:
            return
        if self.main:
            try:
                self.path = save_checkpoint(state.state_dict(), self.run_dir,
                                            keep=self.tc.keep_checkpoints)
            except SaveError as exc:
                if final:
                    raise
                self.bar.write(f"warning: {exc}; training goes on and tries again at the next "
                               f"checkpoint", file=sys.stderr)
                return
        self.saved_step = state.step

    def finish(self, *, stopped: bool, final_grid: bool) -> tuple[Path | None, Path | None]:
        """The main process's last outputs: the loss curves and, unless a signal stopped the
        run, the final grid and the progress animation (their paths, or None)."""
        if not self.main:
            return None, None
        run_dir, grid, animation = self.run_dir, None, None
        self.side.best_effort("loss curves", plot_curves, run_dir / METRICS_FILE,
                              run_dir / CURVES_FILE)
        if not stopped:
            if final_grid:
                grid = self.side.best_effort("final grid", sample_grid, self.pipe, self.tc.sample_n,
                                             run_dir / GRID_FILE, progress=self.progress,
                                             low_res=self.low_res)
            animation = self.side.best_effort("progress animation", progress_animation,
                                              run_dir / SAMPLES_DIR, run_dir / PROGRESS_FILE)
        return grid, animation


# --- preview grids ------------------------------------------------------------------------------


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


def sample_grid(pipe: Pipeline, n: int, path: Path, *, progress: bool = False,
                low_res: tuple[torch.Tensor, torch.Tensor] | None = None, **settings: Any) -> Path:
    """A grid of EMA samples from the fixed preview noise (one row per class when conditional;
    of a super-resolution model, the first ``n`` of ``low_res``'s (images, labels) super-resolved)."""
    if low_res is not None:
        images, labels = (part[:n] for part in low_res)
        return save_grid(pipe.generate(len(images), seed=PREVIEW_SEED, progress=progress,
                                       labels=labels if pipe.num_classes else None,
                                       low_res=images, **settings), path)
    grid, nrow = grid_labels(n, pipe.num_classes)
    count = n if grid is None else len(grid)
    images = pipe.generate(count, seed=PREVIEW_SEED, labels=grid, progress=progress, **settings)
    return save_grid(images, path, nrow=nrow)


def low_res_inputs(config: RunConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A super-resolution run's fixed inputs, for its previews and FID while training and
    ``ddpm eval`` of the run alone: ``n`` held-out images (repeated if there are fewer) averaged
    down to ``superres.low``, in [-1, 1], and their labels."""
    assert config.superres.low is not None
    images, labels = held_out_images(config.data, n)
    cycle = torch.arange(n) % len(images)
    return downsample(to_model_range(images[cycle]), config.superres.low), labels[cycle]
