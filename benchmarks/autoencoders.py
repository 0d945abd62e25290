"""Autoencoders for latent diffusion on Fashion-MNIST: what each downsampling factor F and latent
width C costs and keeps. Trains one autoencoder per (F, C) for the same wall-clock minutes with
``ddpm train-autoencoder`` (one after the other, never two at once), then reports its steps,
PSNR and rFID on 2,000 test images (the packaged classifier's features), as the run logged them.

    python benchmarks/autoencoders.py --out runs/ae-grid --minutes 4 --factors 2 4 --channels 2 4 8

Prints a Markdown table (and ``--json FILE`` writes the rows), with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from ddpm.runtime import processor_name


def train(out: Path, factor: int, channels: int, minutes: float, extra: list[str]) -> dict:
    run = out / f"f{factor}c{channels}"
    command = [sys.executable, "-m", "ddpm", "train-autoencoder", "--dataset", "fashion-mnist",
               "--downsample", str(factor), "--latent-channels", str(channels),
               "--minutes", str(minutes), "--out", str(run), "--no-progress", *extra]
    if not (run / "checkpoints").is_dir():  # one trained before is read back
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return {"F": factor, "C": channels, "latent": f"{channels}x{28 // factor}x{28 // factor}",
            **run_scores(run)}


def run_scores(run: Path) -> dict:
    """An autoencoder run's steps, training minutes, PSNR and rFID, as its metrics.jsonl logged
    them at the end (the final record holds its whole time)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "test_psnr" in r][-1]
    elapsed = max(r.get("elapsed_s", 0.0) for r in records)
    return {"steps": final["step"], "minutes": round(elapsed / 60, 2),
            "psnr": round(final["test_psnr"], 2), "rfid": round(final.get("test_rfid", float("nan")), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs")
    p.add_argument("--minutes", type=float, default=4.0, help="training minutes of each")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    p.add_argument("--channels", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more options for train-autoencoder (after --)")
    args = p.parse_args()
    rows = [train(args.out, f, c, args.minutes, args.extra) for f in args.factors for c in args.channels]
    cpu = processor_name(torch.device("cpu"))
    print(f"machine: {cpu}, {platform.node()}; {datetime.date.today()}; {args.minutes} min each")
    print("| F | C | latent | steps | training minutes logged | PSNR (dB) | rFID |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['F']} | {r['C']} | {r['latent']} | {r['steps']} | {r['minutes']} | "
              f"{r['psnr']} | {r['rfid']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
