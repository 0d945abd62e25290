"""Score SDEs on Fashion-MNIST: the exact likelihood against the variational bound, the
predictor-corrector sampler against DPM-Solver++ and ancestral sampling at equal network
evaluations, and a VE (NCSN) model trained as long as the others; one run after another (never two
at once).

    python benchmarks/sde.py --out runs/sde --minutes 15

trains (unless already in --out) the default preset (`vp`), the same with learned variances
(`learned`, `--learn-variance`) and the same as an NCSN (`ve`, `--sde ve --timestep-sampling
continuous`), each for --minutes, then measures:

- bits/dim of --nll-n test images, `ddpm eval RUN --nll` (the bound) and `--nll --method ode`
  (the probability-flow ODE, one Rademacher probe), for vp and learned, with standard errors,
  network evaluations and seconds;
- FID/KID of --n images (offline extractor, training split) of vp at 20, 50 and 100 network
  evaluations an image: ancestral (`ddpm`) and `dpm++` at that many steps, `pc` at half as many
  with one corrector step each;
- FID/KID of ve: `pc` (one corrector step) at 100 and 200 evaluations, annealed `langevin` at 100
  and 200 (50 or 100 levels, 2 steps each, + 1), and `dpm++` at 20 beside them.

``--vp-run RUN`` scores an existing default-preset run instead of training `vp`. Prints Markdown
tables (and ``--json FILE`` the rows) with the machine and the date.
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

from ddpm.runtime import processor_name

NFES = (20, 50, 100)


def ddpm(*args: object) -> dict:
    """``ddpm ARGS --json --no-progress`` in a new process: the JSON it printed last."""
    command = [sys.executable, "-m", "ddpm", *map(str, args), "--json", "--no-progress"]
    done = subprocess.run(command, check=True, text=True, stdout=subprocess.PIPE)
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(args: argparse.Namespace, name: str, *extra: object) -> dict:
    """Train ``name`` for --minutes (unless it is in --out already); its steps and median images/s."""
    run = args.out / name
    if not (run / "checkpoints").is_dir():
        command = [sys.executable, "-m", "ddpm", "train", "--preset", "fashion-cpu", "--minutes",
                   str(args.minutes), "--sample-every", "0", "--fid-every", "0", "--out", str(run),
                   "--no-progress", *map(str, extra)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return run_stats(run, name)


def run_stats(run: Path, name: str) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "images_per_s" in r]
    return {"run": name, "path": str(run), "steps": records[-1]["step"],
            "images_per_s": round(statistics.median(r["images_per_s"] for r in records[1:] or records))}


def nll(run: Path, method: str, n: int) -> dict:
    out = ddpm("eval", run, "--nll", "--method", method, "--n", n)
    return {"method": method, "bits_per_dim": round(out["bits_per_dim"], 4),
            "se": round(out["bits_per_dim_se"], 4), "seconds": round(out["seconds"], 1),
            "evaluations": round(out.get("evaluations_per_image", out.get("timesteps", 0)))}


def fid(run: Path, n: int, sampler: str, steps: int, *extra: object) -> dict:
    out = ddpm("eval", run, "--n", n, "--sampler", sampler, "--steps", steps, *extra)
    return {"fid": round(out["fid"], 2), "kid": round(out["kid"], 4),
            "sampling_s": round(out["seconds"]["sampling"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--vp-run", type=Path, help="an existing default-preset run to score as vp")
    p.add_argument("--n", type=int, default=1000, help="images per FID")
    p.add_argument("--nll-n", type=int, default=200, help="test images per bits/dim")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows: dict = {"machine": processor_name(torch.device("cpu")), "python": platform.python_version(),
                  "torch": torch.__version__, "started": started.isoformat(timespec="minutes"),
                  "minutes": args.minutes}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))

    vp = args.vp_run or args.out / "vp"
    rows["vp"] = run_stats(vp, "vp") if args.vp_run else train(args, "vp")
    rows["learned"] = train(args, "learned", "--learn-variance")
    rows["ve"] = train(args, "ve", "--sde", "ve", "--timestep-sampling", "continuous")
    save()

    rows["nll"] = []
    for name, run in (("vp", vp), ("learned", args.out / "learned")):
        for method in ("vlb", "ode"):
            rows["nll"].append({"run": name, **nll(run, method, args.nll_n)})
            save()
            print(rows["nll"][-1], flush=True)

    rows["equal_nfe"] = []
    for nfe in NFES:
        for sampler, steps, extra in (("ddpm", nfe, ()), ("dpm++", nfe, ()),
                                      ("pc", nfe // 2, ("--corrector-steps", 1))):
            rows["equal_nfe"].append({"nfe": nfe, "sampler": sampler, "steps": steps,
                                      **fid(vp, args.n, sampler, steps, *extra)})
            save()
            print(rows["equal_nfe"][-1], flush=True)

    rows["ve_fid"] = []
    ve = args.out / "ve"
    for sampler, steps, nfe, extra in (("dpm++", 20, 20, ()),
                                       ("pc", 50, 100, ("--corrector-steps", 1)),
                                       ("pc", 100, 200, ("--corrector-steps", 1)),
                                       ("langevin", 50, 101, ("--langevin-steps", 2)),
                                       ("langevin", 100, 201, ("--langevin-steps", 2))):
        rows["ve_fid"].append({"sampler": sampler, "steps": steps, "nfe": nfe,
                               **fid(ve, args.n, sampler, steps, *extra)})
        save()
        print(rows["ve_fid"][-1], flush=True)

    rows["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    save()
    print(f"\n{rows['machine']}, {started:%Y-%m-%d}, torch {rows['torch']}\n")
    print("| run | steps | images/s |\n|---|---|---|")
    for name in ("vp", "learned", "ve"):
        print(f"| {name} | {rows[name]['steps']:,} | {rows[name]['images_per_s']} |")
    print("\n| run | method | bits/dim | SE | evaluations an image | seconds |\n|---|---|---|---|---|---|")
    for r in rows["nll"]:
        print(f"| {r['run']} | {r['method']} | {r['bits_per_dim']} | {r['se']} | "
              f"{r['evaluations']} | {r['seconds']} |")
    print("\n| NFE | sampler | steps | FID | KID | sampling s |\n|---|---|---|---|---|---|")
    for r in rows["equal_nfe"]:
        print(f"| {r['nfe']} | {r['sampler']} | {r['steps']} | {r['fid']} | {r['kid']} | {r['sampling_s']} |")
    print("\n| VE sampler | steps | NFE | FID | KID | sampling s |\n|---|---|---|---|---|---|")
    for r in rows["ve_fid"]:
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']} | {r['kid']} | {r['sampling_s']} |")


if __name__ == "__main__":
    main()
