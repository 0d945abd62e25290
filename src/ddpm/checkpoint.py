"""Checkpoints: one versioned dict, written atomically, loaded without running code.

:class:`TrainState` is the one place the dict's layout is written down: training saves and
resumes through its ``state_dict``/``load_state_dict``, and the sampling pipeline reads a
checkpoint's config and weights through :func:`checkpoint_config` and :func:`load_weights`.

A checkpoint holds the model, the EMA model, the optimiser, the gradient scaler, the step, the
elapsed training time, the RNG states, the data-stream position and the resolved config (plain
data). It is written to a temporary file in the same folder, flushed to disk and renamed over
the final name, so the final name only ever holds a whole checkpoint: a process killed mid-write
(even by SIGKILL) or a full disk leaves the previous checkpoint as it was. Loading uses
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses any
other pickled object, so a crafted file cannot run code.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .config import RunConfig

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"  # the checkpoint with the lowest FID so far, kept beside the newest ones
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # what _atomic_write writes before its rename


class CheckpointError(ValueError):
    """A file that is not a loadable ddpm checkpoint; the message says which and why."""


class SaveError(Exception):
    """A checkpoint could not be written (a full disk, a folder made read-only); the previous
    checkpoint is untouched and the message names it."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *,
                  sync: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, sync it, then rename it to ``path``:
    ``path`` is always either the old file or the whole new one, never a partial write. With
    ``sync=False`` the rename is as atomic, but nothing waits for the disk: for many small files
    whose folder is synced once at the end (:func:`sync_folder`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync:
        _fsync_dir(path.parent)


def sync_folder(folder: str | os.PathLike) -> None:
    """Wait for the disk to hold ``folder``'s entries (after writes made with ``sync=False``)."""
    _fsync_dir(Path(folder))


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


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike, *, sync: bool = True) -> None:
    _atomic_write(path, lambda f: f.write(data), sync=sync)


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{step:08d}.pt"


def run_of(run_or_file: str | os.PathLike) -> Path:
    """The run a run directory or checkpoint file belongs to, symlinks resolved: a checkpoint in
    a run's checkpoints/ folder is that run's; a checkpoint file elsewhere is its own."""
    path = Path(run_or_file).resolve()
    return path.parent.parent if path.is_file() and path.parent.name == CHECKPOINT_DIR else path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoints, newest (highest step) first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def best_checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / BEST_NAME


def _save(state: dict[str, Any], path: Path) -> None:
    """``atomic_save`` that turns a failed write into a SaveError naming what is kept."""
    try:
        atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    except (OSError, RuntimeError) as exc:
        # torch's zip writer reports a failed write as a RuntimeError; its text names the cause.
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = "the disk is full" if full or "No space left" in str(exc) else (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0])
        kept = list_checkpoints(path.parent.parent)  # whole files: each was renamed into place
        raise SaveError(
            f"could not write {path} ({reason}); "
            + (f"the newest checkpoint {kept[0]} is intact" if kept else "no earlier checkpoint exists")
        ) from None


def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike, *, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``state['step']``, then keep only the newest ``keep``
    (older ones are deleted only once the new one is whole on disk). Raises SaveError."""
    path = checkpoint_path(run_dir, int(state["step"]))
    _save(state, path)
    for old in list_checkpoints(run_dir)[max(keep, 1) :]:
        old.unlink(missing_ok=True)
    return path


def save_best_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike) -> Path:
    """Write ``state`` as the run's best checkpoint (``checkpoints/best.pt``), outside the
    rotation of ``save_checkpoint``. Raises SaveError."""
    path = best_checkpoint_path(run_dir)
    _save(state, path)
    return path


def remove_partial_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed process left behind."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [p for p in folder.iterdir() if _TEMPORARY.match(p.name)] if folder.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


def read_torch_file(path: str | os.PathLike, what: str, *, advice: str = "",
                    error: type[ValueError] | None = None, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (no code can run), each way it can fail one
    ``error`` (CheckpointError by default) naming the file, ``what`` it should have been (e.g.
    "ddpm checkpoint") and ending with ``advice`` (e.g. "; make one with ...")."""
    error = error or CheckpointError
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a folder, not a {what} file{advice}")
    if not path.is_file():
        raise error(f"{what} {path} does not exist{advice}")
    if not zipfile.is_zipfile(path):  # what torch.save has written since torch 1.6
        raise error(f"{path} is not a readable {what}: it is not a torch file (a zip archive); "
                    f"it may be truncated or another program's file{advice}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's text here advises weights_only=False, which would run any code in the file.
        raise error(f"{path} is not a readable {what}: it holds objects other than tensors and "
                    f"plain data, which ddpm does not load (they could run code){advice}") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise error(f"{path} is not a readable {what} ({type(exc).__name__}: {detail}); it may "
                    f"be truncated or another program's file{advice}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code can run); check its format."""
    path = Path(path)
    state = read_torch_file(path, "ddpm checkpoint", map_location=map_location)
    if not isinstance(state, dict) or "format_version" not in state or "config" not in state:
        raise CheckpointError(f"{path} is a torch file but not a ddpm checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, this ddpm reads format "
            f"{FORMAT_VERSION}; use the ddpm version that wrote it"
        )
    return state


def load_run_or_file(
    run_or_file: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """Load a checkpoint file as given, or the newest loadable checkpoint of a run directory."""
    p = Path(run_or_file)
    if p.is_file():
        return p, load_checkpoint(p, map_location)
    if p.is_dir():
        candidates = list_checkpoints(p)
        if not candidates:
            raise CheckpointError(f"{p} holds no checkpoints ({CHECKPOINT_DIR}/ckpt-STEP.pt); pass "
                                  f"a run directory written by 'ddpm train' or a .pt checkpoint file")
        reasons = []
        for candidate in candidates:
            try:
                state = load_checkpoint(candidate, map_location)
            except CheckpointError as exc:
                reasons.append(str(exc))  # a newer file that does not load: fall back
                continue
            if reasons:
                warnings.warn(f"{candidates[0]} does not load (damaged, or not written by ddpm); "
                              f"using the newest checkpoint that does, {candidate}", stacklevel=2)
            return candidate, state
        others = len(reasons) - 1
        raise CheckpointError(
            f"no checkpoint of {p} loads: {reasons[0]}"
            + (f" (and {others} older one{'s' * (others > 1)} do{'es' * (others == 1)} not load "
               f"either)" if others else "")
            + "; put a whole checkpoint back, or start the run again")
    raise CheckpointError(f"{p} is neither a checkpoint file nor a run directory")


# --- the layout -----------------------------------------------------------------------------------


def checkpoint_config(state: dict[str, Any], path: str | os.PathLike) -> RunConfig:
    """The RunConfig saved in a checkpoint, or a CheckpointError saying it is from elsewhere
    (an autoencoder run's, which no diffusion command takes)."""
    if state.get("kind") == "autoencoder":
        raise CheckpointError(
            f"{run_of(path)} is an autoencoder run ('ddpm train-autoencoder'), not a diffusion "
            f"model: score it with 'ddpm eval RUN --reconstruction', diffuse in its latents with "
            f"'ddpm train --autoencoder RUN', resume it with 'ddpm train-autoencoder --resume'")
    try:
        return RunConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path} holds a config this version of ddpm cannot read ({exc}); it was written by "
            f"another version: sample or resume it with that version"
        ) from None


def load_weights(model: nn.Module, state: dict[str, Any], path: str | os.PathLike, *,
                 ema: bool) -> None:
    """Load the checkpoint's EMA (``ema=True``) or raw weights into ``model``; weights of another
    shape than the checkpoint's own config describes are a CheckpointError."""
    try:
        model.load_state_dict(state["ema" if ema else "model"])
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(
            f"{Path(path)} holds weights of another model than its config describes "
            f"({str(exc).splitlines()[0]}); it was not written by this run's 'ddpm train'"
        ) from None


class TrainState:
    """Everything a run is at a step: the network, its EMA, the optimiser, fp16's scaler, the
    step, the elapsed time, the random states (torch's global one for dropout, the noise
    generator of t and eps, the data stream's), the data stream's position, the best FID so far
    and the count of skipped steps. ``state_dict()`` is the checkpoint; ``load_state_dict()``
    puts a checkpoint back, so that resuming makes exactly the updates the uninterrupted run
    would have made. ``ema`` is None on the processes that do not keep one (all but the main).

    Nothing in it is per-process, so a run resumes with any number of processes.
    """

    def __init__(self, *, config: RunConfig, model: nn.Module, ema: Any, optimizer: Any,
                 scaler: Any, stream: Any, noise_generator: torch.Generator,
                 classes: tuple[str, ...] = (), num_processes: int = 1, posthoc: Any = ()):
        self.config, self.model, self.ema, self.optimizer, self.scaler = (
            config, model, ema, optimizer, scaler)
        self.posthoc = list(posthoc)  # the power EMAs of --posthoc-ema (posthoc.PowerEMA)
        self.stream, self.noise_generator = stream, noise_generator
        self.classes, self.num_processes = tuple(classes), num_processes
        self.step = 0
        self.skipped_steps = 0  # updates skipped for a non-finite loss (--on-nan skip)
        self.best_fid = math.inf
        self._elapsed_before = 0.0  # training time of the run before this process took it up
        self._clock = time.perf_counter()

    def start_clock(self) -> None:
        """Count training time from now (after the set-up: data, reference statistics)."""
        self._clock = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        """Training time of the run so far, across resumes."""
        return self._elapsed_before + time.perf_counter() - self._clock

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint of this step; refuses (FloatingPointError) to hold non-finite weights."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(f"the weights are not finite at step {self.step}; nothing "
                                     f"was saved over the existing checkpoints")
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_generator.get_state(),
               "data": self.stream.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "ema_state": self.ema.state_dict(),
            "posthoc_ema": [a.profile() for a in self.posthoc],
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data_stream": self.stream.state_dict(),
            "rng": rng,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "classes": list(self.classes),
            "num_processes": self.num_processes,
            "skipped_steps": self.skipped_steps,
            "best_fid": self.best_fid,
        }

    def load_state_dict(self, state: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
        """Continue from the checkpoint ``state`` (read from ``path``, named in errors)."""
        load_weights(self.model, state, path, ema=False)
        if self.ema is not None:
            load_weights(self.ema.model, state, path, ema=True)
            self.ema.load_state_dict(state["ema_state"])
            saved = state.get("posthoc_ema", [])
            if [a.std for a in self.posthoc] != [p["std"] for p in saved]:
                raise CheckpointError(
                    f"{path} keeps power EMAs of lengths {[p['std'] for p in saved]} but the run's "
                    f"config asks for {[a.std for a in self.posthoc]}; resume with the run's own "
                    f"--posthoc-ema")
            for average, profile in zip(self.posthoc, saved, strict=True):
                average.load_profile(profile)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data_stream"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        _set_generator(self.noise_generator, rng["noise"], 2 * int(state["step"]) + 1, path)
        _set_generator(self.stream.generator, rng["data"], 2 * int(state["step"]), path)
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        self._elapsed_before = float(state["elapsed_s"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_fid = float(state.get("best_fid", math.inf))


def _set_generator(generator: torch.Generator, saved: torch.Tensor, seed: int,
                   path: str | os.PathLike) -> None:
    """Restore a generator; a state saved on another kind of device (a CPU's Mersenne twister,
    a GPU's Philox) cannot be, so the run goes on from ``seed`` (made of its step), warning."""
    try:
        generator.set_state(saved)
    except RuntimeError:
        generator.manual_seed(seed)
        warnings.warn(f"{path} was saved on another kind of device than {generator.device.type}; "
                      f"the noise and data order go on from new seeds, so the run continues, but "
                      f"not as it would have on the first device", stacklevel=3)
