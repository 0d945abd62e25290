"""Variants of the default preset at an equal training time: FID of each after the same minutes.

    python benchmarks/equal_time.py --minutes 10 --n 1000 [--only resnet,convnext] [--work runs/arch]
    python benchmarks/equal_time.py --steps 450 --only eps,v-min-snr-no-hflip --work runs/recipe

The variants change the U-Net's shape (the architecture comparison) or the training recipe
(loss weighting, prediction type, schedule, learning rate, augmentation).

Each variant is ``ddpm train`` with the default preset and the variant's options for ``--minutes``
of wall clock, or for ``--steps`` when the variants train at one speed and the machine's speed
drifts (no FID, grids or checkpoints on the way, so every variant spends its time training; the
cosine decay runs over the budget), then ``ddpm eval RUN --n N --sampler
dpm++ --steps 20 --split test --json`` (the offline Fashion-MNIST features). Variants run one
after another, never side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

# The preset's recipe before its second tuning (which made it v, min-SNR-5, no flips): the
# shape rows were measured with it. Every row spells its recipe out, so that it means the same
# whatever the preset's own recipe is.
EPS = ["--prediction-type", "eps", "--loss-weighting", "uniform"]
BEFORE = [*EPS, "--hflip"]
VARIANTS = {
    # the preset's shape: 24 channels x (1, 2, 2) with attention at 7 px when the table was
    # measured; 16 x (1, 3, 3) with attention in the middle block only, its later shape
    "resnet": BEFORE,
    "convnext": [*BEFORE, "--arch", "convnext"],
    "convnext-18": [*BEFORE, "--arch", "convnext", "--base-channels", "18"],  # ~ the preset's size
    "patch2-32": [*BEFORE, "--patch-size", "2", "--base-channels", "32", "--channel-mults", "1,2"],
    "patch2-48": [*BEFORE, "--patch-size", "2", "--base-channels", "48", "--channel-mults", "1,2"],
    "attention-mid-only": [*BEFORE, "--attention-resolutions", ""],  # only the middle block
    "attention-14-7": [*BEFORE, "--attention-resolutions", "14,7"],
    # the recipe at the preset's shape; "eps" is "resnet" under the name of its recipe
    "eps": BEFORE,
    "eps-no-hflip": [*EPS, "--no-hflip"],  # Fashion-MNIST's shoes point left
    "eps-cosine-schedule": [*BEFORE, "--schedule", "cosine"],
    "eps-lr-4e-3": [*BEFORE, "--lr", "4e-3"],
    "eps-min-snr": ["--prediction-type", "eps", "--loss-weighting", "min-snr", "--hflip"],
    "v": ["--prediction-type", "v", "--loss-weighting", "uniform", "--hflip"],
    "v-min-snr": ["--prediction-type", "v", "--loss-weighting", "min-snr", "--hflip"],
    # the preset now
    "v-min-snr-no-hflip": ["--prediction-type", "v", "--loss-weighting", "min-snr", "--no-hflip"],
}


def ddpm(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ddpm {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--steps", type=int, help="equal steps instead of equal minutes: immune to "
                    "the machine's speed drifting between variants (only for variants of one speed)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--work", default="runs/arch")
    args = ap.parse_args()
    rows = []
    for name in args.only.split(","):
        run = os.path.join(args.work, name)
        result = os.path.join(args.work, f"{name}.json")
        if not os.path.exists(result):
            budget = ["--steps", str(args.steps)] if args.steps else ["--minutes", str(args.minutes)]
            print(f"{name}: training {shlex.join(budget)} ({time.strftime('%H:%M')})",
                  file=sys.stderr, flush=True)
            train = ddpm("train", "--out", run, *budget, "--fid-every", "0",
                         "--sample-every", "0", "--checkpoint-every", "0", "--no-progress",
                         *VARIANTS[name])
            params = next(line for line in train.splitlines() if line.startswith("parameters:"))
            log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            batch = json.load(open(os.path.join(run, "config.json")))["train"]["batch_size"]
            r = json.loads(ddpm("eval", run, "--n", str(args.n), "--sampler", "dpm++", "--steps",
                                "20", "--split", "test", "--json", "--no-progress").splitlines()[-1])
            r.update(params=int(params.split()[1].replace(",", "")), steps=log[-1]["step"],
                     images_per_s=log[-1]["step"] * batch / log[-1]["elapsed_s"], last_loss=log[-1]["loss"])
            with open(result, "w") as f:
                json.dump(r, f)
        rows.append((name, json.load(open(result))))
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"{budget} of training each, FID/KID of {args.n} DPM-Solver++ (20 steps) "
          f"samples against the test split, {time.strftime('%Y-%m-%d')}\n")
    print("| variant | options | parameters | steps | training images/s | FID | KID |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | `{shlex.join(VARIANTS[name]) or '(preset)'}` | {r['params']:,} | {r['steps']} | "
              f"{r['images_per_s']:.0f} | {r['fid']:.2f} | {r['kid']:.4f} |")


if __name__ == "__main__":
    main()
