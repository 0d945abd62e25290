"""Sampling batches spread over worker processes on a CPU.

A small U-Net at batch 128 keeps two cores busier as two one-thread processes than as one
two-thread process: intra-op threads split every convolution and meet at a barrier after each,
while processes run whole batches side by side (BENCHMARKS.md, "Sampling 1,000 images"). The
workers are forked once the caller's model is loaded, so they share its weights (copy on write)
and start in milliseconds; each takes the next batch from a shared counter, computes it with its
share of the threads, and sends back the images and its progress. A batch computes the same
images in any process (``Pipeline.generate`` gives each batch its own generator), so the number
of workers never changes the result.

Forking is POSIX-only and does not mix with CUDA (a forked child cannot use its parent's CUDA
context), so ``auto`` means one process there; asking for more is refused with the reason.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
from collections.abc import Callable
from typing import Any

import torch

#: How often (seconds) the parent, waiting for results, checks that no worker has died.
POLL_SECONDS = 0.5

#: ``work(index, progress)``: batch ``index``'s images, calling ``progress(k)`` after every k
#: images x network evaluations, as ``Pipeline.generate``'s bar counts them.
BatchWork = Callable[[int, Callable[[int], None]], torch.Tensor]


class WorkerError(RuntimeError):
    """A worker process stopped without a result (killed, most likely for memory)."""


def can_fork() -> bool:
    """Whether this platform can fork worker processes (Linux, macOS; not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


def cores() -> int:
    """The cores this process may run on: its affinity (taskset, cgroups' cpusets) where the
    platform says, otherwise all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _daemonic() -> bool:
    """Whether this is a daemonic multiprocessing process (a Pool's worker), which may not fork
    processes of its own."""
    return bool(multiprocessing.current_process().daemon)


def resolve_workers(workers: int | str, batches: int, device: torch.device, *,
                    compiled: bool = False) -> int:
    """The worker processes that ``batches`` batches are sampled by: ``auto`` is one per thread
    torch would use (``torch.get_num_threads()``, so ``OMP_NUM_THREADS`` and ``--threads`` bound
    it) and per core this process may run on, at most one per batch, on a CPU that can fork;
    one process on CUDA, for a compiled model, for a single batch, and in a daemonic process
    (a multiprocessing Pool's worker, which may have no children). A number is taken as
    asked (at most one per batch), or refused with the reason where workers cannot run."""
    if workers == "auto":
        if device.type != "cpu" or compiled or not can_fork() or _daemonic():
            return 1
        return max(1, min(torch.get_num_threads(), cores(), batches))
    if isinstance(workers, str) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1 or 'auto', got {workers!r}")
    if workers > 1:
        if device.type != "cpu":
            raise ValueError(f"{workers} worker processes split sampling on a CPU; on "
                             f"{device.type} one process drives the device: use 1 (or auto)")
        if compiled:
            raise ValueError(f"{workers} worker processes and a compiled model do not mix (each "
                             f"worker would compile the model again): drop one of them")
        if not can_fork():
            raise ValueError(f"{workers} worker processes need fork(), which this platform "
                             f"lacks: use 1 (or auto)")
        if _daemonic():
            raise ValueError(f"{workers} worker processes cannot start from this process, a "
                             f"daemonic one (multiprocessing allows it no children): use 1 (or "
                             f"auto)")
    return min(workers, max(batches, 1))


def run_batches(work: BatchWork, count: int, workers: int,
                progress: Callable[[int], None]) -> list[torch.Tensor]:
    """``[work(0), ..., work(count - 1)]``: in this process when ``workers`` is 1, otherwise in
    ``workers`` forked processes that share the threads torch would use, each batch's progress
    reported here through ``progress``. A worker's exception is raised here (as itself where it
    can be pickled); a worker that dies raises :class:`WorkerError`; on any exit (Ctrl-C too)
    the workers are stopped before this returns."""
    if workers <= 1:
        return [work(i, progress) for i in range(count)]
    context = multiprocessing.get_context("fork")
    # The next batch to take, shared: a counter, not a queue of every index, which could fill
    # its pipe before any worker reads it (thousands of batches).
    taken: Any = context.Value("q", 0)
    results: Any = context.Queue()
    threads = max(1, torch.get_num_threads() // workers)
    procs = [context.Process(target=_worker, args=(work, count, taken, results, threads, os.getpid()),
                             daemon=True, name=f"ddpm-sampling-{w}") for w in range(workers)]
    images: dict[int, torch.Tensor] = {}
    try:
        for p in procs:
            p.start()
        while len(images) < count:
            try:
                message = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                _check_alive(procs, count - len(images))
                continue
            kind = message[0]
            if kind == "progress":
                progress(message[1])
            elif kind == "batch":
                images[message[1]] = torch.from_numpy(message[2])
            else:  # "error": the worker's exception, pickled where it could be
                raise _unpickled(message[1], message[2])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        results.close()
    return [images[i] for i in range(count)]


def _worker(work: BatchWork, count: int, taken: Any, results: Any, threads: int,
            parent: int) -> None:
    """A worker process: the next batch not ``taken`` until all ``count`` are, its results to
    ``results``; it ends itself at its next network evaluation once ``parent`` has gone (killed
    by a SIGTERM of its own, say), rather than sampling on for no one."""

    def report(k: int) -> None:
        if os.getppid() != parent:
            os._exit(1)
        results.put(("progress", k))

    def take() -> int | None:
        with taken.get_lock():
            index = taken.value
            taken.value += 1
        return index if index < count else None

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's, which stops us
        torch.set_num_threads(threads)
        with torch.inference_mode():
            while (index := take()) is not None:
                images = work(index, report)
                results.put(("batch", index, images.numpy()))
    except BaseException as exc:  # everything goes back to the parent, which decides
        try:
            payload = pickle.dumps(exc)
        except Exception:
            payload = None
        results.put(("error", payload, f"{type(exc).__name__}: {exc}"))
    finally:
        results.close()
        results.join_thread()  # everything sent before the process ends


def _check_alive(procs: list[Any], missing: int) -> None:
    """Raise :class:`WorkerError` if a worker ended without being asked to."""
    for p in procs:
        if not p.is_alive() and p.exitcode != 0:
            code = p.exitcode
            how = (f"was killed by signal {-code} ({_signal_name(-code)})" if code < 0
                   else f"exited with code {code}")
            raise WorkerError(f"a sampling worker process {how} with {missing} batch"
                              f"{'es' if missing != 1 else ''} still to do; if the machine ran out "
                              f"of memory, lower --batch-size or --workers")
    if all(not p.is_alive() for p in procs):
        raise WorkerError(f"every sampling worker process ended with {missing} batch"
                          f"{'es' if missing != 1 else ''} still to do")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "a signal without a name"


def _unpickled(payload: bytes | None, text: str) -> BaseException:
    """The exception a worker raised, or a :class:`WorkerError` that quotes it."""
    if payload is not None:
        try:
            exc = pickle.loads(payload)
            if isinstance(exc, BaseException):
                return exc
        except Exception:
            pass
    return WorkerError(f"a sampling worker process failed: {text}")
