"""Latent against pixel diffusion at equal training time: an autoencoder first (its minutes
reported apart), then the same preset trained for the same minutes on the images and on the
autoencoder's latents, one run after the other (never two at once); each scored by FID/KID of
``--n`` images (decoded, for the latent run) on the offline extractor, with its training images/s
and the seconds its sampling took.

    python benchmarks/latent.py --out runs/latent-28 --minutes 15 --ae-minutes 5 \\
        --downsample 2 --latent-channels 4
    python benchmarks/latent.py --out runs/latent-64 --image-size 64 --minutes 15 --ae-minutes 10 \
        --downsample 4 --latent-channels 4

Runs already in ``--out`` are read back, not trained again. Prints a Markdown table (and ``--json
FILE`` writes the rows) with the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from autoencoders import run_scores  # benchmarks/autoencoders.py: the run's logged scores

from ddpm.runtime import processor_name


def ddpm(*args: object, capture: bool = False) -> str:
    command = [sys.executable, "-m", "ddpm", *map(str, args)]
    done = subprocess.run(command, check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout if capture else ""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_autoencoder(args: argparse.Namespace) -> dict:
    run = args.out / "autoencoder"
    if not (run / "checkpoints").is_dir():
        ddpm("train-autoencoder", "--dataset", args.dataset, "--image-size", args.image_size,
             "--downsample", args.downsample, "--latent-channels", args.latent_channels,
             "--base-channels", args.ae_base_channels, "--minutes", args.ae_minutes, "--out", run,
             "--no-progress")
    return {"run": "autoencoder", **run_scores(run)}


def encode_training_split(args: argparse.Namespace) -> float:
    """Seconds to encode the training split once, into the cache the latent run then reads (a
    one-time cost per autoencoder, like its training); about 0 when it is cached already."""
    import time

    from ddpm.autoencoder import load_autoencoder
    from ddpm.data import open_dataset
    from ddpm.data.registry import default_cache_dir
    from ddpm.latent import encode_split

    ae = load_autoencoder(args.out / "autoencoder")
    data = open_dataset(ae.config.data)
    # the preset's flips (none for MNIST and Fashion-MNIST), so that the run finds these latents
    start = time.perf_counter()
    encode_split(data, ae, hflip=False, sample=True, cache_dir=default_cache_dir())
    return time.perf_counter() - start


def train_and_score(args: argparse.Namespace, name: str, *extra: object) -> dict:
    run = args.out / name
    if not (run / "checkpoints").is_dir():
        ddpm("train", "--preset", args.preset, "--dataset", args.dataset, "--image-size",
             args.image_size, "--minutes", args.minutes, "--sample-every", 0, "--out", run,
             "--no-progress", *extra)
    records = [r for r in metrics(run) if "images_per_s" in r]
    scores = json.loads(ddpm("eval", run, "--n", args.n, "--sampler", "dpm++", "--steps", 20,
                             "--json", "--no-progress", capture=True).strip().splitlines()[-1])
    config = json.loads((run / "config.json").read_text())
    m = config["model"]
    return {"run": name, "network input": f"{m['in_channels']}x{m['image_size']}x{m['image_size']}",
            "steps": records[-1]["step"],
            "images_per_s": round(statistics.median(r["images_per_s"] for r in records[1:] or records)),
            "fid": round(scores["fid"], 2), "kid": round(scores["kid"], 3),
            "sampling_s": round(scores["seconds"]["sampling"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--preset", default="fashion-cpu", help="the diffusion preset of both runs")
    p.add_argument("--minutes", type=float, default=15.0, help="training minutes of each run")
    p.add_argument("--ae-minutes", type=float, default=5.0, help="the autoencoder's minutes")
    p.add_argument("--downsample", type=int, default=2)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--ae-base-channels", type=int, default=32, help="the autoencoder's width")
    p.add_argument("--n", type=int, default=1000, help="images of each FID")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ae = train_autoencoder(args)
    rows = [train_and_score(args, "pixel")]
    encode_s = encode_training_split(args) if not (args.out / "latent").is_dir() else float("nan")
    rows.append(train_and_score(args, "latent", "--autoencoder", args.out / "autoencoder"))
    cpu = processor_name(torch.device("cpu"))
    print(f"machine: {cpu}, {platform.node()}; {datetime.date.today()}; {args.dataset} at "
          f"{args.image_size} px, preset {args.preset}, {args.minutes:g} min each; FID of "
          f"{args.n} images, dpm++ 20 steps")
    print(f"autoencoder: F = {args.downsample}, C = {args.latent_channels}, width "
          f"{args.ae_base_channels}, {ae['steps']} steps in "
          f"{ae['minutes']} min, PSNR {ae['psnr']} dB, rFID {ae['rfid']}; the training split "
          f"encoded in {encode_s:.0f} s")
    print("| run | network input | steps | training images/s | FID | KID | sampling s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['network input']} | {r['steps']} | {r['images_per_s']} | "
              f"{r['fid']} | {r['kid']} | {r['sampling_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"autoencoder": ae, "encode_s": encode_s, "runs": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
