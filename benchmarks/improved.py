"""Learned variances against fixed ones at equal training (Nichol & Dhariwal 2021): FID by
ancestral steps, and bits/dim.

    python benchmarks/improved.py [--out runs/improved] [--steps 1400] [--n 1000]
                                  [--sample-steps 10,25,50,100,1000] [--nll-n 1000]
                                  [--precision fp32]

Trains the default preset twice for the same number of steps (the README demo's 1,400), once as
it is and once with ``--learn-variance``, each run's time recorded; then, for each run, FID and
KID of ``--n`` ancestral samples at each step count (the fixed run with sigma^2 = beta-tilde and
= beta, the learned run with its own variances), and the NLL bound in bits/dim on the test split
(``ddpm eval --nll``, 50 stratified timesteps), all in ``--precision`` (fp32 unless asked:
BENCHMARKS.md's table is fp32's). Everything goes through the command line, one JSON line per
measurement appended to ``OUT/results.jsonl``; a measurement already there is not repeated, so
the script can be stopped and rerun. Prints a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DDPM = [sys.executable, "-m", "ddpm"]
ROWS = (("fixed", "posterior"), ("fixed", "beta"), ("learned", "learned"))


def run(*args: str) -> str:
    print("$ ddpm " + " ".join(args), flush=True)
    done = subprocess.run([*DDPM, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"ddpm {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/improved", help="folder of the two runs and results")
    ap.add_argument("--steps", type=int, default=1400, help="training steps of each run")
    ap.add_argument("--n", type=int, default=1000, help="images per FID")
    ap.add_argument("--sample-steps", default="10,25,50,100,1000",
                    help="ancestral step counts, comma-separated")
    ap.add_argument("--nll-n", type=int, default=1000, help="test images of the NLL bound")
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"),
                    help="ddpm's --precision for training and sampling")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] \
        if results_file.exists() else []

    def record(entry: dict) -> None:
        results.append(entry)
        with results_file.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def have(**keys) -> bool:
        return any(all(r.get(k) == v for k, v in keys.items()) for r in results)

    for name, extra in (("fixed", []), ("learned", ["--learn-variance"])):
        if not have(kind="train", run=name):
            start = time.perf_counter()
            run("train", "--out", str(out / name), "--steps", str(args.steps), "--no-progress",
                "--precision", args.precision, *extra)
            record({"kind": "train", "run": name, "steps": args.steps,
                    "minutes": (time.perf_counter() - start) / 60})
    steps_list = list(map(int, args.sample_steps.split(",")))
    short = [s for s in steps_list if s < 1000]
    # What the target compares first (learned at 25 steps against fixed at 1,000), then
    # the rest of the two main rows, the bound, and the beta row; 1,000 steps take ~40 min a row
    # on a 2-core CPU, so the learned and beta rows' 1,000 come last.
    main_rows, beta_row = ROWS[::2], ROWS[1]
    jobs = [("fid", *row, s) for s in short for row in main_rows]
    jobs += [("fid", *ROWS[0], s) for s in steps_list if s >= 1000]
    jobs += [("nll", *row, None) for row in ROWS]
    jobs += [("fid", *beta_row, s) for s in short]
    jobs += [("fid", *row, s) for s in steps_list if s >= 1000 for row in ROWS[1:]]
    for kind, name, variance, steps in jobs:
        if kind == "nll":
            if not have(kind="nll", run=name, variance=variance):
                line = run("eval", str(out / name), "--nll", "--variance", variance, "--n",
                           str(args.nll_n), "--json", "--no-progress", "--precision", args.precision)
                record({"kind": "nll", "run": name, "variance": variance, **json.loads(line)})
            continue
        if have(kind="fid", run=name, variance=variance, steps=steps, n=args.n):
            continue
        line = run("eval", str(out / name), "--sampler", "ddpm", "--steps", str(steps),
                   "--variance", variance, "--n", str(args.n), "--json", "--no-progress",
                   "--precision", args.precision)
        r = json.loads(line)
        record({"kind": "fid", "run": name, "variance": variance, "steps": steps, "n": args.n,
                "fid": r["fid"], "kid": r["kid"], "seconds": r["seconds"]["sampling"]})

    print("\n| run, variance | " + " | ".join(f"FID at {s}" for s in steps_list) + " | bits/dim |")
    print("|---|" + "---|" * (len(steps_list) + 1))
    for name, variance in ROWS:
        fids = []
        for s in steps_list:
            hit = [r for r in results if r["kind"] == "fid" and r["run"] == name
                   and r["variance"] == variance and r["steps"] == s and r["n"] == args.n]
            fids.append(f"{hit[-1]['fid']:.2f}" if hit else "-")
        nll = [r for r in results if r["kind"] == "nll" and r["run"] == name and r["variance"] == variance]
        bpd = f"{nll[-1]['bits_per_dim']:.3f} +- {nll[-1]['bits_per_dim_se']:.3f}" if nll else "-"
        print(f"| {name}, {variance} | " + " | ".join(fids) + f" | {bpd} |")


if __name__ == "__main__":
    main()
