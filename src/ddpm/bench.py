"""How fast this machine trains and samples a model, and how much of its matmul peak that uses.

``ddpm bench`` runs the real training step (``train.train_step`` with the data stream, AdamW
and the EMA update, exactly as ``ddpm train`` does) on synthetic images for a few seconds, the
sampling network evaluation, counts the FLOPs of both with torch's FLOP counter, and measures
this machine's peak dense matmul rate in float32 and bfloat16, so the utilisation it reports is
against a ceiling measured here rather than a datasheet.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import RunConfig
from .data import ImageData
from .models import count_parameters
from .runtime import autocast, make_accelerator, processor_name, resolve_device, torch_state_kept
from .train import Training, build_training


@dataclass(frozen=True)
class BenchResult:
    params: int
    batch_size: int
    precision: str
    threads: int
    device: str
    train_images_per_s: float
    train_steps: int  # timed optimiser steps
    sample_batch_size: int
    sample_images_per_s: float  # images through one network evaluation per second
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


def _timed(step: Callable[[], Any], seconds: float, warmup: int, sync: Callable[[], None]) -> tuple[int, float]:
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
        calls, elapsed = _timed(lambda: torch.mm(a, b, out=out), seconds / len(sizes), 1, sync)
        best = max(best, 2 * n**3 * calls / elapsed / 1e9)
        if elapsed / calls > seconds / 10:
            break
    return best


def count_gflops(fn: Callable[[], Any]) -> float:
    """GFLOPs of the matmuls and convolutions ``fn`` runs (FLOP = multiply or add)."""
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
    seconds: float = 10.0,
    sample_batch_size: int = 128,
    peak_seconds: float = 2.0,
    progress: Callable[[str], None] = lambda message: None,
) -> BenchResult:
    """Measure ``config``'s training step and sampling evaluation on its device and precision.
    The network, optimiser and data stream are built as ``ddpm train`` builds them
    (``train.build_training``), on synthetic images."""
    tc = config.train
    device = resolve_device(tc.device)
    with torch_state_kept():
        run = build_training(config, make_accelerator(device), device,
                             lambda: _synthetic_data(config, 8 * tc.batch_size))
        sync = _synchronizer(device)

        def one_training_step(run: Training = run) -> None:
            run.update(run.next_batches(), tc.lr)

        progress(f"training step: batch {tc.batch_size}x{tc.grad_accum}, {run.precision}, "
                 f"{torch.get_num_threads()} threads, {seconds:g} s")
        run.model.train()
        steps, elapsed = _timed(one_training_step, seconds, 3, sync)
        train_images_per_s = steps * tc.batch_size * tc.grad_accum / elapsed
        # Counted on the plain network: a compiled one computes the same products.
        plain = dataclasses.replace(run, model=run.net)
        train_gflops = count_gflops(lambda: one_training_step(plain)) / (tc.batch_size * tc.grad_accum)

        progress(f"sampling evaluation: batch {sample_batch_size}, {seconds:g} s")
        sampling_net = run.ema.model
        m = config.model
        x = torch.randn(sample_batch_size, m.in_channels, m.image_size, m.image_size, device=device)
        t = torch.full((sample_batch_size,), run.schedule.num_train_timesteps // 2, device=device)

        def one_evaluation() -> None:
            with torch.inference_mode(), autocast(device, run.precision):
                sampling_net(x, t)

        calls, elapsed = _timed(one_evaluation, seconds, 2, sync)
        sample_images_per_s = calls * sample_batch_size / elapsed
        forward_gflops = count_gflops(one_evaluation) / sample_batch_size

        progress(f"peak matmul: float32 and bfloat16, {peak_seconds:g} s each")
        peak32 = peak_matmul_gflops(torch.float32, device, seconds=peak_seconds)
        peak16 = peak_matmul_gflops(torch.bfloat16, device, seconds=peak_seconds)
        threads = torch.get_num_threads()
    achieved = train_gflops * train_images_per_s
    return BenchResult(
        params=count_parameters(run.net), batch_size=tc.batch_size, precision=run.precision,
        threads=threads, device=str(device),
        train_images_per_s=train_images_per_s, train_steps=steps,
        sample_batch_size=sample_batch_size, sample_images_per_s=sample_images_per_s,
        forward_gflops_per_image=forward_gflops, train_gflops_per_image=train_gflops,
        achieved_gflops=achieved, peak_gflops_fp32=peak32, peak_gflops_bf16=peak16,
        utilisation=achieved / max(peak32, peak16), cpu=processor_name(device),
        torch=torch.__version__,
    )


def format_table(r: BenchResult) -> str:
    rows = [
        ("machine", f"{r.cpu}, {r.threads} threads, torch {r.torch}"),
        ("model", f"{r.params:,} parameters"),
        ("training", f"{r.train_images_per_s:,.1f} images/s (batch {r.batch_size}, {r.precision}, "
                     f"{r.train_steps} steps timed)"),
        ("sampling", f"{r.sample_images_per_s:,.1f} images/s per network evaluation "
                     f"(batch {r.sample_batch_size}): {r.sample_images_per_s / 20:,.1f} images/s "
                     f"with 20 steps"),
        ("FLOPs", f"{r.forward_gflops_per_image:.4f} GFLOPs forward, "
                  f"{r.train_gflops_per_image:.4f} GFLOPs per training image"),
        ("achieved", f"{r.achieved_gflops:,.1f} GFLOP/s in the training step"),
        ("peak matmul", f"{r.peak_gflops_fp32:,.1f} GFLOP/s float32, "
                        f"{r.peak_gflops_bf16:,.1f} GFLOP/s bfloat16"),
        ("utilisation", f"{r.utilisation:.1%} of the faster peak"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
