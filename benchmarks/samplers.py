"""Every sampler at 10, 20, 50, 100 and 1000 steps: closed-form error and wall time.

    python benchmarks/samplers.py [--checkpoint runs/demo] [--n 64] [--grid samplers.png]

Quality, until `ddpm eval` exists, is measured where the answer is known in closed form: data from
a two-component Gaussian mixture in 4x4 images (weights 0.3/0.7, means -0.5/+0.5, std 0.2), the
exact optimal denoiser, 3,000 images. Reported: the error of the first component's weight, and the
relative error of the within-component std (the quantity discretisation hurts first). Wall time
is for `--n` images of the given checkpoint's model (or the default preset's, untrained: speed
does not depend on the weights) on this machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torchvision.utils import save_image

from ddpm import get_preset
from ddpm.models import UNet
from ddpm.pipeline import Pipeline, build_schedule, load_pipeline
from ddpm.samplers import SAMPLERS, get_sampler, initial_noise, sampler_spec
from ddpm.schedules import make_schedule
from ddpm.timesteps import make_timesteps
from ddpm.toy import mixture_denoiser
from ddpm.viz import grid_image

STEPS = (10, 20, 50, 100, 1000)
GRID_SETTINGS = (("ddpm", 1000), ("ddpm", 100), ("ddim", 50), ("dpm++", 20), ("heun", 10))
WEIGHTS, MEANS, STDS = (0.3, 0.7), (-0.5, 0.5), (0.2, 0.2)


def toy_errors(name: str, steps: int) -> tuple[float, float]:
    schedule = make_schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    ts = make_timesteps(1000, steps, sampler_spec(name).default_spacing, schedule=schedule)
    x = get_sampler(name)(mixture_denoiser(schedule, WEIGHTS, MEANS, STDS), schedule,
                          initial_noise((3000, 1, 4, 4), g), ts, generator=g, x0_transform=None)
    first = x.flatten(1).mean(1) < 0
    weight_err = first.float().mean().item() - WEIGHTS[0]
    std_err = 0.5 * (x[first].std().item() + x[~first].std().item()) / STDS[0] - 1
    return weight_err, std_err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="run directory or checkpoint to time")
    ap.add_argument("--n", type=int, default=64, help="images per timing")
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    ap.add_argument("--samplers", nargs="*", default=list(SAMPLERS), choices=SAMPLERS,
                    help="only these samplers")
    ap.add_argument("--grid", default=None,
                    help="also write a side-by-side PNG of 36 images (seed 0) per sampler setting "
                         "in GRID_SETTINGS, from the checkpoint")
    args = ap.parse_args()
    if args.checkpoint:
        pipe = load_pipeline(args.checkpoint, device="cpu")
    else:
        config = get_preset("fashion-cpu")
        pipe = Pipeline(UNet(config.model).eval(), build_schedule(config), config, 0,
                        torch.device("cpu"))
    if args.grid:
        grids = []
        for name, steps in GRID_SETTINGS:
            t0 = time.perf_counter()
            grids.append(grid_image(pipe.generate(36, seed=0, sampler=name, num_sample_steps=steps), 6))
            print(f"grid: {name} {steps} steps, {time.perf_counter() - t0:.1f} s for 36 images")
        gap = torch.ones(grids[0].shape[0], grids[0].shape[1], 8)  # white column between blocks
        save_image(torch.cat([torch.cat([g, gap], 2) for g in grids], 2), args.grid)
    rows = []
    for name in args.samplers:
        for steps in STEPS:
            weight_err, std_err = toy_errors(name, steps)
            t0 = time.perf_counter()
            pipe.generate(args.n, sampler=name, num_sample_steps=steps, batch_size=args.n)
            seconds = time.perf_counter() - t0
            nfe = 2 * steps - 1 if name == "heun" else steps
            rows.append({"sampler": name, "steps": steps, "nfe": nfe,
                         "toy_weight_error": round(weight_err, 4),
                         "toy_std_rel_error": round(std_err, 4),
                         f"seconds_for_{args.n}": round(seconds, 2)})
            if args.json:
                print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print(f"| sampler | steps | NFE | toy weight error | toy std error | s for {args.n} images |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['toy_weight_error']:+.3f} | "
                  f"{100 * r['toy_std_rel_error']:+.1f}% | {r[f'seconds_for_{args.n}']:.1f} |")


if __name__ == "__main__":
    main()
