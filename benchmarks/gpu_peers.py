"""GPU speed against diffusers, and short Fashion-MNIST runs of fashion-cpu and fashion-gpu.

    python benchmarks/gpu_peers.py                 # on a GPU: every figure
    python benchmarks/gpu_peers.py --quick         # small sizes, seconds: tries the script anywhere

In one run:

1. The DDPM paper's CIFAR-10 U-Net (the model of the cifar10-ddpm preset, 35.7M parameters) in
   ddpm (``ddpm.bench``, the real training step: data, forward, backward, AdamW, EMA) and in
   diffusers' UNet2DModel with the same layer shapes (a plain loop: forward, MSE on eps,
   backward, clip, fused AdamW, EMA as one foreach lerp), both under bf16 autocast: training
   images/s at each --batches, the sampling network's images/s at batch --sample-batch, and
   utilisation: training FLOP/s (counted by torch's FLOP counter on our network; the same shapes
   make the same products) over the measured bf16 matmul peak.
2. ``ddpm train --preset fashion-cpu|fashion-gpu --minutes M`` then ``ddpm eval RUN --n N
   --sampler dpm++ --steps 20``, on this machine's default device.

It prints a Markdown table and writes one JSON line per row to --out. diffusers is the optional
[bench] extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpm import get_preset, with_overrides
from ddpm.bench import _timed, bench, peak_matmul_gflops
from ddpm.runtime import processor_name, resolve_device


def cifar_config(quick: bool, batch: int, device: str):
    config = get_preset("cifar10-ddpm")
    model = config.model if not quick else dataclasses.replace(config.model, base_channels=32,
                                                               num_res_blocks=1)
    config = dataclasses.replace(config, model=model)
    return with_overrides(config, {"train": {"batch_size": batch, "precision": "bf16",
                                             "device": device}})


def diffusers_unet(config):
    """UNet2DModel with the layer shapes of ddpm's U-Net for ``config.model``."""
    from diffusers import UNet2DModel

    m = config.model
    sizes = m.level_sizes()
    down = tuple("AttnDownBlock2D" if s in m.attention_resolutions else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in m.attention_resolutions else "UpBlock2D"
               for s in reversed(sizes))
    return UNet2DModel(sample_size=m.image_size, in_channels=m.in_channels,
                       out_channels=m.in_channels, layers_per_block=m.num_res_blocks,
                       block_out_channels=tuple(m.base_channels * k for k in m.channel_mults),
                       down_block_types=down, up_block_types=up, norm_num_groups=m.norm_groups,
                       attention_head_dim=m.attention_head_dim, dropout=m.dropout)


def diffusers_speed(config, device: torch.device, seconds: float, sample_batch: int) -> dict:
    """Training and sampling images/s of diffusers' UNet2DModel, bf16 autocast."""
    model = diffusers_unet(config).to(device)
    ema = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=device.type in ("cpu", "cuda"))
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, device=device), 0)
    b, m = config.train.batch_size, config.model
    x0 = torch.randn(b, m.in_channels, m.image_size, m.image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step() -> None:
        t = torch.randint(0, 1000, (b,), device=device)
        eps = torch.randn_like(x0)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1e-4)

    model.train()
    steps, elapsed = _timed(train_step, seconds, 3, sync)
    x = torch.randn(sample_batch, m.in_channels, m.image_size, m.image_size, device=device)
    t = torch.full((sample_batch,), 500, device=device)

    def evaluate() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x, t)

    model.eval()
    calls, sample_elapsed = _timed(evaluate, seconds, 2, sync)
    return {"params": sum(p.numel() for p in model.parameters()),
            "train_images_per_s": steps * b / elapsed,
            "sample_images_per_s": calls * sample_batch / sample_elapsed}


def ddpm_cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ddpm {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="each speed measurement")
    ap.add_argument("--batches", default="128,512", help="training batches, comma-separated")
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--minutes", type=float, default=5.0, help="each Fashion-MNIST run")
    ap.add_argument("--n", type=int, default=10_000, help="images each FID is measured on")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-runs", action="store_true", help="speed only")
    ap.add_argument("--quick", action="store_true",
                    help="a small U-Net, batches 8,16, 1 s, 0.1 minutes, n = 128: to try it")
    ap.add_argument("--out", default="gpu_peers.jsonl")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.batches, args.sample_batch = 1.0, "8,16", 16
        args.minutes, args.n = 0.1, 128
    device = resolve_device(args.device)
    rows = []
    peak = peak_matmul_gflops(torch.bfloat16, device, seconds=2.0)
    for batch in (int(b) for b in args.batches.split(",")):
        config = cifar_config(args.quick, batch, str(device))
        ours = bench(config, seconds=args.seconds, sample_batch_size=args.sample_batch,
                     peak_seconds=0.5)
        theirs = diffusers_speed(config, device, args.seconds, args.sample_batch)
        flops = ours.train_gflops_per_image
        rows.append({
            "what": f"CIFAR-10 U-Net, batch {batch}", "params_ddpm": ours.params,
            "params_diffusers": theirs["params"],
            "train_ddpm": ours.train_images_per_s, "train_diffusers": theirs["train_images_per_s"],
            "sample_ddpm": ours.sample_images_per_s, "sample_diffusers": theirs["sample_images_per_s"],
            "utilisation_ddpm": flops * ours.train_images_per_s / peak,
            "utilisation_diffusers": flops * theirs["train_images_per_s"] / peak,
        })
        print(json.dumps(rows[-1]), flush=True)
    runs = []
    if not args.skip_runs:
        with tempfile.TemporaryDirectory() as work:
            for preset in ("fashion-cpu", "fashion-gpu"):
                run = Path(work) / preset
                begin = time.perf_counter()
                ddpm_cli("train", "--preset", preset, "--minutes", str(args.minutes), "--fid-every",
                         "0", "--sample-every", "0", "--device", str(device), "--out", str(run),
                         "--no-progress")
                trained = time.perf_counter() - begin
                score = json.loads(ddpm_cli("eval", str(run), "--n", str(args.n), "--sampler",
                                            "dpm++", "--steps", "20", "--json", "--no-progress",
                                            "--device", str(device)).strip().splitlines()[-1])
                steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
                runs.append({"preset": preset, "minutes": args.minutes, "steps": steps,
                             "train_s": trained, "fid": score["fid"], "floor_fid": score["floor_fid"],
                             "n": score["n"]})
                print(json.dumps(runs[-1]), flush=True)
    with open(args.out, "a") as f:
        for row in rows + runs:
            f.write(json.dumps({**row, "device": processor_name(device), "torch": torch.__version__,
                                "date": time.strftime("%Y-%m-%d")}) + "\n")
    print(f"\n{processor_name(device)}, torch {torch.__version__}, bf16 peak {peak:,.0f} GFLOP/s\n")
    print("| what | ddpm img/s | diffusers img/s | ratio | ddpm util. | diffusers util. |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| training, {r['what']} | {r['train_ddpm']:,.0f} | {r['train_diffusers']:,.0f} | "
              f"{r['train_ddpm'] / r['train_diffusers']:.2f}x | {r['utilisation_ddpm']:.1%} | "
              f"{r['utilisation_diffusers']:.1%} |")
        print(f"| sampling forward, batch {args.sample_batch} | {r['sample_ddpm']:,.0f} | "
              f"{r['sample_diffusers']:,.0f} | {r['sample_ddpm'] / r['sample_diffusers']:.2f}x | | |")
    if runs:
        print("\n| preset | minutes | steps | FID | floor | n |\n|---|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['preset']} | {r['minutes']:g} | {r['steps']:,} | {r['fid']:.2f} | "
                  f"{r['floor_fid']:.2f} | {r['n']:,} |")


if __name__ == "__main__":
    main()
