"""A ddpm model in diffusers' hands: the export's time, and FID of the exported model sampled by
diffusers' own DDIMPipeline against ddpm's own sampling of the same weights.

    pip install -e '.[diffusers]'
    python benchmarks/diffusers_export.py runs/fashion-cpu --n 1000 --steps 50

Rows, each scored by ``ddpm eval --images`` (offline Fashion-MNIST features, train split):
- diffusers DDIMPipeline (eta 0, ``--steps``, the exported ``timestep_spacing`` (the run's:
  fashion-cpu's trailing), its defaults otherwise: clipped x0, the unclipped eps in the update),
  on the folder ``ddpm export`` wrote, in fp32; and again
  with ``use_clipped_model_output=True`` (eps made to agree with the clipped x0, as ddpm does);
- ddpm's DDIM with the same steps and spacing, on the run (``ddpm eval RUN --sampler ddim``), fp32;
- ddpm's DPM-Solver++ at 20 steps with the run's spacing (fashion-cpu: trailing), fp32.
Results: WORK/results.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from peers import ddpm_cli as ddpm  # run 'python -m ddpm ...', return its JSON line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a ddpm run directory (or checkpoint) to export")
    ap.add_argument("--work", default="runs/diffusers-export", help="export folder and results")
    ap.add_argument("--n", type=int, default=1000, help="images per row")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of both DDIM rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "exported"

    start = time.perf_counter()
    ddpm("export", args.run, "--format", "diffusers", str(folder), "--force")
    export_s = time.perf_counter() - start  # the whole command, Python start included
    rows = []

    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for clipped in (False, True):  # the pipeline's default, then eps made to agree with x0
        generator = torch.Generator().manual_seed(args.seed)
        images, start = [], time.perf_counter()
        for b in range(0, args.n, args.batch_size):
            out = pipe(batch_size=min(args.batch_size, args.n - b), generator=generator, eta=0.0,
                       num_inference_steps=args.steps, output_type="np",
                       use_clipped_model_output=clipped)
            images.append((out.images * 255).round().astype(np.uint8))  # [B, H, W, C] in [0, 1]
        seconds = time.perf_counter() - start
        npz = work / f"diffusers-ddim{'-clipped' if clipped else ''}.npz"
        np.savez(npz, arr_0=np.concatenate(images))
        r = ddpm("eval", "--images", str(npz), "--dataset", "fashion-mnist", "--split", "train",
                 "--n", str(args.n), "--json", "--no-progress")
        rows.append({"row": f"diffusers DDIMPipeline, {args.steps} steps"
                            + (", use_clipped_model_output=True" if clipped else " (its defaults)"),
                     "fid": r["fid"], "kid": r["kid"], "sampling_s": seconds})

    exported_spacing = scheduler.config.timestep_spacing  # the run's, exported; else diffusers' leading
    for sampler, steps, spacing in (("ddim", args.steps, exported_spacing), ("dpm++", 20, None)):
        r = ddpm("eval", args.run, "--n", str(args.n), "--sampler", sampler, "--steps", str(steps),
                 *(["--spacing", spacing] if spacing else []), "--seed", str(args.seed),
                 "--split", "train", "--precision", "fp32", "--batch-size", str(args.batch_size),
                 "--json", "--no-progress")
        rows.append({"row": f"ddpm {sampler}, {steps} steps ({spacing or 'spacing of the run'})",
                     "fid": r["fid"], "kid": r["kid"], "sampling_s": r["seconds"]["sampling"]})

    result = {"run": args.run, "export_s": export_s, "n": args.n, "rows": rows,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "diffusers": diffusers.__version__}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\n`ddpm export` (whole command): {export_s:.1f} s\n")
    print("| sampler | FID | KID | sampling seconds |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['row']} | {row['fid']:.2f} | {row['kid']:.4f} | {row['sampling_s']:.0f} |")


if __name__ == "__main__":
    main()
