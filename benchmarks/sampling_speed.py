"""Where the time of 'ddpm sample --n 1000' (DPM-Solver++, 20 steps) goes on this CPU, and what
each inference option does to it.

    python benchmarks/sampling_speed.py RUN [--n 256] [--repeats 2] [--whole]

Each variant generates ``--n`` images with DPM-Solver++ at 20 steps from RUN's EMA model in this
process (after one untimed batch), ``--repeats`` times with the variants interleaved so that a
slow minute of a shared machine falls on all of them; the table gives the best rate of each, in
images per second, and the ratio to the first row. The variants are the levers a slow CPU
sampler is looked at for: the precision (bf16 autocast, or weights cast to bf16 outright), the
batch size, torch's thread count, the channels-last layout, and the denormal flush. The
worker-process rows split the batches over two forked one-thread processes (``--workers``). With
``--whole``, the whole command is timed too ('ddpm sample RUN --n 1000 --out DIR'), in a fresh
process, as a user runs it: import, load, auto's measurement (cached after the first), sampling
and writing the files; once with ``--workers 1`` and once as it comes (``--workers auto``),
interleaved, ``--whole-repeats`` pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import subprocess
import sys
import tempfile
import time

import torch


def variants(pipe) -> dict[str, tuple[dict, contextlib.AbstractContextManager]]:
    """name -> (generate() options, a context that sets the lever and puts it back)."""

    @contextlib.contextmanager
    def threads(n):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @contextlib.contextmanager
    def precision(p):
        before = pipe.precision
        pipe.precision = p
        try:
            yield
        finally:
            pipe.precision = before

    @contextlib.contextmanager
    def channels_last():
        pipe.model.to(memory_format=torch.channels_last)
        try:
            with precision("bf16"):
                yield
        finally:
            pipe.model.to(memory_format=torch.contiguous_format)

    @contextlib.contextmanager
    def flush_denormal():
        torch.set_flush_denormal(True)
        try:
            with precision("bf16"):
                yield
        finally:
            torch.set_flush_denormal(False)

    return {
        "bf16 autocast, batch 128 (ddpm sample's default)": ({"batch_size": 128}, precision("bf16")),
        "fp32, batch 128": ({"batch_size": 128}, precision("fp32")),
        "bf16, batch 64": ({"batch_size": 64}, precision("bf16")),
        "bf16, batch 256": ({"batch_size": 256}, precision("bf16")),
        "bf16, one batch of all": ({"batch_size": 10**6}, precision("bf16")),
        "bf16, 1 thread": ({"batch_size": 128}, _both(threads(1), precision("bf16"))),
        "bf16, 2 worker processes": ({"batch_size": 128, "workers": 2}, precision("bf16")),
        "bf16, 2 worker processes, batch 64": ({"batch_size": 64, "workers": 2}, precision("bf16")),
        "bf16, channels-last": ({"batch_size": 128}, channels_last()),
        "bf16, flush denormals": ({"batch_size": 128}, flush_denormal()),
    }


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run directory or checkpoint (its weights do not matter)")
    parser.add_argument("--n", type=int, default=256, help="images per timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--whole", action="store_true",
                        help="also time the whole 'ddpm sample --n 1000' command, with one "
                             "process and with auto's workers")
    parser.add_argument("--whole-repeats", type=int, default=2, metavar="K",
                        help="--whole: interleaved pairs of runs")
    parser.add_argument("--whole-only", action="store_true",
                        help="time only the whole command (no in-process variants)")
    args = parser.parse_args()
    if args.whole_only:
        args.whole, args.repeats = True, 0

    from ddpm.pipeline import load_pipeline
    from ddpm.runtime import processor_name

    pipe = load_pipeline(args.run, precision="auto")
    print(f"{time.strftime('%Y-%m-%d')}, {processor_name(torch.device('cpu'))}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python "
          f"{platform.python_version()}; auto chose {pipe.precision} ({pipe.precision_why})",
          flush=True)
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, (options, lever) in variants(pipe).items():
            with lever:
                pipe.generate(min(args.n, options["batch_size"]), sampler="dpm++",
                              num_sample_steps=20, **options)  # untimed: kernels, caches
                begin = time.perf_counter()
                pipe.generate(args.n, sampler="dpm++", num_sample_steps=20, **options)
                rate = args.n / (time.perf_counter() - begin)
            best[name] = max(best.get(name, 0.0), rate)
            print(f"  repeat {repeat + 1}: {name}: {rate:.1f} images/s", flush=True)
    if best:
        first = next(iter(best.values()))
        print("\n| variant | images/s (DPM-Solver++ 20 steps) | vs first | 1,000 images |")
        print("|---|---|---|---|")
        for name, rate in best.items():
            print(f"| {name} | {rate:.1f} | {rate / first:.2f}x | {1000 / rate:.1f} s |")
    if args.whole:
        whole_commands(args.run, args.whole_repeats)


def whole_commands(run: str, repeats: int) -> None:
    """The whole 'ddpm sample RUN --n 1000' with one process and with auto's workers, ``repeats``
    interleaved pairs, each in a fresh process; its sampling seconds as its summary line says."""
    times: dict[str, list[str]] = {"1": [], "auto": []}
    for attempt in range(repeats):
        for workers in times:
            with tempfile.TemporaryDirectory() as out:
                begin = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-m", "ddpm", "sample", run, "--n", "1000", "--sampler",
                     "dpm++", "--steps", "20", "--workers", workers, "--out", out, "--no-progress"],
                    check=True, capture_output=True, text=True)
                seconds = time.perf_counter() - begin
            summary = done.stdout.strip().splitlines()[-1]  # 'wrote 1000 images (..., 15.0 s) to'
            sampling = summary.split(" to ")[0].rsplit(", ", 1)[-1].rstrip(")")
            times[workers].append(f"{seconds:.1f} s (sampling {sampling})")
            print(f"whole command, --workers {workers}, run {attempt + 1}: {times[workers][-1]}; "
                  f"{summary}", flush=True)
    print("\n| ddpm sample --n 1000 --sampler dpm++ --steps 20 | the whole command, each run |")
    print("|---|---|")
    for workers, runs in times.items():
        print(f"| --workers {workers} | {'; '.join(runs)} |")


if __name__ == "__main__":
    main()
