"""How fast this machine trains and samples a model, and how much of its matmul peak that uses.

``ddpm bench`` runs the real training step (``train.train_step`` with the data stream, AdamW
and the EMA update, exactly as ``ddpm train`` does) on synthetic images for a few seconds, the
sampling network evaluation, counts the FLOPs of both with torch's FLOP counter, and measures
this machine's peak dense matmul rate in float32 and bfloat16, so the utilisation it reports is
against a ceiling measured here rather than a datasheet.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .config import RunConfig
from .data import ImageData
from .models import count_parameters
from .pipeline import Pipeline, sampling_probe
from .runtime import (
    autocast,
    make_accelerator,
    precision_and_reason,
    processor_name,
    resolve_device,
    torch_state_kept,
)
from .train import Training, build_training


@dataclass(frozen=True)
class BenchResult:
    params: int
    batch_size: int
    precision: str  # what the run computes in: the asked one, or auto's choice
    precision_why: str  # how it was chosen ("as asked", "auto: bf16 measured 1.60x fp32 here")
    sample_precision: str  # what sampling computes in, chosen the same way for its step
    sample_precision_why: str
    threads: int
    device: str
    train_images_per_s: float  # in ``precision``
    train_steps: int  # timed optimiser steps in ``precision``
    sample_batch_size: int
    # in ``sample_precision``: images through one network evaluation a second
    sample_images_per_s: float
    # fp32, bf16 (and fp16 when used): {"train": images/s, "sample": images/s}
    rates: dict[str, dict[str, float]]
    forward_gflops_per_image: float  # counted by torch's FLOP counter (matmuls and convolutions)
    train_gflops_per_image: float  # forward + backward of the training step, counted likewise
    achieved_gflops: float  # train_gflops_per_image * train_images_per_s
    peak_gflops_fp32: float
    peak_gflops_bf16: float
    utilisation: float  # achieved / the faster of the two measured peaks
    cpu: str
    torch: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(step: Callable[[], Any], seconds: float, warmup: int,
           sync: Callable[[], None]) -> tuple[int, float]:
    """Run ``step`` ``warmup`` times, then for at least ``seconds``; returns (calls, seconds)."""
    for _ in range(warmup):
        step()
    sync()
    calls, begin = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - begin < seconds:
        step()
        calls += 1
    sync()
    return calls, time.perf_counter() - begin


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def peak_matmul_gflops(dtype: torch.dtype, device: torch.device, *, seconds: float = 2.0,
                       sizes: tuple[int, ...] = (512, 1024, 2048, 4096)) -> float:
    """The best dense n x n matmul rate over growing n (2 n^3 FLOPs a product): the ceiling a
    network can reach. Growth stops once one product takes a tenth of ``seconds``, so a dtype
    without hardware support (bfloat16 on a CPU without AVX-512 BF16 or AMX, where a 2048 product
    takes a minute) costs seconds, not minutes."""
    sync, best = _synchronizer(device), 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        product = functools.partial(torch.mm, a, b, out=out)  # binds this n's tensors
        calls, elapsed = _timed(product, seconds / len(sizes), 1, sync)
        best = max(best, 2 * n**3 * calls / elapsed / 1e9)
        if elapsed / calls > seconds / 10:
            break
    return best


def count_gflops(fn: Callable[[], Any]) -> float:
    """GFLOPs of the matmuls and convolutions ``fn`` runs (FLOP = multiply or add)."""
    # (imported here: it imports triton, 0.2 s of every ddpm command's start-up otherwise)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def _synthetic_data(config: RunConfig, n: int) -> ImageData:
    m = config.model
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, m.in_channels, m.image_size, m.image_size), generator=g,
                           dtype=torch.uint8)
    return ImageData(images=images, labels=torch.zeros(n, dtype=torch.long), name="synthetic")


def bench(
    config: RunConfig,
    *,
    seconds: float = 5.0,
    sample_batch_size: int = 128,
    peak_seconds: float = 2.0,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Measure ``config``'s training step and sampling evaluation on its device, in fp32 and in
    bf16 (``seconds`` each), and say which of them ``config``'s precision takes (``auto``: the
    measurement that training and sampling make, ``autoprecision``). The network, optimiser and
    data stream are built as ``ddpm train`` builds them (``train.build_training``), on synthetic
    images."""
    tc = config.train
    device = resolve_device(tc.device)
    with torch_state_kept():
        run = build_training(config, make_accelerator(device), device,
                             lambda: _synthetic_data(config, 8 * tc.batch_size))
        sync = _synchronizer(device)
        ema = run.ema
        assert ema is not None  # build_training keeps one by default
        sampling = Pipeline(ema.model, run.schedule, config, 0, device)
        x, t, cond = sampling.probe_input(sample_batch_size)
        sample_precision, sample_why = precision_and_reason(tc.precision, device,
                                                            sampling_probe(sampling))
        rates: dict[str, dict[str, float]] = {}
        steps: dict[str, int] = {}
        # fp16 (CUDA only) is timed too when the run or sampling computes in it
        used = {run.precision, sample_precision}
        for precision in ("fp32", "bf16", *(("fp16",) if "fp16" in used else ())):
            progress(f"training step: batch {tc.batch_size}x{tc.grad_accum}, {precision}, "
                     f"{torch.get_num_threads()} threads, {seconds:g} s")
            timed_run = dataclasses.replace(run, precision=precision,
                                            scaler=run.scaler if precision == "fp16" else None)

            def one_training_step(run: Training = timed_run) -> None:
                run.update(run.next_batches(), tc.lr)

            run.model.train()
            steps[precision], elapsed = _timed(one_training_step, seconds, 3, sync)
            train_rate = steps[precision] * tc.batch_size * tc.grad_accum / elapsed

            progress(f"sampling evaluation: batch {sample_batch_size}, {precision}, {seconds:g} s")

            def one_evaluation(precision: str = precision) -> None:
                with torch.inference_mode(), autocast(device, precision):
                    ema.model(x, t, **cond)

            calls, elapsed = _timed(one_evaluation, seconds, 2, sync)
            rates[precision] = {"train": train_rate, "sample": calls * sample_batch_size / elapsed}
        # Counted on the plain network: a compiled one computes the same products.
        plain = dataclasses.replace(run, model=run.net)
        train_gflops = count_gflops(lambda: plain.update(plain.next_batches(), tc.lr)) / (
            tc.batch_size * tc.grad_accum)
        forward_gflops = count_gflops(lambda: ema.model(x, t, **cond)) / sample_batch_size

        progress(f"peak matmul: float32 and bfloat16, {peak_seconds:g} s each")
        peak32 = peak_matmul_gflops(torch.float32, device, seconds=peak_seconds)
        peak16 = peak_matmul_gflops(torch.bfloat16, device, seconds=peak_seconds)
        threads = torch.get_num_threads()
    train_rate, sample_rate = rates[run.precision]["train"], rates[sample_precision]["sample"]
    achieved = train_gflops * train_rate
    return BenchResult(
        params=count_parameters(run.net), batch_size=tc.batch_size, precision=run.precision,
        precision_why=run.precision_why, sample_precision=sample_precision, sample_precision_why=sample_why,
        threads=threads, device=str(device),
        train_images_per_s=train_rate, train_steps=steps[run.precision],
        sample_batch_size=sample_batch_size, sample_images_per_s=sample_rate, rates=rates,
        forward_gflops_per_image=forward_gflops, train_gflops_per_image=train_gflops,
        achieved_gflops=achieved, peak_gflops_fp32=peak32, peak_gflops_bf16=peak16,
        utilisation=achieved / max(peak32, peak16), cpu=processor_name(device),
        torch=torch.__version__,
    )


def format_table(r: BenchResult) -> str:
    f32, b16 = r.rates["fp32"], r.rates["bf16"]
    rows = [
        ("machine", f"{r.cpu}, {r.threads} threads, torch {r.torch}"),
        ("model", f"{r.params:,} parameters"),
        ("training", f"{f32['train']:,.1f} images/s in fp32, {b16['train']:,.1f} in bf16 "
                     f"({b16['train'] / f32['train']:.2f}x; batch {r.batch_size})"),
        ("", f"trains in {r.precision} ({r.precision_why})"),
        ("sampling", f"{f32['sample']:,.1f} images/s per network evaluation in fp32, "
                     f"{b16['sample']:,.1f} in bf16 ({b16['sample'] / f32['sample']:.2f}x; batch "
                     f"{r.sample_batch_size})"),
        ("", f"samples in {r.sample_precision} ({r.sample_precision_why}): "
             f"{r.sample_images_per_s / 20:,.1f} images/s with 20 steps"),
        ("FLOPs", f"{r.forward_gflops_per_image:.4f} GFLOPs forward, "
                  f"{r.train_gflops_per_image:.4f} GFLOPs per training image"),
        ("achieved", f"{r.achieved_gflops:,.1f} GFLOP/s in the training step ({r.precision})"),
        ("peak matmul", f"{r.peak_gflops_fp32:,.1f} GFLOP/s float32, "
                        f"{r.peak_gflops_bf16:,.1f} GFLOP/s bfloat16"),
        ("utilisation", f"{r.utilisation:.1%} of the faster peak"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
