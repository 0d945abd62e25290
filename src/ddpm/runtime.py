"""Where and how a process computes: the device, the precision and its autocast, the Accelerate
handle of a training process, and torch's process-wide state kept as the caller had it.

Training, sampling and ``ddpm bench`` all come here, so a precision means the same everywhere:
``auto`` is bf16 on CUDA; on a CPU with bfloat16 instructions (AVX-512 BF16 or AMX) it is what a
short measurement of the model's own step finds faster (``autoprecision.py``: bf16 was 1.6x
fp32 for training on a 2-core EPYC, and slower on a 2-core Xeon with the same flag); fp32 on
other CPUs (where bf16 autocast is emulated and was measured ~10x slower; BENCHMARKS.md has
both). It follows ``accelerate launch --mixed_precision`` only in a process that ``accelerate
launch`` started.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .config import PRECISIONS

if TYPE_CHECKING:
    from accelerate import Accelerator


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use cpu or auto")
    return device


def launched_by_accelerate() -> bool:
    """Whether ``accelerate launch`` started this process (it sets both variables, for one
    process or many); only then does ``auto`` precision follow its ``--mixed_precision``."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ


#: x86 flags (as /proc/cpuinfo names them) of bfloat16 arithmetic in hardware: AVX-512 BF16
#: (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later). Other CPUs, ARM's bf16
#: included (unmeasured here), keep fp32 under ``auto``.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flag(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of :data:`BF16_CPU_FLAGS` this CPU reports, or None (also where there is no
    ``/proc/cpuinfo`` to read: not Linux)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)
    except OSError:
        pass
    return None


#: What ``auto`` takes on a CPU with bf16 instructions: a call that measures the step about to
#: run in fp32 and bf16 (or reads that measurement from the cache) and returns the precision and
#: why (``train.training_probe``, ``pipeline.sampling_probe``, both through ``autoprecision``).
PrecisionProbe = Callable[[], "tuple[str, str]"]


def precision_and_reason(precision: str, device: torch.device,
                         probe: PrecisionProbe | None = None) -> tuple[str, str]:
    """The precision to compute in, and why (for summary lines). ``auto`` is bf16 on CUDA, fp32
    on a CPU without bf16 instructions, and on one with them what ``probe`` measures (fp32 when
    there is no probe: nothing was measured); the others are returned as given, fp16 only on
    CUDA (its gradient scaler needs it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; on a CPU use bf16 or fp32")
    if precision != "auto":
        return precision, "as asked"
    if device.type == "cuda":
        return "bf16", "auto: bf16 on CUDA"
    flag = cpu_bf16_flag()
    if flag is None:
        return "fp32", "auto: fp32, this CPU has no bf16 hardware"
    if probe is None:
        return "fp32", f"auto: fp32, bf16 ({flag}) not measured for this model"
    return probe()


def resolve_precision(precision: str, device: torch.device,
                      probe: PrecisionProbe | None = None) -> str:
    """:func:`precision_and_reason`'s precision."""
    return precision_and_reason(precision, device, probe)[0]


def training_precision(precision: str, device: torch.device,
                       probe: PrecisionProbe | None = None) -> tuple[str, str]:
    """The precision a training process uses, and why, for the run's summary: ``auto`` follows
    ``accelerate launch --mixed_precision bf16|fp16`` in a process it launched; one of several
    processes launched without it never measures (each would time its own share of the cores and
    could choose differently) and trains in fp32; otherwise :func:`precision_and_reason`."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "auto" and launched_by_accelerate():
        if launcher in ("bf16", "fp16"):
            reason = f"auto: accelerate launch --mixed_precision {launcher}"
            return resolve_precision(launcher, device), reason
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cpu" and cpu_bf16_flag():
            return "fp32", "auto: fp32, launched without --mixed_precision bf16"
    return precision_and_reason(precision, device, probe)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` (auto | bf16 | fp16 | fp32) on ``device``."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def gradient_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def make_accelerator(device: torch.device) -> Accelerator:
    """The Accelerate handle of this process: one of ``accelerate launch``'s processes (then it
    joins their process group: gloo on CPUs, NCCL on GPUs), or alone.

    It is made without mixed precision: autocast and fp16's scaler are ours (:func:`autocast`,
    :func:`gradient_scaler`), the same for training, sampling and ``bench``. Accelerate keeps its
    state in a process-wide singleton that refuses a second, different precision in one Python
    process (a notebook, the tests); asking every time for the same ("no") needs no private
    reset of that singleton.
    """
    # (imported here: 0.1 s that sampling, which never needs it, does not pay at start-up)
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        # A lone process places its tensors itself (cuda:1 stays cuda:1); launched processes on
        # CPUs must say so, or Accelerate would look for GPUs.
        cpu=distributed and device.type == "cpu",
        mixed_precision="no",
        # The main process alone draws preview grids and measures FID while the others wait.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2))],
    )


def warn_compile_failed(exc: Exception, what: str) -> None:
    """One line saying that torch.compile failed (dynamo's and inductor's failures have many
    types, and long texts) and that ``what`` goes on uncompiled."""
    text = str(exc).strip()
    reason = text.splitlines()[0][:200] if text else type(exc).__name__
    warnings.warn(f"torch.compile failed ({type(exc).__name__}: {reason}); {what} goes on without "
                  f"it", stacklevel=3)


@contextlib.contextmanager
def torch_state_kept() -> Iterator[None]:
    """Leave torch's thread count and global random state (CPU and CUDA) as they were: training
    sets both for itself, and a caller in Python should not find them changed."""
    threads = torch.get_num_threads()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def processor_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
