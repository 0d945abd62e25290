"""FID and KID of a trained run with several samplers, next to the real-image floor.

Each evaluation is one ``ddpm eval RUN --json`` (so these figures are what the command gives);
the script only collects the JSON lines into a Markdown table with the time each part took.

    python benchmarks/fid.py runs/demo --n 10000 --split test --samplers dpm++:20 ddpm:100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or checkpoint")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--split", default="test")
    parser.add_argument("--extractor", default="auto")
    parser.add_argument("--samplers", nargs="+", default=["dpm++:20", "ddpm:1000"],
                        metavar="SAMPLER:STEPS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="also save each sampler's images as DIR/SAMPLER-STEPS-N.npz")
    args = parser.parse_args()

    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    rows = []
    for spec in args.samplers:
        sampler, steps = spec.split(":")
        cmd = [sys.executable, "-m", "ddpm", "eval", args.run, "--n", str(args.n), "--split",
               args.split, "--extractor", args.extractor, "--sampler", sampler, "--steps", steps,
               "--seed", str(args.seed), "--json", "--no-progress"]
        if args.keep:
            cmd += ["--save-samples", f"{args.keep}/{sampler}-{steps}-{args.n}.npz"]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        rows.append((r, wall))

    print(f"\n{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}, "
          f"extractor {rows[0][0]['extractor']}, reference {rows[0][0]['dataset']} "
          f"{rows[0][0]['split']}\n")
    print("| sampler | steps | n | FID | KID | floor FID | floor KID | sampling s | features+metrics s "
          "| total s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, wall in rows:
        s = r["seconds"]
        print(f"| {r['sampler']} | {r['steps']} | {r['n']} | {r['fid']:.3f} | {r['kid']:.5f} "
              f"| {r['floor_fid']:.3f} | {r['floor_kid']:.5f} | {s['sampling']:.0f} "
              f"| {s['features'] + s['metrics']:.1f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
