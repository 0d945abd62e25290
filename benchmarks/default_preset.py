"""Speed figures of a preset on this machine: parameters, training images/s, time to sample 64.

    python benchmarks/default_preset.py [--preset fashion-cpu] [--train-steps 30] [--precision bf16]

Training images/s times whole optimiser steps (forward, backward, clip, AdamW, EMA) on real
Fashion-MNIST batches after 3 warm-up steps. Sampling times 64 images with the preset's default
ancestral sampler at 1000 steps and at the 100 respaced steps the preset uses. The weights are
untrained: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ddpm import get_preset, with_overrides
from ddpm.data import load_dataset
from ddpm.models import count_parameters
from ddpm.pipeline import Pipeline
from ddpm.runtime import make_accelerator, resolve_device
from ddpm.train import build_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fashion-cpu")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--sample-steps", type=int, nargs="*", default=[1000, 100])
    ap.add_argument("--precision", default=None, help="override the preset's precision")
    args = ap.parse_args()

    config = with_overrides(get_preset(args.preset),
                            {"train": {"precision": args.precision}} if args.precision else {})
    device = resolve_device(config.train.device)
    # The set-up of 'ddpm train' itself: network, AdamW, EMA, the data stream.
    run = build_training(config, make_accelerator(device), device,
                         lambda: load_dataset(config.data.dataset, config.data.data_dir, "train"))

    def step() -> None:
        run.update(run.next_batches(), config.train.lr)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    train_ips = args.train_steps * config.train.batch_size / (time.perf_counter() - t0)

    pipe = Pipeline(run.ema.model, run.schedule, config, 0, device, run.precision)
    sample_s = {}
    for steps in args.sample_steps:
        t0 = time.perf_counter()
        pipe.generate(64, num_sample_steps=steps)
        sample_s[steps] = round(time.perf_counter() - t0, 2)

    print(json.dumps({
        "preset": args.preset,
        "precision": run.precision,
        "params": count_parameters(run.net),
        "train_images_per_s": round(train_ips, 1),
        "seconds_to_sample_64": sample_s,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
