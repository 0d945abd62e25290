"""``ddpm bench``, ``ddpm presets``, ``ddpm train-classifier`` (the feature extractor, or
``--noisy`` the classifier of classifier guidance), ``ddpm posthoc-ema`` (an EMA of any length
rebuilt after training) and ``ddpm export`` (a diffusers folder): the tools around training."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ..bench import bench, format_table
from ..checkpoint import (
    CHECKPOINT_DIR,
    atomic_save,
    checkpoint_config,
    checkpoint_path,
    load_checkpoint,
    load_run_or_file,
)
from ..classifier import CLASSIFIER_DATASETS, train_classifier
from ..config import with_overrides
from ..data import DATASETS, to_uint8
from ..metrics import Evaluator, check_image_count, data_options, resolve_extractor
from ..noisy_classifier import load_noisy_classifier, train_noisy_classifier
from ..pipeline import load_pipeline
from ..posthoc import MAX_STD, gamma_from_std, list_snapshots, rebuilt_checkpoint, reconstruct
from ..presets import (
    AUTOENCODER_PRESETS,
    DEFAULT_PRESET,
    LATENT_PRESETS,
    PRESETS,
    get_autoencoder_preset,
    get_preset,
)
from ..runtime import resolve_device
from .options import (
    Defaults,
    UsageError,
    add_model_options,
    add_settings,
    check_out_file,
    given_settings,
    number,
    number_list,
    positive_int,
    seed,
)
from .sample import add_sample_settings, add_workers_option, check_workers, sample_settings

# The settings of a training run that change its speed, besides the model's shape.
BENCH_TRAIN_SETTINGS = ("batch_size", "grad_accum", "precision", "threads", "device",
                        "channels_last", "compile")
# train-classifier's defaults: the feature extractor's as it ships; the noise-aware classifier's
PLAIN_EPOCHS, PLAIN_BATCH = 10, 256
NOISY_EPOCHS, NOISY_BATCH = 3, 128


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure training and sampling speed, FLOPs and utilisation here",
        formatter_class=Defaults,
        description=(
            "Time a preset's real training step (data, forward, backward, AdamW, EMA) on "
            "synthetic images and its sampling network evaluation, in fp32 and in bf16, and say "
            "which one --precision auto takes for each; count their FLOPs with torch's FLOP "
            "counter, and measure this machine's peak float32 and bfloat16 matmul rate; "
            "utilisation is the training step's FLOP/s over the faster peak."))
    # (a latent preset's network input is its autoencoder's latents, which a run names)
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   choices=sorted(set(PRESETS) - set(LATENT_PRESETS)),
                   help="configuration to measure (the presets of pixel diffusion)")
    p.add_argument("--seconds", type=number(float, above=0), default=5.0,
                   help="time each of training and sampling this long, in fp32 and in bf16")
    p.add_argument("--sample-batch-size", type=positive_int, default=128)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    note = lambda key, default: "default: the preset's"  # noqa: E731
    add_settings(p, "model", default_note=note)
    add_settings(p, "train", only=BENCH_TRAIN_SETTINGS, default_note=note)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    config = with_overrides(get_preset(args.preset), given_settings(args))
    progress = (lambda message: None) if args.json else (lambda m: print(f"measuring {m}", flush=True))
    result = bench(config, seconds=args.seconds, sample_batch_size=args.sample_batch_size,
                   progress=progress)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0


def add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named presets and their settings",
                       description="Print every preset's full configuration as JSON: those of "
                                   "'ddpm train --preset', then the autoencoders' of 'ddpm "
                                   "train-autoencoder --preset'.")
    p.add_argument("name", nargs="?", choices=sorted(PRESETS) + sorted(AUTOENCODER_PRESETS),
                   help="show only this preset")
    p.set_defaults(func=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    configs = {**{n: get_preset(n).to_dict() for n in sorted(PRESETS)},
               **{n: get_autoencoder_preset(n).to_dict() for n in sorted(AUTOENCODER_PRESETS)}}
    print(json.dumps({args.name: configs[args.name]} if args.name else configs, indent=2))
    return 0


def add_train_classifier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-classifier", formatter_class=Defaults,
        help="train the small CNN whose features 'ddpm eval' uses offline, or (--noisy) the "
             "noise-aware classifier of classifier guidance",
        description="Train the classifier that serves as the offline feature extractor for "
                    "MNIST or Fashion-MNIST and save its weights with its test accuracy. The "
                    "package ships weights made with the defaults. With --noisy, train instead "
                    "the classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol "
                    "2021) on images noised by a diffusion schedule, the U-Net's downsampling "
                    "half with a pooled head; --like RUN takes the run's dataset, image size "
                    "and schedule, so that the classifier can guide that run's sampling.")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="dataset to learn to classify (default: fashion-mnist, or with --like "
                        "the run's); the feature extractor knows only fashion-mnist and mnist")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the dataset (default: the run's with --like, else "
                        "Debian's folder for fashion-mnist, ~/.cache/ddpm/data/DATASET for "
                        "the others)")
    p.add_argument("--out", required=True, metavar="WEIGHTS.pt", help="weights file to write")
    p.add_argument("--noisy", action="store_true",
                   help="train the noise-aware classifier of classifier guidance instead of the "
                        "feature extractor")
    p.add_argument("--like", metavar="RUN_DIR_OR_CHECKPOINT", default=None,
                   help="with --noisy: train on the data of this run (its newest checkpoint, or "
                        "this checkpoint file) at its image size and channels, noised by its "
                        "schedule (default: the dataset at its own size and the "
                        f"{DEFAULT_PRESET} preset's schedule)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over the train split (default: {PLAIN_EPOCHS}; with --noisy "
                        f"{NOISY_EPOCHS}, a few minutes: an epoch of Fashion-MNIST takes ~70 s "
                        f"on two CPU cores, and 3 reached 81%% clean accuracy and 78%% at t = "
                        f"250 of 1000, against 73%% and 71%% after one; 10 reached 86%% and 82%%, "
                        f"enough for guidance at scale 10 to draw the class asked for 90%% of the "
                        f"time)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per step (default: {PLAIN_BATCH} for the feature extractor, "
                        f"{NOISY_BATCH} with --noisy)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the initialisation and batches")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args: argparse.Namespace) -> int:
    if args.like is not None and not args.noisy:
        raise UsageError("--like names the run a noise-aware classifier is for; add --noisy "
                         "(the feature extractor of 'ddpm eval' takes no run)")
    if not args.noisy and args.dataset not in (None, *CLASSIFIER_DATASETS):
        raise UsageError(
            f"argument --dataset: invalid choice: {args.dataset!r} for the feature extractor "
            f"(choose from {', '.join(map(repr, sorted(CLASSIFIER_DATASETS)))}); add --noisy for "
            f"the noise-aware classifier of guidance, which learns any labelled dataset")
    out = check_out_file(args.out, force=args.force, reads=args.like)
    if args.noisy:
        return _train_noisy_classifier(args, out)
    dataset = args.dataset or "fashion-mnist"
    epochs = args.epochs or PLAIN_EPOCHS
    acc, seconds = train_classifier(dataset, args.data_dir, out, epochs=epochs,
                                    batch_size=args.batch_size or PLAIN_BATCH,
                                    seed=args.seed, progress=not args.no_progress)
    print(f"{dataset} classifier: test accuracy {acc:.2%} after {epochs} epochs "
          f"({seconds / 60:.1f} min); weights in {out}")
    return 0


def _train_noisy_classifier(args: argparse.Namespace, out: Path) -> int:
    like = None
    if args.like is not None:
        path, state = load_run_or_file(args.like)
        like = checkpoint_config(state, path)
    epochs = args.epochs or NOISY_EPOCHS
    result = train_noisy_classifier(args.dataset, args.data_dir, out, like=like, epochs=epochs,
                                    batch_size=args.batch_size or NOISY_BATCH, seed=args.seed,
                                    progress=not args.no_progress)
    clf = load_noisy_classifier(out)
    print(f"noise-aware {clf.dataset} classifier ({clf.num_classes} classes, {clf.schedule} "
          f"schedule, T = {clf.num_train_timesteps}) after {epochs} epoch{'s' * (epochs != 1)} "
          f"({result.seconds / 60:.1f} min); test accuracy by noise level:")
    for t, acc in result.accuracy_by_t.items():
        print(f"  t = {t:>4}: {acc:7.2%}")
    print(f"weights in {out}")
    return 0


def add_posthoc_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "posthoc-ema", formatter_class=Defaults,
        help="rebuild the EMA of any length from a run's --posthoc-ema snapshots and keep the "
             "one of the best FID",
        description="Karras et al. 2024: a run trained with --posthoc-ema keeps power-function "
                    "EMAs of two lengths and snapshots of them; any other length sigma_rel, at "
                    "any snapshot's step, is a least-squares combination of the snapshots. "
                    "Given several lengths, each is scored by FID and KID (as 'ddpm eval' "
                    "does) and the best is written as a checkpoint whose EMA weights are the "
                    "rebuilt ones, for 'ddpm sample', 'eval' and 'viz' to use; given one, it is "
                    "written without scoring.")
    p.add_argument("run", metavar="RUN_DIR", help="a run directory trained with --posthoc-ema")
    p.add_argument("--std", required=True, metavar="STD,...",
                   type=_stds,
                   help=f"relative EMA lengths sigma_rel to rebuild, in (0, {MAX_STD:.4f}], "
                        f"comma-separated (e.g. 0.02,0.05,0.1,0.2)")
    p.add_argument("--step", type=positive_int, default=None,
                   help="rebuild the averages of this step (default: the last snapshot's)")
    p.add_argument("--out", metavar="CKPT.pt", default=None,
                   help="checkpoint to write (default: RUN_DIR/checkpoints/posthoc-ema.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--n", type=number(int, at_least=2), default=1000,
                   help="images generated to score each length")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="reference split of the FID")
    p.add_argument("--seed", type=seed, default=0, help="seed of the generated images")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per sampling batch")
    add_workers_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON line per length")
    add_sample_settings(p)
    add_model_options(p)
    p.set_defaults(func=run_posthoc)


def _stds(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated sigma_rel values, each in (0, sqrt(1/12)]."""
    values = number_list(float)(text)
    for v in values:
        try:
            gamma_from_std(v)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc} in {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated lengths such as 0.05,0.1, "
                                         f"got {text!r}")
    return values


def run_posthoc(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        raise UsageError(f"{run} is not a run directory; give the folder 'ddpm train --out' wrote")
    if not list_snapshots(run):
        raise UsageError(f"{run} holds no EMA snapshots (ema/snapshot-STEP.pt); train with "
                         f"--posthoc-ema 0.05,0.10 to keep them")
    out = check_out_file(str(run / CHECKPOINT_DIR / "posthoc-ema.pt") if args.out is None
                         else args.out, force=args.force, reads=run)
    if args.no_ema:
        raise UsageError("--no-ema samples the raw weights; posthoc-ema rebuilds averages, so "
                         "drop --no-ema")
    check_workers(args)
    pipe = load_pipeline(run, device=args.device, precision=args.precision, compile=args.compile)
    dc, score = pipe.config.data, len(args.std) > 1
    if score:  # said before any work
        settings, sc = sample_settings(args, pipe)
        check_image_count(args.n, resolve_extractor("auto", dc.dataset), "--n")
    step, used, averages = reconstruct(run, args.std, args.step)
    rebuilt = [(std, weights, error) for std, (weights, error) in zip(args.std, averages, strict=True)]
    scores: list[dict] = []
    if score:
        evaluator = Evaluator(dc.dataset, dc.data_dir, split=args.split, data_options=data_options(dc),
                              device=resolve_device(args.device), progress=not args.no_progress)
        for std, weights, error in rebuilt:
            pipe.model.load_state_dict(weights)
            images = pipe.generate(args.n, seed=args.seed, batch_size=args.batch_size,
                                   progress=not args.no_progress, workers=args.workers, **settings)
            r = evaluator.evaluate(to_uint8(images), seed=args.seed, sampler=sc.sampler,
                                   steps=sc.num_sample_steps)
            row = {"std": std, "gamma": gamma_from_std(std), "step": step,
                   "profile_error": error, "fid": r.fid, "kid": r.kid, "n": r.n}
            scores.append(row)
            print(json.dumps(row) if args.json else
                  f"sigma_rel {std:<6g} (gamma {row['gamma']:6.2f}, profile error {error:.1e}): "
                  f"FID {r.fid:.2f}, KID {r.kid:.4f}", flush=True)
    best = min(range(len(rebuilt)), key=lambda i: scores[i]["fid"] if scores else 0)
    std, weights, _ = rebuilt[best]
    source = checkpoint_path(run, step)
    path, state = (source, load_checkpoint(source)) if source.is_file() else load_run_or_file(run)
    fid = scores[best]["fid"] if scores else math.nan
    atomic_save(rebuilt_checkpoint(state, weights, std, step, fid), out)
    what = f" (FID {fid:.2f}, the best of {len(scores)})" if scores else ""
    print(f"sigma_rel {std:g} at step {step}{what}: EMA weights rebuilt from {used} "
          f"snapshots, written with the rest of {path.name} to {out}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", formatter_class=Defaults,
        help="write a trained model as a diffusers DDPMPipeline folder",
        description="Write a run's EMA weights (the newest checkpoint, or the given file) as a "
                    "folder that diffusers.DDPMPipeline.from_pretrained(OUT_DIR) loads: "
                    "model_index.json, unet/ (UNet2DModel config and safetensors weights) and "
                    "scheduler/ (DDPMScheduler config), and ddpm.json with the run's config. "
                    "The folder is written only if diffusers' UNet2DModel loaded from it gives "
                    "the model's outputs; a model diffusers' blocks cannot express is refused. "
                    "Needs diffusers: pip install 'ddpm[diffusers]'.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="run directory (its newest checkpoint) or checkpoint file")
    p.add_argument("out", metavar="OUT_DIR", help="folder to write")
    p.add_argument("--format", choices=("diffusers",), required=True,
                   help="what to write (diffusers: a DDPMPipeline folder)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT_DIR that is empty or a previous export "
                        "(never a folder holding other files)")
    p.add_argument("--no-ema", action="store_true",
                   help="export the raw weights instead of the EMA's")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from ..diffusers_io import export_diffusers

    start = time.perf_counter()
    r = export_diffusers(args.checkpoint, args.out, force=args.force, use_ema=not args.no_ema)
    sched = r["scheduler"]
    betas = ("trained_betas" if sched["trained_betas"] is not None else
             f"{sched['beta_schedule']} {sched['beta_start']:g}..{sched['beta_end']:g}")
    print(f"wrote {args.out} from {r['source']} (step {r['step']}, "
          f"{'raw' if args.no_ema else 'EMA'} weights) in {time.perf_counter() - start:.1f} s: "
          f"UNet2DModel {r['unet']['block_out_channels']}, DDPMScheduler {betas}, "
          f"{sched['prediction_type']}; diffusers' model gives the same outputs "
          f"(max difference {r['max_abs_diff']:.1e})")
    print(f"load it with: diffusers.DDPMPipeline.from_pretrained({str(args.out)!r}); "
          f"sample it with: ddpm sample {args.out}")
    return 0
