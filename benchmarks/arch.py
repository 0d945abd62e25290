"""U-Net shapes at an equal training time: FID of each after the same minutes on this machine.

    python benchmarks/arch.py --minutes 10 --n 1000 [--only resnet,convnext] [--work runs/arch]

Each variant is ``ddpm train`` with the default preset and the variant's model options for
``--minutes`` of wall clock (no FID, grids or checkpoints on the way, so every variant spends its
time training; the cosine decay runs over the minutes), then ``ddpm eval RUN --n N --sampler
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

VARIANTS = {
    "resnet": [],  # the preset: 24 channels x (1, 2, 2), attention at 7 px
    "convnext": ["--arch", "convnext"],
    "convnext-18": ["--arch", "convnext", "--base-channels", "18"],  # 640k: ~ the preset's size
    "patch2-32": ["--patch-size", "2", "--base-channels", "32", "--channel-mults", "1,2"],
    "patch2-48": ["--patch-size", "2", "--base-channels", "48", "--channel-mults", "1,2"],
    "attention-mid-only": ["--attention-resolutions", ""],  # only the middle block attends
    "attention-14-7": ["--attention-resolutions", "14,7"],
}


def ddpm(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ddpm {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--work", default="runs/arch")
    args = ap.parse_args()
    rows = []
    for name in args.only.split(","):
        run = os.path.join(args.work, name)
        result = os.path.join(args.work, f"{name}.json")
        if not os.path.exists(result):
            print(f"{name}: training {args.minutes:g} min ({time.strftime('%H:%M')})", file=sys.stderr, flush=True)
            train = ddpm("train", "--out", run, "--minutes", str(args.minutes), "--fid-every", "0",
                         "--sample-every", "0", "--checkpoint-every", "0", "--no-progress",
                         *VARIANTS[name])
            params = next(line for line in train.splitlines() if line.startswith("parameters:"))
            log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            r = json.loads(ddpm("eval", run, "--n", str(args.n), "--sampler", "dpm++", "--steps",
                                "20", "--split", "test", "--json", "--no-progress").splitlines()[-1])
            r.update(params=int(params.split()[1].replace(",", "")), steps=log[-1]["step"],
                     images_per_s=log[-1]["step"] * 64 / log[-1]["elapsed_s"], last_loss=log[-1]["loss"])
            with open(result, "w") as f:
                json.dump(r, f)
        rows.append((name, json.load(open(result))))
    print(f"{args.minutes:g} min of training each, FID/KID of {args.n} DPM-Solver++ (20 steps) "
          f"samples against the test split, {time.strftime('%Y-%m-%d')}\n")
    print("| variant | options | parameters | steps | training images/s | FID | KID |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | `{shlex.join(VARIANTS[name]) or '(preset)'}` | {r['params']:,} | {r['steps']} | "
              f"{r['images_per_s']:.0f} | {r['fid']:.2f} | {r['kid']:.4f} |")


if __name__ == "__main__":
    main()
