"""Learned variances against fixed ones at equal training (Nichol & Dhariwal 2021): FID by
ancestral steps, and bits/dim (the bound, and with --ode the probability-flow ODE's).

    python benchmarks/improved.py [--out runs/improved] [--steps 1400 | --minutes X]
                                  [--side-by-side] [--n 1000]
                                  [--sample-steps 10,25,50,100,1000] [--nll-n 1000] [--ode]
                                  [--rows posterior,beta,learned] [--long-rows ROWS]
                                  [--plot FILE [--also OTHER_OUT]] [--precision fp32]

Trains the default preset twice, for the same number of steps (the README demo's 1,400) or, with
--minutes, for the same wall-clock time (without grids or FIDs while training, which would take
from the budget), once as it is and once with ``--learn-variance``, one after the other or, with
--side-by-side, both at once, each pinned to its own core with ``--threads 1``; each run's steps
and minutes are read from its metrics.jsonl. A run whose folder already holds checkpoints is not
trained again, so runs trained elsewhere can be scored. Then, for each run, FID and KID
of ``--n`` ancestral samples at each step count (the fixed run with sigma^2 = beta-tilde and =
beta, the learned run with its own variances; --rows picks among them, and --long-rows those that
also take the step counts of 1,000 and more, each ~25 min on a 2-core CPU), and the NLL bound in
bits/dim on the test split (``ddpm eval --nll``, 50 stratified timesteps), with --ode also the
probability-flow ODE's bits/dim (``--nll --method ode``, which needs only the mean: one figure a
run), all in ``--precision`` (fp32 unless asked: the 1,400-step table is fp32's). Everything goes
through the command line, one JSON line per measurement appended to ``OUT/results.jsonl``; a
measurement already there is not repeated, so the script can be stopped and rerun. Prints a
Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=1400, help="training steps of each run")
    budget.add_argument("--minutes", type=float, help="train each run this many minutes instead")
    ap.add_argument("--n", type=int, default=1000, help="images per FID")
    ap.add_argument("--sample-steps", default="10,25,50,100,1000",
                    help="ancestral step counts, comma-separated")
    ap.add_argument("--nll-n", type=int, default=1000, help="test images of the NLL bound")
    ap.add_argument("--ode", action="store_true", help="also the probability-flow ODE's bits/dim")
    ap.add_argument("--rows", default="posterior,beta,learned",
                    help="variances to measure, comma-separated: posterior and beta (the fixed run), "
                         "learned")
    ap.add_argument("--long-rows", help="the rows that also take step counts >= 1000 (default: "
                                        "all of --rows)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="train the two runs at once, each on its own core with one thread")
    ap.add_argument("--plot", type=Path, help="draw FID by ancestral steps into this PNG")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="another --out folder (another budget) whose FIDs the plot draws beside")
    ap.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"),
                    help="ddpm's --precision for training and sampling")
    args = ap.parse_args()
    chosen = args.rows.split(",")
    long_chosen = args.long_rows.split(",") if args.long_rows else chosen
    known = [variance for _, variance in ROWS]
    unknown = [v for v in dict.fromkeys(chosen + long_chosen) if v not in known and v != "none"]
    if unknown:
        sys.exit(f"--rows/--long-rows name {', '.join(unknown)}; the rows are {', '.join(known)} "
                 "(comma-separated; --long-rows none for no 1,000-step cells)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    results = read_results(out) if results_file.exists() else []

    def record(entry: dict) -> None:
        results.append(entry)
        with results_file.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def have(**keys) -> bool:
        return any(all(r.get(k) == v for k, v in keys.items()) for r in results)

    budget = ["--minutes", str(args.minutes), "--sample-every", "0", "--fid-every", "0"] \
        if args.minutes else ["--steps", str(args.steps)]
    to_train = [(name, ["train", "--out", str(out / name), *budget, "--no-progress", "--precision",
                        args.precision, *extra])
                for name, extra in (("fixed", []), ("learned", ["--learn-variance"]))
                if not (out / name / "checkpoints").is_dir()]
    if args.side_by_side:
        # Both at once, each pinned to its own core with one thread: equal conditions for the two,
        # and on a 2-core machine more images a second in all than one two-thread run after another.
        if not hasattr(os, "sched_setaffinity"):
            sys.exit("--side-by-side pins each run to a core, which this system (not Linux) does "
                     "not offer; train one run after the other instead (leave out --side-by-side)")

        def pin(core: int):
            return lambda: os.sched_setaffinity(0, {core})
        cores = sorted(os.sched_getaffinity(0))
        procs = []
        for i, (name, command) in enumerate(to_train):
            print("$ ddpm " + " ".join(command) + " --threads 1", flush=True)
            procs.append((name, subprocess.Popen([*DDPM, *command, "--threads", "1"],
                                                 preexec_fn=pin(cores[i % len(cores)]),
                                                 stdout=subprocess.DEVNULL)))
        for name, proc in procs:
            if proc.wait():
                sys.exit(f"training {name} failed")
    else:
        for _, command in to_train:
            run(*command)
    for name in ("fixed", "learned"):
        if not have(kind="train", run=name):
            metrics = [json.loads(line) for line in
                       (out / name / "metrics.jsonl").read_text().splitlines()]
            timed = [m for m in metrics if "elapsed_s" in m]
            record({"kind": "train", "run": name, "steps": timed[-1]["step"],
                    "minutes": timed[-1]["elapsed_s"] / 60,
                    "threads": json.loads((out / name / "config.json").read_text())
                    .get("train", {}).get("threads")})
    steps_list = list(map(int, args.sample_steps.split(",")))
    short = [s for s in steps_list if s < 1000]
    rows = [row for row in ROWS if row[1] in chosen]
    # What the target compares first (learned at 25 steps against fixed at 1,000), then the rest
    # of the two main rows, the bound, and the beta row; 1,000 steps take ~25-40 min a row on a
    # 2-core CPU, so the learned and beta rows' 1,000 come last.
    main_rows = [row for row in rows if row[1] != "beta"]
    beta_row = [row for row in rows if row[1] == "beta"]
    long = [s for s in steps_list if s >= 1000]
    jobs = [("fid", *row, s) for s in short for row in main_rows]
    jobs += [("fid", *ROWS[0], s) for s in long if ROWS[0] in rows and "posterior" in long_chosen]
    jobs += [("nll", *row, None) for row in rows]
    if args.ode:
        jobs += [("ode", name, None, None) for name in dict.fromkeys(name for name, _ in rows)]
    jobs += [("fid", *row, s) for s in short for row in beta_row]
    jobs += [("fid", *row, s) for s in long for row in rows if row != ROWS[0] and row[1] in long_chosen]
    for kind, name, variance, steps in jobs:
        if kind == "ode":
            if not have(kind="ode", run=name):
                line = run("eval", str(out / name), "--nll", "--method", "ode", "--n",
                           str(args.nll_n), "--json", "--no-progress")
                record({"kind": "ode", "run": name, **json.loads(line)})
            continue
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

    for r in results:
        if r["kind"] == "train":
            print(f"{r['run']}: {r['steps']} steps in {r['minutes']:.1f} min")
    for r in results:
        if r["kind"] == "ode":
            print(f"{r['run']}: PF-ODE {r['bits_per_dim']:.3f} +- {r['bits_per_dim_se']:.3f} bits/dim, "
                  f"{r.get('evaluations_per_image', 0):.0f} evaluations an image, {r['seconds']:.0f} s")
    print("\n| run, variance | " + " | ".join(f"FID at {s}" for s in steps_list) + " | bits/dim |")
    print("|---|" + "---|" * (len(steps_list) + 1))
    for name, variance in rows:
        fids = []
        for s in steps_list:
            hit = [r for r in results if r["kind"] == "fid" and r["run"] == name
                   and r["variance"] == variance and r["steps"] == s and r["n"] == args.n]
            fids.append(f"{hit[-1]['fid']:.2f}" if hit else "-")
        nll = [r for r in results if r["kind"] == "nll" and r["run"] == name and r["variance"] == variance]
        bpd = f"{nll[-1]['bits_per_dim']:.3f} +- {nll[-1]['bits_per_dim_se']:.3f}" if nll else "-"
        print(f"| {name}, {variance} | " + " | ".join(fids) + f" | {bpd} |")
    if args.plot:
        plot(args.plot, results, [read_results(d) for d in args.also], rows)


def read_results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def plot(path: Path, results: list[dict], others: list[list[dict]], rows: list[tuple]) -> None:
    """FID by ancestral steps, a line per variance and budget, and the target: 1.1 times the fixed
    run's FID at 1,000 steps (this budget's)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"posterior": "tab:blue", "beta": "tab:green", "learned": "tab:orange"}
    for i, res in enumerate([results, *others]):
        trained = {r["run"]: r["steps"] for r in res if r["kind"] == "train"}
        for name, variance in rows:
            points = sorted((r["steps"], r["fid"]) for r in res if r["kind"] == "fid"
                            and r["run"] == name and r["variance"] == variance)
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", color=colours[variance],
                        linestyle="-" if i == 0 else ":", alpha=1.0 if i == 0 else 0.6,
                        label=f"{name}, {variance} ({trained.get(name, 0):,} training steps)")
    reference = [r["fid"] for r in results if r["kind"] == "fid" and r["run"] == "fixed"
                 and r["variance"] == "posterior" and r["steps"] == 1000]
    if reference:
        ax.axhline(1.1 * reference[-1], color="grey", linestyle="--", linewidth=1,
                   label=f"target: 1.1 x fixed at 1,000 steps ({1.1 * reference[-1]:.2f})")
    ax.set_xscale("log")
    ticks = sorted({r["steps"] for res in [results, *others] for r in res if r["kind"] == "fid"})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ancestral sampling steps")
    ax.set_ylabel("FID (1,000 images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
