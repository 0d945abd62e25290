"""Speed figures of a preset on this machine: parameters, training images/s, time to sample 64.

    python benchmarks/default_preset.py [--preset fashion-cpu] [--train-steps 30] [--precision bf16]

Training images/s times whole optimiser steps (forward, backward, clip, AdamW, EMA) on real
Fashion-MNIST batches after 3 warm-up steps. Sampling times 64 images with the preset's default
ancestral sampler at 1000 steps and at the 100 respaced steps the preset uses. The weights are untrained: speed
does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from ddpm import get_preset
from ddpm.data import BatchStream, load_dataset
from ddpm.models import count_parameters
from ddpm.pipeline import Pipeline, build_schedule, resolve_device
from ddpm.train import EMA, build_training, make_accelerator, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fashion-cpu")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--sample-steps", type=int, nargs="*", default=[1000, 100])
    ap.add_argument("--precision", default=None, help="override the preset's precision")
    args = ap.parse_args()

    config = get_preset(args.preset)
    if args.precision:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, precision=args.precision))
    device = resolve_device(config.train.device)
    schedule = build_schedule(config)
    accelerator = make_accelerator(config.train.precision, device)
    model, _, opt = build_training(config, accelerator, device)
    ema = EMA(model, config.train.ema_decay)
    data = load_dataset(config.data.dataset, config.data.data_dir, "train")
    stream = BatchStream(data, config.train.batch_size, hflip=config.data.hflip,
                         generator=torch.Generator().manual_seed(0))
    noise = torch.Generator().manual_seed(1)

    def step() -> None:
        train_step(model, schedule, opt, [stream.next()], accelerator=accelerator, generator=noise,
                   config=config, device=device, lr=config.train.lr)
        ema.update(model)

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    train_ips = args.train_steps * config.train.batch_size / (time.perf_counter() - t0)

    pipe = Pipeline(ema.model, schedule, config, 0, device, config.train.precision)
    sample_s = {}
    for steps in args.sample_steps:
        t0 = time.perf_counter()
        pipe.generate(64, num_sample_steps=steps)
        sample_s[steps] = round(time.perf_counter() - t0, 2)

    print(json.dumps({
        "preset": args.preset,
        "precision": config.train.precision,
        "params": count_parameters(model),
        "train_images_per_s": round(train_ips, 1),
        "seconds_to_sample_64": sample_s,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
