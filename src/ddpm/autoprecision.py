"""``--precision auto`` on a CPU with bf16 instructions: bf16 only where this machine runs the
model's own step faster in it, measured once per machine, torch version and model shape, and
kept in the cache folder.

A flag in ``/proc/cpuinfo`` says that bf16 instructions exist, not that they are fast. On a
2-core AMD EPYC with ``avx512_bf16`` bf16 trained the default preset 1.6x faster than fp32; on a
2-core Intel Xeon with the same flag bf16 matmul ran at 144 GFLOP/s against 266 in fp32, and the
same preset trained 3.5x fewer steps in 15 minutes than on the EPYC. So ``auto`` times the step
it is about to run many times over (a training update of the run's network at its batch size,
or a sampling evaluation), in fp32 and in bf16, interleaved, and takes bf16 only when it is
faster by :data:`MARGIN`. The answer is written to ``precision.json`` in the cache folder under
a key naming everything it depends on, so that it costs a few seconds once, and the same
cache always gives the same choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .runtime import cpu_bf16_flag, processor_name

#: bf16 is taken when its step is at least this much faster than fp32's. Below it the two are
#: within what two interleaved measurements on a shared 2-core machine disagree by (BENCHMARKS.md
#: measures that spread), and fp32 is the exact one: keep it unless bf16 clearly pays.
MARGIN = 1.05

CACHE_FILE = "precision.json"
CACHE_FORMAT = 1  # bump when what a record means changes; older records are then ignored
MAX_RECORDS = 64  # the newest kept: one per model shape and use, a handful on most machines

#: Makes a step of the model in a precision ("fp32" or "bf16"), ready to call.
StepFactory = Callable[[str], Callable[[], Any]]


@dataclass(frozen=True)
class Measurement:
    """Seconds per step in fp32 and in bf16, the best of interleaved rounds."""

    fp32_s: float
    bf16_s: float

    @property
    def speedup(self) -> float:
        """bf16's rate over fp32's: 2 means bf16 does the step in half the time."""
        return self.fp32_s / self.bf16_s

    @property
    def precision(self) -> str:
        return "bf16" if self.speedup >= MARGIN else "fp32"

    def why(self) -> str:
        """The summary line's reason: ``auto: bf16 measured 1.6x fp32 here``."""
        return f"auto: {self.precision}, bf16 measured {self.speedup:.2f}x fp32 here"


def measure(make_step: StepFactory, *, budget_s: float = 3.0, rounds: int = 6,
            timer: Callable[[], float] = time.perf_counter) -> Measurement:
    """Time one step in each precision, alternating fp32 and bf16 for up to ``rounds`` rounds
    and at least two, stopping once ``budget_s`` is spent; keep each one's fastest step.

    Each step runs once untimed first (oneDNN builds its kernels on a first call). The rounds
    alternate so that a slow spell of the machine falls on both, and the minimum is kept because
    interference from elsewhere only ever adds time."""
    steps = {precision: make_step(precision) for precision in ("fp32", "bf16")}
    for step in steps.values():
        step()
    best = {precision: math.inf for precision in steps}
    begin = timer()
    for done in range(1, rounds + 1):
        for precision, step in steps.items():
            start = timer()
            step()
            best[precision] = min(best[precision], timer() - start)
        if done >= 2 and timer() - begin >= budget_s:
            break
    return Measurement(best["fp32"], best["bf16"])


def machine() -> dict[str, Any]:
    """What a measurement depends on besides the model: the processor, its bf16 flag, torch's
    threads and torch's version."""
    return {"cpu": processor_name(torch.device("cpu")), "bf16_flag": cpu_bf16_flag(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_key(use: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Everything the choice depends on: the use (``train`` or ``sample``), the model's shape
    and batch (``shape``), and :func:`machine`."""
    key = {"format": CACHE_FORMAT, "use": use, "shape": shape, **machine()}
    return json.loads(json.dumps(key))  # as the cache file gives it back: tuples are lists there


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def read_cache(path: Path) -> dict[str, Any]:
    """The records of ``path`` by digest; none, with a warning, when it cannot be read as one."""
    try:
        records = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):  # none yet (a folder that cannot be one is
        return {}                                     # said when the answer is written)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        warnings.warn(f"cannot read the precision cache {path} ({reason}); measuring again",
                      stacklevel=2)
        return {}
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        warnings.warn(f"the precision cache {path} is not a table of measurements; measuring "
                      f"again", stacklevel=2)
        return {}
    return records


def write_cache(path: Path, records: dict[str, Any]) -> None:
    """Write ``records`` to ``path`` atomically (a whole file or none); a folder that cannot
    be written is warned of, and the choice is simply measured again next time."""
    newest = dict(sorted(records.items(), key=lambda kv: str(kv[1].get("measured", "")))[-MAX_RECORDS:])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(newest, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"cannot write the precision cache {path} ({exc.strerror or exc}); the "
                      f"choice will be measured again next time", stacklevel=2)


def _valid(record: dict[str, Any]) -> bool:
    return all(isinstance(record.get(k), (int, float)) and math.isfinite(record[k]) and record[k] > 0
               for k in ("fp32_s", "bf16_s"))


def choose(use: str, shape: dict[str, Any], make_step: StepFactory, *,
           cache_dir: str | os.PathLike, budget_s: float = 3.0,
           timer: Callable[[], float] = time.perf_counter) -> Measurement:
    """fp32 or bf16 for ``use`` of a model of ``shape`` on this machine: the cached measurement
    when there is one for the same key (:func:`cache_key`), else :func:`measure`, then cached."""
    key = cache_key(use, shape)
    digest, path = _digest(key), Path(cache_dir) / CACHE_FILE
    records = read_cache(path)
    record = records.get(digest)
    if record is not None and record.get("key") == key and _valid(record):
        return Measurement(float(record["fp32_s"]), float(record["bf16_s"]))
    found = measure(make_step, budget_s=budget_s, timer=timer)
    records[digest] = {"key": key, **asdict(found), "speedup": round(found.speedup, 4),
                       "precision": found.precision,
                       "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_cache(path, records)
    return found
