"""``ddpm bench``, ``ddpm presets`` and ``ddpm train-classifier``: the tools around training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bench import bench, format_table
from ..classifier import CLASSIFIER_DATASETS, train_classifier
from ..config import DEFAULT_PRESET, PRESETS, get_preset, with_overrides
from .options import (Defaults, UsageError, add_settings, given_settings, number,
                      positive_int, seed)

# The settings of a training run that change its speed, besides the model's shape.
BENCH_TRAIN_SETTINGS = ("batch_size", "grad_accum", "precision", "threads", "device",
                        "channels_last", "compile")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure training and sampling speed, FLOPs and utilisation here",
        formatter_class=Defaults,
        description=(
            "Time a preset's real training step (data, forward, backward, AdamW, EMA) on "
            "synthetic images and its sampling network evaluation, count their FLOPs with "
            "torch's FLOP counter, and measure this machine's peak float32 and bfloat16 matmul "
            "rate; utilisation is the training step's FLOP/s over the faster peak."))
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="configuration to measure")
    p.add_argument("--seconds", type=number(float, above=0), default=10.0,
                   help="time each of training and sampling this long")
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
                       description="Print every preset's full configuration as JSON.")
    p.add_argument("name", nargs="?", choices=sorted(PRESETS), help="show only this preset")
    p.set_defaults(func=run_presets)


def run_presets(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else sorted(PRESETS)
    print(json.dumps({n: get_preset(n).to_dict() for n in names}, indent=2))
    return 0


def add_train_classifier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-classifier", formatter_class=Defaults,
        help="train the small CNN whose features 'ddpm eval' uses offline",
        description="Train the classifier that serves as the offline feature extractor for "
                    "MNIST or Fashion-MNIST and save its weights with its test accuracy. The "
                    "package ships weights made with the defaults.")
    p.add_argument("--dataset", choices=sorted(CLASSIFIER_DATASETS), default="fashion-mnist",
                   help="dataset to learn to classify")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the IDX files (default: Debian's folder for fashion-mnist)")
    p.add_argument("--out", required=True, metavar="WEIGHTS.pt", help="weights file to write")
    p.add_argument("--epochs", type=positive_int, default=10, help="passes over the train split")
    p.add_argument("--seed", type=seed, default=0, help="seed of the initialisation and batches")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; add --force to replace it or choose another --out")
    acc, seconds = train_classifier(args.dataset, args.data_dir, out, epochs=args.epochs,
                                    seed=args.seed, progress=not args.no_progress)
    print(f"{args.dataset} classifier: test accuracy {acc:.2%} after {args.epochs} epochs "
          f"({seconds / 60:.1f} min); weights in {out}")
    return 0
