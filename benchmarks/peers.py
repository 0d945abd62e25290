"""Ours against two public DDPM libraries: the same wall-clock training budget, scored alike.

Each row trains a ~0.6M-parameter model on Fashion-MNIST (28x28 grey) for ``--minutes`` of
wall clock (training only: data export, model building and sampling are not counted), samples
``--n`` images with the EMA weights and scores them with ``ddpm eval --images FILE.npz --dataset
fashion-mnist --json`` (offline Fashion-MNIST classifier features, reference: the train split),
so every row gets the same FID/KID. Rows run one after another, each in its own process
(this script with a hidden ``--row``), so no row's threads or memory reach the next.

    pip install -e '.[bench]'
    python benchmarks/peers.py --minutes 15 --n 1000          # all rows: ~1.5 hours on 2 cores
    python benchmarks/peers.py --only ddp,diffusers --reuse   # run only what is missing
    python benchmarks/peers.py --only ours,tuned --tuned-base diffusers  # the two that matter

Each row's EMA weights sample ``--n`` images once per sampling seed (``--sample-seeds``, 3 by
default: seeds SEED, SEED+1, ...), and the table gives the mean FID and KID over them with the
FID of each seed: at n = 1,000 one sampling seed moves the FID of the same weights by about
+-0.35 (ours, Fashion-MNIST), more than the differences the table is read for.

Results go to WORK/ROW.json (``--reuse`` takes them instead of training again when --minutes,
--n, --seed and --threads match, and for tuned the stronger peer too), logs to WORK/ROW.log, the
table to WORK/table.md.

Rows and where their settings come from:

ours
    ``ddpm train`` with the default preset fashion-cpu and ``--minutes M`` instead of its step
    limit; ``--fid-every 0 --sample-every 0 --checkpoint-every 0`` so no FID measurement,
    preview grid or checkpoint eats the budget. Sampled by ``ddpm eval``: DPM-Solver++, 20 steps.
    ``--precision`` (auto: bf16 on a CPU with bf16 hardware, else fp32) trains and samples it;
    ``--ours-args '--base-channels 32 ...'`` adds training options (a lever against the preset).
ddp: denoising-diffusion-pytorch 2.3.4 (lucidrains)
    Its ``Unet``, ``GaussianDiffusion`` and ``Trainer`` with the README's Trainer settings:
    train_batch_size 32, gradient_accumulate_every 2, train_lr 8e-5, ema_decay 0.995, amp True,
    and the library's defaults otherwise (Adam betas (0.9, 0.99), grad-norm clip 1, EMA every 10
    steps after 100, objective pred_v, sigmoid beta schedule, 1000 steps, random flips).
    Deviations: Unet(dim=16, dim_mults=(1, 2, 4)) instead of the README's dim 64, (1, 2, 4, 8),
    to fit 28x28 (28 -> 14 -> 7) and be near our size: 721,185 parameters against our preset's
    627,433 when it was measured (425,281 since the preset's cheaper first levels)
    (dim 14 would give 568k; 16 keeps the README's power-of-two widths); calculate_fid=False
    (its FID needs an Inception download; we score every row the same way afterwards);
    save_and_sample_every is never reached (its sample grids would eat the budget);
    sampling_timesteps=50 (its DDIM).
    amp=True is kept but is a no-op here: accelerate only autocasts fp16 on accelerators, so it
    trains in fp32 like every other row. Its Trainer reads a folder of images, so the training
    split is exported once as 60,000 PNGs to WORK/fashion-mnist-train-png. Its DataLoader uses
    cpu_count() worker processes (the Trainer's choice). The budget is enforced by passing a
    ``train_num_steps`` whose comparison checks the clock, so its own training loop runs as is.
diffusers 0.42.1
    The loop of diffusers' examples/unconditional_image_generation/train_unconditional.py:
    UNet2DModel, DDPMScheduler(num_train_timesteps=1000), AdamW lr 1e-4, betas (0.95, 0.999),
    weight decay 1e-6, eps 1e-8, cosine schedule with 500 warm-up steps over the example's 100
    epochs (so in a short run the rate barely decays), batch 16, grad-norm clip 1, EMAModel with
    warm-up (inv_gamma 1, power 3/4, max decay 0.9999), random horizontal flips, images in
    [-1, 1], MSE on epsilon, Accelerator with mixed precision "no".
    Deviations: UNet2DModel(block_out_channels=(24, 48, 48), layers_per_block=1, attention at 7x7,
    norm_num_groups=8) instead of the example's 64x64 six-level model, to fit 28x28 and our size
    (627,433 parameters: the layer shapes of our preset until its shape changed, which made its
    first levels cheaper and dropped the attention at 7x7; the peer keeps the shape its rows
    were measured with, and ``--peer-shape preset`` gives it the layer shapes of today's preset,
    read from it: block_out_channels = base_channels x channel_mults, attention at 7x7 only if
    the preset has it, the middle block's always, as in ours, so the same parameter count);
    images come from the in-memory IDX arrays (the example reads an HF ``datasets`` image
    folder; the transforms are the same, Resize/CenterCrop at 28 being no-ops). Sampled with
    DDIMPipeline, a DDIMScheduler made from the DDPM scheduler's config, 50 steps (the example
    previews with 1000-step DDPM).
tuned
    The peer with the lower FID above, again, with settings for a short run: lr 4e-4 and EMA
    decay 0.99; for denoising-diffusion-pytorch also EMA every step and no gradient
    accumulation (batch 32), for diffusers also 100 warm-up steps.

Images/s is optimiser steps x images per step / training seconds for every row. All peers
sample in batches of 128 (what ``ddpm eval`` uses on the CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("ours", "ddp", "diffusers", "tuned")
PEER_MODULES = {"ddp": "denoising_diffusion_pytorch", "diffusers": "diffusers"}
DATA_DIR = "/usr/share/datasets/fashion-mnist"
SAMPLE_BATCH = 128
# Settings a saved result must share to be reused.
SAME = ("minutes", "n", "seed", "sample_seeds", "threads", "precision", "ours_args", "peer_shape")
PEER_SHAPES = ("old", "preset")  # the diffusers rows' U-Net: peer_unet_shape

DDP_README = dict(train_batch_size=32, gradient_accumulate_every=2, train_lr=8e-5,
                  ema_decay=0.995, ema_update_every=10, amp=True)
DDP_TUNED = {**DDP_README, "gradient_accumulate_every": 1, "train_lr": 4e-4,
             "ema_decay": 0.99, "ema_update_every": 1}
DIFFUSERS_EXAMPLE = dict(batch_size=16, lr=1e-4, warmup=500, ema_max_decay=0.9999)
DIFFUSERS_TUNED = {**DIFFUSERS_EXAMPLE, "lr": 4e-4, "warmup": 100, "ema_max_decay": 0.99}


# ---------------------------------------------------------------------------------------------
# Parent: run the rows, print the table.

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall clock per row")
    ap.add_argument("--n", type=int, default=1000, help="images generated and scored per row")
    ap.add_argument("--work", default="runs/peers", help="runs, logs, results and table.md")
    ap.add_argument("--only", default=",".join(ROWS), help=f"rows to run, from {','.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads of every row (default: all cores)")
    ap.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    ap.add_argument("--sample-seeds", type=int, default=3, metavar="K",
                    help="score every row on K sets of --n images, sampling seeds SEED..SEED+K-1 "
                         "(the table gives the mean and each seed's FID)")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="ddpm's --precision for our row, training and sampling (the peers train "
                         "in fp32 as their examples do)")
    ap.add_argument("--ours-args", default="", metavar="'ARGS'",
                    help="more 'ddpm train' options for our row, one quoted string (a lever to "
                         "measure against the preset, e.g. '--base-channels 32')")
    ap.add_argument("--peer-shape", choices=PEER_SHAPES, default="old",
                    help="the diffusers rows' U-Net: old (24,48,48 with attention at 7x7, what "
                         "their rows were measured with) or preset (today's fashion-cpu shape)")
    ap.add_argument("--reuse", action="store_true",
                    help="take a row's saved WORK/ROW.json (same settings) instead of running it")
    ap.add_argument("--tuned-base", choices=("ddp", "diffusers"),
                    help="the peer row 'tuned' starts from (default: the one with the lower FID "
                         "in this run or in WORK's saved rows, which then must exist)")
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # child process: one row
    args = ap.parse_args()
    if args.row:
        return run_row(args)

    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    if args.sample_seeds < 1:
        ap.error(f"--sample-seeds must be at least 1, got {args.sample_seeds}")
    peers = {r for r in rows if r in PEER_MODULES}
    if "tuned" in rows:
        peers |= {args.tuned_base} if args.tuned_base else set(PEER_MODULES)
    if missing := [PEER_MODULES[p] for p in sorted(peers)
                   if importlib.util.find_spec(PEER_MODULES[p]) is None]:
        sys.exit(f"peers.py needs {' and '.join(missing)}: pip install -e '.[bench]'")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in SAME}

    results: dict[str, dict] = {}
    for name in rows:
        base = args.tuned_base if name == "tuned" else None
        if name == "tuned" and not base:  # the peer with the lower FID, this run's or saved
            peers = {p: results.get(p) or load_result(work / f"{p}.json", settings)
                     for p in ("ddp", "diffusers")}
            if not all(r and "fid" in r for r in peers.values()):
                results[name] = {"error": "needs the FIDs of rows ddp and diffusers with the same "
                                          "settings: run them first, or name it with --tuned-base"}
                print(f"[tuned] FAILED: {results[name]['error']}", flush=True)
                continue
            base = min(peers, key=lambda p: peers[p]["fid"])
            print(f"[tuned] the stronger peer is {base} (FID {peers[base]['fid']:.2f})", flush=True)
        saved = load_result(work / f"{name}.json", settings)
        if args.reuse and saved and saved.get("tuned_base") == base:
            print(f"[{name}] reusing {work / f'{name}.json'}", flush=True)
            results[name] = saved
        else:
            results[name] = run_child(name, args, work, ["--tuned-base", base] if base else [])

    table = render(rows, results, args)
    print("\n" + table)
    (work / "table.md").write_text(table)
    print(f"(also in {work / 'table.md'})")
    if any("error" in r for r in results.values()):
        sys.exit(1)


def load_result(path: Path, settings: dict) -> dict | None:
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    r.setdefault("ours_args", "")  # results saved before --ours-args existed
    r.setdefault("sample_seeds", 1)  # ... and before --sample-seeds
    r.setdefault("peer_shape", "old")  # ... and before --peer-shape
    # --ours-args changes our row only, --peer-shape the diffusers rows only (diffusers, and
    # tuned when it starts from diffusers): other saved rows are reused whatever they were
    ignored = {"ours_args"} if path.stem != "ours" else set()
    if path.stem in ("ours", "ddp") or r.get("tuned_base") == "ddp":
        ignored.add("peer_shape")
    same = {k: v for k, v in settings.items() if k not in ignored}
    return r if all(r.get(k) == v for k, v in same.items()) else None


def run_child(name: str, args: argparse.Namespace, work: Path, extra: list[str]) -> dict:
    """Run one row in a fresh process; its output goes to WORK/ROW.log, its result to ROW.json."""
    out, log = work / f"{name}.json", work / f"{name}.log"
    out.unlink(missing_ok=True)  # a failed run must not leave an older result to be reused
    cmd = [sys.executable, os.path.abspath(__file__), "--row", name, "--minutes", str(args.minutes),
           "--n", str(args.n), "--work", str(work), "--threads", str(args.threads),
           "--seed", str(args.seed), "--sample-seeds", str(args.sample_seeds),
           "--precision", args.precision, "--peer-shape", args.peer_shape,
           f"--ours-args={args.ours_args}", *extra]
    # Thread counts for every process of the row (ddpm subprocesses, DataLoader workers); tqdm
    # takes TQDM_* defaults from the environment, which keeps the peers' sampling bars short.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TQDM_MININTERVAL": "10"}
    print(f"[{name}] started {time.strftime('%H:%M:%S')}: {args.minutes:g} min training, "
          f"{args.n} images scored (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = (time.perf_counter() - start) / 60
    if rc == 0 and out.exists():
        r = json.loads(out.read_text())
        print(f"[{name}] done in {wall:.1f} min: {r['steps']} steps, FID {r['fid']:.2f}",
              flush=True)
        return r
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    error = lines[-1] if lines else f"exit status {rc}"
    print(f"[{name}] FAILED after {wall:.1f} min: {error} (full log: {log})", flush=True)
    return {"error": error}


def render(rows: list[str], results: dict[str, dict], args: argparse.Namespace) -> str:
    import torch

    scored = [r["eval"] for r in results.values() if "eval" in r]
    extractor = scored[0]["extractor"] if scored else "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or platform.machine())
    lines = [
        f"{cpu}, {os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Each row trains for {args.minutes:g} min of wall clock, "
        f"then {args.n} images per sampling seed are scored by `ddpm eval` ({extractor} features, "
        f"reference: the train split); FID and KID are means over sampling seeds "
        f"{sample_seeds(args)}, each seed's FID in brackets.",
        "",
        "| library | setup | parameters | training images/s | optimiser steps | training minutes "
        "| sampler | FID | KID | sampling seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in rows:
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'].replace('|', '/')} |" + "  |" * 8)
            continue
        lines.append(
            f"| {r['library']} | {r['setup']} | {r['params']:,} | {r['images_per_s']:.1f} "
            f"| {r['steps']:,} | {r['train_seconds'] / 60:.1f} | {r['sampler']} | {r['fid']:.2f} "
            f"({' / '.join(f'{f:.2f}' for f in r.get('fid_seeds', [r['fid']]))}) "
            f"| {r['kid']:.4f} | {r['sampling_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Child: one row, written to WORK/ROW.json.

def run_row(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    row_dir = work / args.row
    shutil.rmtree(row_dir, ignore_errors=True)  # fresh each time: ddpm train refuses a used folder
    row_dir.mkdir(parents=True)
    budget = 60.0 * args.minutes
    if args.row == "tuned" and not args.tuned_base:
        raise SystemExit("--row tuned needs --tuned-base ddp|diffusers")
    if args.row == "ours":
        r = row_ours(args, row_dir)
    elif args.row == "ddp" or (args.row == "tuned" and args.tuned_base == "ddp"):
        r = row_ddp(args, row_dir, budget, DDP_TUNED if args.row == "tuned" else DDP_README)
    else:
        r = row_diffusers(args, row_dir, budget,
                          DIFFUSERS_TUNED if args.row == "tuned" else DIFFUSERS_EXAMPLE)
    r.update({k: getattr(args, k) for k in SAME}, row=args.row, tuned_base=args.tuned_base)
    tmp = work / f"{args.row}.json.tmp"
    tmp.write_text(json.dumps(r, indent=2))
    tmp.replace(work / f"{args.row}.json")
    print(json.dumps(r))


def ddpm_cli(*cli_args: str) -> dict | None:
    """Run ``python -m ddpm ...``; return its JSON line when it prints one."""
    cmd = [sys.executable, "-m", "ddpm", *cli_args]
    print("$ ddpm", " ".join(cli_args), flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr goes to the log
    print(out.stdout, end="", flush=True)
    if out.returncode != 0:
        raise RuntimeError(f"'ddpm {cli_args[0]}' exited with status {out.returncode}; "
                           f"see its output above")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if "--json" in cli_args and lines else None


def sample_seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.seed, args.seed + args.sample_seeds))


def sample_and_score(args: argparse.Namespace, row_dir: Path, draw) -> tuple[list[dict], float]:
    """A peer's EMA model sampled once per sampling seed by ``draw(seed)`` (float images in [0, 1],
    [N, C, H, W]), each set saved and scored; the scores and the mean seconds of one ``draw``."""
    scored, sampling = [], 0.0
    for seed in sample_seeds(args):
        start = time.perf_counter()
        images = draw(seed)
        sampling += (time.perf_counter() - start) / args.sample_seeds
        save_npz(images, row_dir / f"samples-seed{seed}.npz")
        scored.append(score(row_dir / f"samples-seed{seed}.npz", args.n))
    return scored, sampling


def score(npz: Path, n: int) -> dict:
    return ddpm_cli("eval", "--images", str(npz), "--dataset", "fashion-mnist", "--data-dir",
                    DATA_DIR, "--split", "train", "--n", str(n), "--json", "--no-progress")


def save_npz(images, path: Path) -> None:
    """Float images in [0, 1], [N, C, H, W] -> uint8 [N, H, W, C] as arr_0, what ddpm eval reads."""
    import numpy as np
    import torch

    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    np.savez(path, u8.permute(0, 2, 3, 1).numpy())


def row_ours(args: argparse.Namespace, row_dir: Path) -> dict:
    run = row_dir / "run"
    ddpm_cli("train", "--out", str(run), "--minutes", str(args.minutes), "--no-progress",
             "--fid-every", "0", "--sample-every", "0", "--checkpoint-every", "0",
             "--threads", str(args.threads), "--seed", str(args.seed), "--precision", args.precision,
             *shlex.split(args.ours_args))
    full = json.loads((run / "config.json").read_text())
    config, m, d = full["train"], full["model"], full["diffusion"]
    last = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if '"elapsed_s"' in ln][-1]
    from ddpm.checkpoint import load_run_or_file

    params = load_run_or_file(run)[1]["num_params"]
    # ddpm eval generates (timed in its seconds.sampling) and scores in one go; the npz is kept
    # so the images can be rescored like the peers'.
    scored = [ddpm_cli("eval", str(run), "--n", str(args.n), "--sampler", "dpm++", "--steps", "20",
                       "--seed", str(s), "--split", "train", "--json", "--no-progress",
                       "--precision", args.precision,
                       "--save-samples", str(row_dir / f"samples-seed{s}.npz"))
              for s in sample_seeds(args)]
    per_step = config["batch_size"] * config["grad_accum"]
    import torch

    from ddpm.config import RunConfig
    from ddpm.runtime import training_precision
    from ddpm.train import training_probe

    # what the run trained in: auto's measurement, as the run made it (read from the cache)
    cpu = torch.device("cpu")
    precision, _ = training_precision(args.precision, cpu,
                                      training_probe(RunConfig.from_dict(full), cpu))
    return result("ddpm (ours)",
                  f"preset fashion-cpu{' ' + args.ours_args if args.ours_args else ''}: "
                  f"batch {per_step}, AdamW lr {lr(config['lr'])} cosine, "
                  f"EMA {config['ema_decay']:g}, predicts {d['prediction_type']}"
                  + (f", min-SNR-{d['min_snr_gamma']:g}" if d["loss_weighting"] == "min-snr" else "")
                  + ("" if full["data"]["hflip"] else ", no flips")
                  + f"; U-Net {m['base_channels']}x"
                  f"({','.join(map(str, m['channel_mults']))}), {m['block']} blocks, {precision}"
                  f"{' (auto)' if args.precision == 'auto' else ''}", params, last["step"], per_step,
                  last["elapsed_s"], "DPM-Solver++ 20 steps",
                  sum(r["seconds"]["sampling"] for r in scored) / len(scored), scored)


def lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")  # 8e-5, not 8e-05 or 0.0001


def result(library, setup, params, steps, per_step, seconds, sampler, sampling_s,
           scored: list[dict]) -> dict:
    """One row; ``scored`` has one ``ddpm eval --json`` result per sampling seed, and
    ``sampling_s`` is the seconds to generate one set of --n images."""
    return {"library": library, "setup": setup, "params": params, "steps": steps,
            "images_per_s": steps * per_step / seconds, "train_seconds": seconds,
            "sampler": sampler, "sampling_seconds": sampling_s,
            "fid": sum(r["fid"] for r in scored) / len(scored),
            "kid": sum(r["kid"] for r in scored) / len(scored),
            "fid_seeds": [r["fid"] for r in scored], "eval": scored[0], "evals": scored}


def export_pngs(folder: Path) -> None:
    """The training split as PNG files, for the Trainer of denoising-diffusion-pytorch (once)."""
    done = folder / ".complete"
    if done.exists():
        return
    from PIL import Image

    from ddpm.data import load_dataset

    print(f"exporting Fashion-MNIST train to {folder} ...", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    images = load_dataset("fashion-mnist", DATA_DIR, "train").images[:, 0].numpy()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    done.touch()


class Deadline(int):
    """``train_num_steps`` for the denoising-diffusion-pytorch Trainer: its loop runs ``while
    self.step < self.train_num_steps``, and since this is an int subclass with its own ``__gt__``,
    Python asks it first; it answers whether the budget is left. The int value is only the
    total of the Trainer's tqdm bar, 0 meaning unknown."""

    def __new__(cls, seconds: float):
        self = super().__new__(cls, 0)
        self.seconds, self.start = seconds, None
        return self

    def begin(self) -> None:
        self.start = time.perf_counter()

    def __gt__(self, step) -> bool:
        return time.perf_counter() - self.start < self.seconds


def row_ddp(args: argparse.Namespace, row_dir: Path, budget: float, s: dict) -> dict:
    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    folder = Path(args.work) / "fashion-mnist-train-png"
    export_pngs(folder)
    unet = Unet(dim=16, dim_mults=(1, 2, 4), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=28, timesteps=1000, sampling_timesteps=50)
    params = sum(p.numel() for p in unet.parameters())
    print(f"denoising-diffusion-pytorch Unet: {params:,} parameters; {s}", flush=True)
    deadline = Deadline(budget)
    trainer = Trainer(diffusion, str(folder), train_num_steps=deadline, calculate_fid=False,
                      save_and_sample_every=10**12, results_folder=str(row_dir / "results"), **s)
    deadline.begin()
    trainer.train()
    seconds = time.perf_counter() - deadline.start

    model = trainer.ema.ema_model.eval()

    def draw(seed: int):
        torch.manual_seed(seed)
        with torch.inference_mode():
            return torch.cat([model.sample(batch_size=min(SAMPLE_BATCH, args.n - i))
                              for i in range(0, args.n, SAMPLE_BATCH)])

    scored, sampling = sample_and_score(args, row_dir, draw)
    per_step = s["train_batch_size"] * s["gradient_accumulate_every"]
    return result("denoising-diffusion-pytorch 2.3.4",
                  f"{'tuned' if args.row == 'tuned' else 'README'} Trainer: batch "
                  f"{s['train_batch_size']}x{s['gradient_accumulate_every']}, Adam lr "
                  f"{lr(s['train_lr'])}, EMA {s['ema_decay']:g} every {s['ema_update_every']} "
                  f"step(s); Unet dim 16, (1,2,4), pred_v", params,
                  trainer.step, per_step, seconds, "DDIM 50 steps", sampling, scored)


class FlippedImages:
    """The train split as the example's transforms give it: random horizontal flip, [-1, 1]."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        import torch

        x = self.images[i].float() / 127.5 - 1
        return x.flip(-1) if torch.rand(()) < 0.5 else x


def peer_unet_shape(name: str) -> tuple[tuple[int, ...], bool]:
    """(block_out_channels, attention at 7x7 besides the middle block) of the diffusers rows:
    'old' is our preset's shape before it changed to 16 / 32 / 48, 'preset' today's preset's."""
    if name == "old":
        return (24, 48, 48), True
    from ddpm.presets import get_preset

    m = get_preset("fashion-cpu").model
    return tuple(m.base_channels * k for k in m.channel_mults), 7 in m.attention_resolutions


def row_diffusers(args: argparse.Namespace, row_dir: Path, budget: float, s: dict) -> dict:
    import itertools

    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ddpm.data import load_dataset

    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    widths, attention_at_7 = peer_unet_shape(args.peer_shape)
    down = ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D" if attention_at_7 else "DownBlock2D")
    up = ("AttnUpBlock2D" if attention_at_7 else "UpBlock2D", "UpBlock2D", "UpBlock2D")
    model = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=widths, norm_num_groups=8, down_block_types=down,
                        up_block_types=up)
    params = sum(p.numel() for p in model.parameters())
    print(f"diffusers UNet2DModel: {params:,} parameters; {s}", flush=True)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], betas=(0.95, 0.999),
                                  weight_decay=1e-6, eps=1e-8)
    data = FlippedImages(load_dataset("fashion-mnist", DATA_DIR, "train").images)
    loader = torch.utils.data.DataLoader(data, batch_size=s["batch_size"], shuffle=True,
                                         num_workers=0)
    # The example's schedule length: 100 epochs (its --num_epochs default).
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=s["warmup"],
                                 num_training_steps=len(loader) * 100)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader,
                                                                 lr_scheduler)
    ema = EMAModel(model.parameters(), decay=s["ema_max_decay"], use_ema_warmup=True,
                   inv_gamma=1.0, power=3 / 4, model_cls=UNet2DModel, model_config=model.config)

    step, start = 0, time.perf_counter()
    model.train()
    for clean in itertools.chain.from_iterable(itertools.repeat(loader)):  # epochs until time
        noise = torch.randn(clean.shape, device=clean.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (clean.shape[0],), device=clean.device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(model.parameters())
            step += 1
            if step % 50 == 0:
                print(f"step {step}: loss {loss.item():.4f}, {time.perf_counter() - start:.0f} s",
                      flush=True)
        if time.perf_counter() - start >= budget:
            break
    seconds = time.perf_counter() - start

    unet = accelerator.unwrap_model(model)
    ema.copy_to(unet.parameters())
    pipe = DDIMPipeline(unet=unet.eval(),
                        scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)

    def draw(seed: int):
        batches = []
        for i in range(0, args.n, SAMPLE_BATCH):  # seed 0 draws what the single-seed script did
            g = torch.Generator().manual_seed(seed * 100_000 + i)
            out = pipe(batch_size=min(SAMPLE_BATCH, args.n - i), generator=g,
                       num_inference_steps=50, output_type="np").images  # [B, H, W, C] in [0, 1]
            batches.append(torch.from_numpy(out).permute(0, 3, 1, 2))
        return torch.cat(batches)

    scored, sampling = sample_and_score(args, row_dir, draw)
    return result("diffusers 0.42.1",
                  f"{'tuned' if args.row == 'tuned' else 'train_unconditional example'}: batch "
                  f"{s['batch_size']}, AdamW lr {lr(s['lr'])}, warm-up {s['warmup']}, EMA max "
                  f"{s['ema_max_decay']:g}; UNet2DModel ({','.join(map(str, widths))}"
                  f"{', attention at 7x7' if attention_at_7 else ''})",
                  params, step, s["batch_size"], seconds, "DDIM 50 steps", sampling, scored)


if __name__ == "__main__":
    main()
