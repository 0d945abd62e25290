"""A cascade against the single model at equal training minutes, and the conditioning-augmentation
ablation: a 14 px base model, then a 14 -> 28 px super-resolution model per augmentation, against
the 28 px preset trained for the base's and one stage's minutes together; one run after another
(never two at once).

    python benchmarks/cascade.py --out runs/cascade --minutes 15 --base-minutes 5

Each super-resolution run is scored (a) on held-out real images averaged down to 14 px (`ddpm eval
SR`) and (b) on the base model's samples (`ddpm eval BASE --then SR`), by FID/KID of ``--n`` images
(DPM-Solver++, 20 steps, every stage) on the offline extractor against the training split; and by
consistency: the PSNR between each output of (b) averaged back to 14 px and the base sample it
came from. Runs already in ``--out`` are read back, not trained again. Prints Markdown tables (and
``--json FILE`` the rows) with the machine and the date.

    python benchmarks/cascade.py --out runs/cascade --minutes 15 --base-minutes 5 \
        --levels 0,0.05,0.1,0.2 --seeds 0,1,2

then also scores (b) of the noise-augmented stages at each sampling level (`--cond-aug-level`),
and (b) of every stage with each seed, for the noise of FID between sampling seeds; ``--project``
scores (b) and consistency again with every stage's outputs projected onto their inputs
(`--cond-project`).
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

from ddpm.cascade import load_cascade
from ddpm.data import to_model_range, to_uint8
from ddpm.runtime import processor_name
from ddpm.superres import downsample

SAMPLING = ("--sampler", "dpm++", "--steps", 20)


def ddpm(*args: object, capture: bool = False) -> str:
    command = [sys.executable, "-m", "ddpm", *map(str, args)]
    done = subprocess.run(command, check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout if capture else ""


def train(args: argparse.Namespace, name: str, minutes: float, *extra: object) -> dict:
    """Train ``name`` (unless it is in --out already); its steps and median images/s."""
    run = args.out / name
    if not (run / "checkpoints").is_dir():
        ddpm("train", "--preset", args.preset, "--minutes", minutes, "--sample-every", 0,
             "--fid-every", 0, "--out", run, "--no-progress", *extra)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "images_per_s" in r]
    return {"run": name, "minutes": minutes, "steps": records[-1]["step"],
            "images_per_s": round(statistics.median(r["images_per_s"] for r in records[1:] or records))}


def evaluate(args: argparse.Namespace, *runs: object, stages: tuple[object, ...] = (),
             extra: tuple[object, ...] = ()) -> dict:
    chain = [a for stage in stages for a in ("--then", stage)]
    stage_sampling = ("--stage-sampler", "dpm++", "--stage-steps", 20) if stages else ()
    scores = json.loads(ddpm("eval", *runs, *chain, "--n", args.n, *SAMPLING, *stage_sampling,
                             *extra, "--json", "--no-progress", capture=True).strip().splitlines()[-1])
    return {"fid": round(scores["fid"], 2), "kid": round(scores["kid"], 3),
            "sampling_s": round(scores["seconds"]["sampling"], 1)}


def consistency(base: Path, sr: Path, n: int, project: bool = False) -> float:
    """Mean PSNR (dB) between each super-resolved base sample averaged back to 14 px and its
    8-bit input (``project``: the stage's outputs projected onto their inputs)."""
    chain = load_cascade(base, [sr], precision="auto")
    chain.stages = [stage.conditioned(project=True) if project else stage for stage in chain.stages]
    low, high = chain.generate(n, seed=7, sampler="dpm++", num_sample_steps=20,
                               stage_sampler="dpm++", stage_steps=20, keep=True)
    given = to_model_range(to_uint8(low))
    mse = ((downsample(high, given.shape[-1]) - given) ** 2).mean(dim=(1, 2, 3))
    return round(float((10 * torch.log10(4 / mse.clamp(min=1e-10))).mean()), 2)


def extra_scores(args: argparse.Namespace, augs: list[str]) -> dict[str, list[str]]:
    """(b) of the noise stage at each of --levels, and of each stage with each of --seeds."""
    base, out = args.out / "base", {}
    levels = [x for x in args.levels.split(",") if x]
    if levels:
        rows = ["| stage | sampling level | FID (b) | KID (b) |", "|---|---|---|---|"]
        for aug in (a for a in augs if "noise" in a):
            for level in levels:
                r = evaluate(args, base, stages=(args.out / f"sr-{aug}",),
                             extra=("--cond-aug-level", level))
                rows.append(f"| {aug} | {level} | {r['fid']} | {r['kid']} |")
                print(rows[-1], flush=True)
        out["(b) of the noise-augmented stages by sampling level"] = rows
    seeds = [x for x in args.seeds.split(",") if x]
    if seeds:
        rows = ["| augmentation | " + " | ".join(f"FID (b), seed {s}" for s in seeds) + " | mean |",
                "|---|" + "---|" * (len(seeds) + 1)]
        for aug in augs:
            fids = [evaluate(args, base, stages=(args.out / f"sr-{aug}",), extra=("--seed", s))["fid"]
                    for s in seeds]
            rows.append(f"| {aug} | " + " | ".join(map(str, fids)) +
                        f" | {statistics.mean(fids):.2f} |")
            print(rows[-1], flush=True)
        if args.single_seeds:  # the single model's FID at the same seeds, for its noise too
            fids = [evaluate(args, args.out / "single", extra=("--seed", s))["fid"] for s in seeds]
            rows.append("| (the single model) | " + " | ".join(map(str, fids)) +
                        f" | {statistics.mean(fids):.2f} |")
            print(rows[-1], flush=True)
        out["(b) by sampling seed"] = rows
    if args.project:
        rows = ["| augmentation | " + " | ".join(f"FID (b), seed {s}" for s in seeds or ["0"]) +
                " | mean | consistency (b), dB |", "|---|" + "---|" * (len(seeds or ["0"]) + 2)]
        for aug in augs:
            stage = args.out / f"sr-{aug}"
            fids = [evaluate(args, base, stages=(stage,), extra=("--seed", s, "--cond-project"))["fid"]
                    for s in seeds or ["0"]]
            rows.append(f"| {aug} | " + " | ".join(map(str, fids)) + f" | {statistics.mean(fids):.2f}"
                        f" | {consistency(base, stage, args.consistency_n, project=True)} |")
            print(rows[-1], flush=True)
        out["(b) with every output projected onto its input (--cond-project)"] = rows
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder of the runs")
    p.add_argument("--preset", default="fashion-cpu", help="the preset of every run")
    p.add_argument("--minutes", type=float, default=15.0,
                   help="the single model's minutes: the base's and one stage's together")
    p.add_argument("--base-minutes", type=float, default=5.0, help="the base model's share")
    p.add_argument("--low", type=int, default=14, help="the base's side, the stages' input")
    p.add_argument("--augmentations", default="noise,none,blur,noise+blur",
                   help="a super-resolution run for each, in this order")
    p.add_argument("--n", type=int, default=1000, help="images of each FID")
    p.add_argument("--consistency-n", type=int, default=256)
    p.add_argument("--levels", default="", help="sampling levels of the noise stages to score (b) at")
    p.add_argument("--seeds", default="", help="sampling seeds to score (b) of every stage with")
    p.add_argument("--single-seeds", action="store_true",
                   help="also score the single model with each of --seeds")
    p.add_argument("--project", action="store_true",
                   help="also score (b) and consistency of every stage with --cond-project, at "
                        "each of --seeds")
    p.add_argument("--sweeps-only", action="store_true",
                   help="read the main rows back from --json and score only --levels and --seeds")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweeps_only:
        saved = json.loads(args.json.read_text())
        single, base, rows = saved["single"], saved["base"], saved["stages"]
    else:
        single, base, rows = main_rows(args)
    sweeps = extra_scores(args, [r["aug"] for r in rows])
    report(args, single, base, rows, sweeps)


def report(args: argparse.Namespace, single: dict, base: dict, rows: list[dict],
           sweeps: dict[str, list[str]]) -> None:
    cpu = processor_name(torch.device("cpu"))
    print(f"machine: {cpu}, {platform.node()}; {datetime.date.today()}; preset {args.preset}; "
          f"single {args.minutes:g} min; base {args.base_minutes:g} min at {args.low} px, each stage "
          f"{args.minutes - args.base_minutes:g} min; FID of {args.n} images, dpm++ 20 steps")
    print("| run | steps | training images/s | FID | KID | sampling s |")
    print("|---|---|---|---|---|---|")
    for r in (single, base):
        print(f"| {r['run']} | {r['steps']} | {r['images_per_s']} | {r['fid']} | {r['kid']} | "
              f"{r['sampling_s']} |")
    print()
    print("| augmentation | stage steps | images/s | FID (a) real 14 px | FID (b) base samples | "
          "KID (b) | consistency (b), dB | chain sampling s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['aug']} | {r['steps']} | {r['images_per_s']} | {r['real']['fid']} | "
              f"{r['chain']['fid']} | {r['chain']['kid']} | {r['consistency_db']} | "
              f"{r['chain']['sampling_s']} |")
    for title, table in sweeps.items():
        print(f"\n{title}\n")
        for line in table:
            print(line)
    if args.json:
        args.json.write_text(json.dumps({"single": single, "base": base, "stages": rows,
                                         "sweeps": sweeps}, indent=2))


def main_rows(args: argparse.Namespace) -> tuple[dict, dict, list[dict]]:
    """The single model, the base and a stage per augmentation: trained, then scored."""
    mults = "1,2"  # the preset's 28/14/7 px levels as 14/7 px for the base
    single = {**train(args, "single", args.minutes), **evaluate(args, args.out / "single")}
    base = {**train(args, "base", args.base_minutes, "--image-size", args.low, "--channel-mults",
                    mults), **evaluate(args, args.out / "base")}
    rows = []
    for aug in args.augmentations.split(","):
        name = f"sr-{aug}"
        row = train(args, name, args.minutes - args.base_minutes, "--super-res", args.low,
                    "--cond-aug", aug)
        row["aug"] = aug
        row["real"] = evaluate(args, args.out / name)
        row["chain"] = evaluate(args, args.out / "base", stages=(args.out / name,))
        row["consistency_db"] = consistency(args.out / "base", args.out / name, args.consistency_n)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"single": single, "base": base, "stages": rows}, indent=2))
    return single, base, rows


if __name__ == "__main__":
    main()
