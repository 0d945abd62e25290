"""The ``ddpm`` command line: the only module that parses strings.

It validates every option, resolves the config (preset + overrides), prints and saves it, and turns
user mistakes into one-line errors with exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .bench import bench, format_table
from .checkpoint import (CHECKPOINT_DIR, CheckpointError, SaveError, best_checkpoint_path,
                         list_checkpoints)
from .classifier import CLASSIFIER_DATASETS, train_classifier
from .config import DEFAULT_PRESET, PRESETS, DataConfig, RunConfig, get_preset
from .data import (CROPS, DATASETS, DatasetNotFoundError, load_dataset, load_images, open_dataset,
                   to_model_range, to_uint8)
from .data import resolve as resolve_data_config
from .diffusion import LOSS_WEIGHTINGS, LOSSES, PREDICTION_TYPES
from .models import UNet, UNetConfig, count_parameters
from .models.unet import BLOCKS
from .metrics import (EXTRACTORS, INCEPTION_FILE, SPLITS, EvalResult, Evaluator, data_options,
                      WeightsNotFoundError)
from .pipeline import PRECISIONS, X0_TRANSFORMS, load_pipeline, resolve_device
from .samplers import SAMPLERS, SPACINGS, VARIANCES
from .schedules import SCHEDULES, make_schedule
from .train import (CONFIG_FILE, LR_SCHEDULES, METRICS_FILE, ON_NAN, check_run, check_writable,
                    resume_config, train, unwritable)
from .viz import (ANIMATION_SUFFIXES, FIGURE_SUFFIXES, evenly_spaced, forward_noised, plot_curves,
                  plot_schedules, reverse_frames, save_animation, save_grid, save_image_table,
                  save_images, save_npz, video_writer)

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line (what was wrong, where to look), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with an option's default, except when there is none to show (None) or the
    help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``, with a message naming the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _int_list(min_items: int):
    """An argparse type: comma-separated whole numbers >= 1, e.g. ``1,2,2``."""

    def parse(text: str) -> tuple[int, ...]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if len(items) < min_items or not all(i.isdigit() and int(i) > 0 for i in items):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated whole numbers > 0 such as 1,2,2, got {text!r}")
        return tuple(int(i) for i in items)

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value}")
    return value


def _decay(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a decay in (0, 1), got {value}")
    return value


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that loads a trained model."""
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_architecture_options(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (default: the preset's)")
    m.add_argument("--arch", choices=BLOCKS,
                   help="U-Net blocks: resnet (Ho et al. 2020) or convnext (Liu et al. 2022)")
    m.add_argument("--base-channels", type=_positive_int, help="width of the first level")
    m.add_argument("--channel-mults", type=_int_list(1), metavar="M1,M2,...",
                   help="width of each level in base channels; each level after the first "
                        "halves the image")
    m.add_argument("--num-res-blocks", type=_positive_int, help="blocks per level on the way down")
    m.add_argument("--attention-resolutions", type=_int_list(0), metavar="PX,...",
                   help="feature-map sizes with self-attention, e.g. 14,7 ('' for none)")
    m.add_argument("--dropout", type=float, help="dropout inside the blocks, in [0, 1)")
    m.add_argument("--patch-size", type=_positive_int,
                   help="fold PxP pixels into channels before the first level: ~P^2 fewer "
                        "FLOPs, but a grid texture on 28 px images (BENCHMARKS.md)")


def _add_speed_options(p: argparse._ActionsContainer) -> None:
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory layout for the convolutions")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step's network (compiling takes a minute "
                        "or two first)")


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a DDPM (or resume one)",
        description=(
            "Train a DDPM from a named preset, optionally overriding its settings. Checkpoints, "
            "sample grids, metrics.jsonl and TensorBoard logs go to the run directory. Unset "
            "options keep the preset's value (shown by 'ddpm presets')."
        ),
        formatter_class=_Defaults,
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="named configuration to start from")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run directory to create (default: runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its newest checkpoint, with its saved config")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--steps", type=_positive_int, default=None,
                      help="train until this many optimiser steps in total (with --resume: counted "
                           "from the start of the run)")
    stop.add_argument("--minutes", type=_positive_float, default=None,
                      help="train for this many minutes of wall-clock time (this invocation)")
    g = p.add_argument_group("optimisation (default: the preset's)")
    g.add_argument("--batch-size", type=_positive_int, help="images per micro-batch")
    g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimiser step")
    g.add_argument("--lr", type=_positive_float, help="AdamW peak learning rate")
    g.add_argument("--warmup-steps", type=_non_negative_int, help="linear learning-rate warm-up")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help="after warm-up: constant, or cosine decay to 0 at --steps (or over "
                        "--minutes)")
    g.add_argument("--grad-clip", type=_positive_float, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=_decay, help="EMA decay of the sampling weights")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision: auto is bf16 on CUDA, fp32 on CPU; fp16 needs CUDA "
                        "and uses a gradient scaler")
    g.add_argument("--seed", type=int, help="seed of every random draw of the run")
    _add_architecture_options(p)
    d = p.add_argument_group("diffusion and data (default: the preset's)")
    d.add_argument("--schedule", choices=SCHEDULES, help="beta schedule")
    d.add_argument("--num-timesteps", type=_positive_int, help="diffusion steps T")
    d.add_argument("--loss", choices=LOSSES, help="elementwise loss on the network's prediction")
    d.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                   help="what the network predicts: the noise eps, the image x0, or v "
                        "(Salimans & Ho 2022)")
    d.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS,
                   help="uniform, or min-snr (Hang et al. 2023) with --min-snr-gamma")
    d.add_argument("--min-snr-gamma", type=_positive_float, help="gamma of min-SNR weighting")
    d.add_argument("--zero-terminal-snr", action="store_true",
                   help="rescale the schedule so the last step is pure noise (Lin et al. 2024); "
                        "needs --prediction-type v or x0")
    d.add_argument("--dataset", choices=DATASETS,
                   help="training data; the README has a section on each")
    d.add_argument("--data-dir",
                   help="the dataset's folder (default: /usr/share/datasets/fashion-mnist for "
                        "fashion-mnist, ~/.cache/ddpm/data/DATASET for the others; folder and "
                        "flowers-folder need it)")
    d.add_argument("--download", action="store_true",
                   help="fetch the dataset if it is missing (needs internet)")
    d.add_argument("--split", choices=SPLITS, help="which images to train on (all: every one)")
    d.add_argument("--image-size", type=_int_at_least(8),
                   help="side of the square images the model sees (default: the dataset's own; "
                        "64 for flowers and folders)")
    d.add_argument("--channels", type=int, choices=(1, 3),
                   help="1 (grey) or 3 (RGB), converting images as needed (default: the dataset's)")
    d.add_argument("--crop", choices=CROPS,
                   help="how images reach the size: center (resize the shorter side, centre "
                        "crop), resize (squash) or random (a random crop from 9/8 of the size)")
    d.add_argument("--folder-labels", action="store_true",
                   help="folder: one class per first-level subfolder (for --conditional)")
    d.add_argument("--strict", action="store_true",
                   help="stop at a corrupt image file instead of skipping it")
    d.add_argument("--workers", type=_non_negative_int,
                   help="processes decoding image files (DataLoader workers)")
    d.add_argument("--max-memory-gb", type=_positive_float,
                   help="image files whose decoded images would take more stream from disk "
                        "(default: 4)")
    flips = d.add_mutually_exclusive_group()
    flips.add_argument("--hflip", action="store_true",
                       help="random horizontal flips (default: on, except for MNIST and "
                            "Fashion-MNIST, whose digits and shoes have one orientation)")
    flips.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    c = p.add_argument_group("class-conditional generation (Ho & Salimans 2022)")
    c.add_argument("--conditional", action="store_true",
                   help="condition the model on the dataset's class labels")
    c.add_argument("--class-dropout", type=_probability,
                   help="probability of training on the null label instead (default: 0.1)")
    c.add_argument("--guidance", type=_non_negative_float,
                   help="guidance scale w of the run's preview and final grids (default: 0)")
    o = p.add_argument_group("outputs and machine")
    o.add_argument("--log-every", type=_positive_int, help="steps between metric lines")
    o.add_argument("--sample-every", type=_non_negative_int,
                   help="steps between preview grids (0: none)")
    o.add_argument("--fid-every", type=_non_negative_int,
                   help="steps between FID/KID measurements of the EMA model, logged and plotted "
                        "in curves.png (0: none)")
    o.add_argument("--fid-n", type=_int_at_least(2), help="images generated for each FID measurement")
    o.add_argument("--fid-steps", type=_positive_int,
                   help="DPM-Solver++ steps for the FID measurement's images")
    o.add_argument("--checkpoint-every", type=_non_negative_int,
                   help="steps between checkpoints (0: only at the end)")
    o.add_argument("--keep-checkpoints", type=_positive_int,
                   help="newest checkpoints to keep (with --fid-every, checkpoints/best.pt, the "
                        "one of the lowest FID, is kept as well)")
    o.add_argument("--on-nan", choices=ON_NAN,
                   help="a step with a non-finite loss never reaches the weights; then stop "
                        "(default) or skip the update, count it and go on")
    o.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    o.add_argument("--threads", type=_positive_int, help="CPU threads for torch (per process)")
    _add_speed_options(o)
    o.add_argument("--num-processes", type=_positive_int, default=1, metavar="N",
                   help="train with N processes on this machine through 'accelerate launch' "
                        "(PyTorch DDP: gloo on CPUs, NCCL on GPUs); --batch-size is split between "
                        "them. For several machines run 'accelerate launch -m ddpm train' (README)")
    o.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_train)


def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images from a trained run or checkpoint",
        description="Generate images from the EMA weights of a run's newest checkpoint or of a "
                    "checkpoint file, with any sampler and step count.",
        formatter_class=_Defaults,
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest checkpoint is used) or a .pt checkpoint")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images")
    p.add_argument("--out", required=True, metavar="DIR|GRID.png|SAMPLES.npz",
                   help="a .png path gets one grid; a .npz path one uint8 array 'arr_0' "
                        "[N, H, W, C]; any other path becomes a folder of PNGs")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (ancestral, Ho et al. 2020), ddim (Song et al. 2021), dpm++ "
                        "(DPM-Solver++(2M), Lu et al. 2022), euler or heun (Karras et al. 2022) "
                        "(default: the run's, ddpm)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps, 1..T (default: the run's setting, T for ddpm)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="how the steps are spread over 0..T-1 (default: karras for euler/heun, "
                        "logsnr for dpm++, linspace for ddpm/ddim)")
    p.add_argument("--eta", type=float, default=None,
                   help="ddim only: 0 is deterministic, 1 adds DDPM-like noise")
    p.add_argument("--variance", choices=VARIANCES, default=None,
                   help="ddpm only: sigma_t^2 of each step, the posterior beta-tilde_t or beta_t")
    p.add_argument("--x0", choices=X0_TRANSFORMS, default=None, dest="x0_transform",
                   help="what to do with each predicted x0: clip to [-1, 1], dynamic "
                        "thresholding (Saharia et al. 2022) or none (default: clip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise and every step")
    p.add_argument("--batch-size", type=_positive_int, default=128,
                   help="images per batch (128 was fastest on a 2-core CPU)")
    _add_class_options(p)
    _add_model_options(p)
    p.set_defaults(func=_cmd_sample)


def _add_class_options(p: argparse.ArgumentParser, all_classes: bool = True) -> None:
    p.add_argument("--class", dest="class_", metavar="INDEX|NAME" + ("|all" if all_classes else ""),
                   help="class-conditional models: the class to draw, by index or name"
                        + (", or all for --n images of every class, one row each" if all_classes
                           else "") + " (default: every class in turn)")
    p.add_argument("--guidance", type=_non_negative_float, default=None,
                   help="classifier-free guidance scale w: 0 is the conditional model, larger w "
                        "gives more typical images of the class (default: the run's, 0)")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="FID and KID of a model or of a set of images",
        description=(
            "Score a trained model (it generates --n images) or existing images (--images) with "
            "FID and KID against a dataset split, beside the floor: the same metrics for --n "
            "held-out real images, what a perfect generator would score. Reference statistics "
            "are computed once and cached per dataset, split and feature extractor."
        ),
        formatter_class=_Defaults,
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", nargs="?",
                   help="a run directory or .pt checkpoint to generate from (or use --images)")
    p.add_argument("--images", metavar="DIR|SAMPLES.npz",
                   help="score these images instead: a folder of PNG/JPEG files or an .npz whose "
                        "arr_0 is uint8 [N, H, W, C] (needs --dataset)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="reference dataset (default: the run's)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (default: the run's)")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="reference split; the floor uses held-out images of the other split")
    p.add_argument("--n", type=_int_at_least(2), default=None,
                   help="images to generate (default 10000), or to take from --images (default: all)")
    p.add_argument("--extractor", choices=EXTRACTORS, default="auto",
                   help="features: auto is the packaged classifier for mnist and fashion-mnist "
                        "(offline), inception-v3 (standard FID) otherwise")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help=f"Inception-v3 FID weights ({INCEPTION_FILE}); default: the torch hub cache")
    p.add_argument("--prc", action="store_true",
                   help="also precision and recall (Kynkaanniemi et al. 2019, k = 3)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: the run's)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="sampling steps (default: the run's)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timestep spacing (default: the sampler's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images and of KID's subsets")
    p.add_argument("--batch-size", type=_positive_int, default=128,
                   help="images per sampling batch (128 was fastest on a 2-core CPU)")
    p.add_argument("--guidance", type=_non_negative_float, default=None,
                   help="class-conditional models: guidance scale w of the generated images, "
                        "drawn from every class in turn (default: the run's, 0)")
    p.add_argument("--save-samples", metavar="SAMPLES.npz", default=None,
                   help="also keep the generated images, for other tools")
    p.add_argument("--cache-dir", default=None,
                   help="where reference statistics are cached (default: $DDPM_CACHE_DIR or "
                        "~/.cache/ddpm)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    _add_model_options(p)
    p.set_defaults(func=_cmd_eval)


def _add_train_classifier_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-classifier",
        help="train the small CNN whose features 'ddpm eval' uses offline",
        description="Train the classifier that serves as the offline feature extractor for "
                    "MNIST or Fashion-MNIST and save its weights with its test accuracy. The "
                    "package ships weights made with the defaults.",
        formatter_class=_Defaults,
    )
    p.add_argument("--dataset", choices=sorted(CLASSIFIER_DATASETS), default="fashion-mnist",
                   help="dataset to learn to classify")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the IDX files (default: Debian's folder for fashion-mnist)")
    p.add_argument("--out", required=True, metavar="WEIGHTS.pt", help="weights file to write")
    p.add_argument("--epochs", type=_positive_int, default=10, help="passes over the train split")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batches")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train_classifier)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure training and sampling speed, FLOPs and utilisation here",
        description=(
            "Time a preset's real training step (data, forward, backward, AdamW, EMA) on "
            "synthetic images and its sampling network evaluation, count their FLOPs with "
            "torch's FLOP counter, and measure this machine's peak float32 and bfloat16 matmul "
            "rate; utilisation is the training step's FLOP/s over the faster peak."),
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="configuration to measure")
    _add_architecture_options(p)
    p.add_argument("--batch-size", type=_positive_int, help="training batch (default: the preset's)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: the preset's")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    _add_speed_options(p)
    p.add_argument("--seconds", type=_positive_float, default=10.0,
                   help="time each of training and sampling this long")
    p.add_argument("--sample-batch-size", type=_positive_int, default=128)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.set_defaults(func=_cmd_bench, steps=None, minutes=None, wandb=False,
                   zero_terminal_snr=False, download=False, hflip=False, no_hflip=False)


def _name_list(valid: Sequence[str]):
    """An argparse type: comma-separated names, each one of ``valid``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in valid]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(valid)}")
        return names

    return parse


def _whole_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated whole numbers >= 0 such as 0,10,50."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(i.isdigit() for i in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 0,10,50, got {text!r}")
    return tuple(int(i) for i in items)


FORWARD_TIMESTEPS = (0, 10, 50, 100, 150, 200, 250, 300, 400, 600, 800, 999)


def _add_viz_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz", help="pictures: forward noising, the reverse process, data, schedules, curves",
        description="Draw the figures of diffusion. Each command writes the file given by --out; "
                    "its extension picks the format.",
    )
    vs = p.add_subparsers(dest="figure", metavar="FIGURE", parser_class=_Parser)
    vs.required = True
    figure = f"figure file: {', '.join(FIGURE_SUFFIXES)}"

    f = vs.add_parser("forward", formatter_class=_Defaults,
                      help="real images noised by q(x_t | x_0) at chosen t, one column per t",
                      description="The forward process: the same real images at each t (t = 0 is "
                                  "the data, t = k after k noising steps), one row block per "
                                  "schedule.")
    f.add_argument("--out", required=True, help=figure)
    f.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    f.add_argument("--data-dir", help="folder holding the dataset (default: its usual folder, see ddpm train --help)")
    f.add_argument("--n", type=_positive_int, default=4, help="images (rows per schedule)")
    f.add_argument("--timesteps", type=_whole_list, default=FORWARD_TIMESTEPS, metavar="T1,T2,...",
                   help="the t of each column, in 0..T-1")
    f.add_argument("--schedule", type=_name_list(SCHEDULES), default=("linear",), metavar="NAME,...",
                   help=f"beta schedules, from {', '.join(SCHEDULES)}")
    f.add_argument("--num-timesteps", type=_positive_int, default=1000, help="diffusion steps T")
    f.add_argument("--seed", type=int, default=0, help="seed of the images chosen and the noise")
    f.set_defaults(func=_cmd_viz_forward)

    r = vs.add_parser("reverse", formatter_class=_Defaults,
                      help="the reverse process from noise to images as a GIF or MP4",
                      description="Animate a trained model's reverse process: a grid of samples "
                                  "per frame from x_T to the output, the last frame held.")
    r.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    r.add_argument("--out", required=True, help=f"animation: {', '.join(ANIMATION_SUFFIXES)}")
    r.add_argument("--n", type=_positive_int, default=16, help="images in each frame's grid")
    r.add_argument("--frames", type=_int_at_least(2),
                   help="frames, spread evenly from x_T to the output (default: min(steps, 40))")
    r.add_argument("--sampler", choices=SAMPLERS, help="default: the run's")
    r.add_argument("--steps", type=_positive_int, help="sampling steps, 1..T (default: the run's)")
    r.add_argument("--spacing", choices=SPACINGS, help="default: the sampler's")
    r.add_argument("--seed", type=int, default=0, help="seed of the noise (as 'ddpm sample --seed')")
    r.add_argument("--show-x0", action="store_true",
                   help="show the network's prediction of x0 beside each x_t")
    r.add_argument("--sheet", metavar="SHEET.png",
                   help=f"also write a contact sheet of chosen steps ({figure})")
    r.add_argument("--sheet-columns", type=_int_at_least(2), default=8, help="steps on the sheet")
    _add_class_options(r, all_classes=False)
    r.add_argument("--fps", type=_positive_float, default=12.0, help="frames per second")
    r.add_argument("--hold", type=float, default=1.5, help="seconds the last frame is held")
    r.add_argument("--scale", type=_positive_int, default=2, help="pixels per image pixel")
    _add_model_options(r)
    r.set_defaults(func=_cmd_viz_reverse)

    d = vs.add_parser("data", formatter_class=_Defaults,
                      help="a grid of real training images")
    d.add_argument("--out", required=True, help="image file: .png, .jpg or .webp")
    d.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    d.add_argument("--data-dir", help="folder holding the dataset (default: its usual folder, see ddpm train --help)")
    d.add_argument("--split", choices=SPLITS, default="train")
    d.add_argument("--n", type=_positive_int, default=64, help="images, chosen at random")
    d.add_argument("--seed", type=int, default=0, help="seed of the choice")
    d.set_defaults(func=_cmd_viz_data)

    c = vs.add_parser("schedule", formatter_class=_Defaults,
                      help="beta_t, alpha-bar_t and log-SNR against t")
    c.add_argument("--out", required=True, help=figure)
    c.add_argument("--schedule", type=_name_list(SCHEDULES), default=SCHEDULES, metavar="NAME,...",
                   help=f"from {', '.join(SCHEDULES)}")
    c.add_argument("--num-timesteps", type=_positive_int, default=1000, help="diffusion steps T")
    c.set_defaults(func=_cmd_viz_schedule)

    u = vs.add_parser("curves", formatter_class=_Defaults,
                      help="loss (and FID when logged) against step, from a run's metrics")
    u.add_argument("run_dir", metavar="RUN_DIR")
    u.add_argument("--out", required=True, help=figure)
    u.set_defaults(func=_cmd_viz_curves)


def _add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the named presets and their settings",
                       description="Print every preset's full configuration as JSON.")
    p.add_argument("name", nargs="?", choices=sorted(PRESETS), help="show only this preset")
    p.set_defaults(func=_cmd_presets)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ddpm",
        description="Train denoising diffusion (DDPM) image generators from scratch and sample "
                    "them. Run 'ddpm COMMAND --help' for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_eval_parser(sub)
    _add_train_classifier_parser(sub)
    _add_bench_parser(sub)
    _add_presets_parser(sub)
    _add_viz_parser(sub)
    return parser


# --- commands ---------------------------------------------------------------------------------


def _override(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """Apply the options the user set (those not None) on top of the preset."""

    def pick(section, **names):
        given = {field: getattr(args, arg) for field, arg in names.items()
                 if getattr(args, arg, None) is not None}
        return dataclasses.replace(section, **given)

    train = pick(config.train, batch_size="batch_size", grad_accum="grad_accum", lr="lr",
                 warmup_steps="warmup_steps", lr_schedule="lr_schedule", grad_clip="grad_clip", ema_decay="ema_decay",
                 precision="precision", seed="seed", log_every="log_every",
                 sample_every="sample_every", checkpoint_every="checkpoint_every",
                 fid_every="fid_every", fid_n="fid_n", fid_steps="fid_steps",
                 keep_checkpoints="keep_checkpoints", device="device", threads="threads",
                 channels_last="channels_last", compile="compile", on_nan="on_nan")
    if args.steps is not None:
        train = dataclasses.replace(train, steps=args.steps, minutes=None)
    if args.minutes is not None:
        train = dataclasses.replace(train, minutes=args.minutes, steps=None)
    if args.wandb:
        train = dataclasses.replace(train, wandb=True)
    diffusion = pick(config.diffusion, schedule="schedule", num_train_timesteps="num_timesteps",
                     loss="loss", prediction_type="prediction_type",
                     loss_weighting="loss_weighting", min_snr_gamma="min_snr_gamma")
    if getattr(args, "dataset", None) and not getattr(args, "data_dir", None):
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=None))
    data = pick(config.data, dataset="dataset", data_dir="data_dir", split="split",
                image_size="image_size", channels="channels", crop="crop", workers="workers",
                max_memory_gb="max_memory_gb")
    for flag, field, value in (("download", "download", True), ("no_hflip", "hflip", False),
                               ("hflip", "hflip", True),
                               ("folder_labels", "folder_labels", True), ("strict", "strict", True)):
        if getattr(args, flag, False):
            data = dataclasses.replace(data, **{field: value})
    data = resolve_data_config(data)  # the dataset's own size, channels and folder made explicit
    model = pick(config.model, block="arch", base_channels="base_channels",
                 channel_mults="channel_mults", num_res_blocks="num_res_blocks",
                 attention_resolutions="attention_resolutions", dropout="dropout",
                 patch_size="patch_size")
    model = _follow_data(model, data, attention_given=getattr(args, "attention_resolutions", None) is not None)
    if args.zero_terminal_snr:
        diffusion = dataclasses.replace(diffusion, zero_terminal_snr=True)
    # A preset's sampling steps suit its own T; with a smaller --num-timesteps, use all of them.
    T = diffusion.num_train_timesteps
    sample = dataclasses.replace(config.sample, num_sample_steps=min(config.sample.num_sample_steps, T))
    train = dataclasses.replace(train, sample_steps=min(train.sample_steps, T),
                                fid_steps=min(train.fid_steps, T))
    if getattr(args, "class_dropout", None) is not None:
        train = dataclasses.replace(train, class_dropout=args.class_dropout)
    if getattr(args, "guidance", None) is not None:
        sample = dataclasses.replace(sample, guidance=args.guidance)
    return RunConfig(model=model, diffusion=diffusion, data=data, train=train, sample=sample)


def _follow_data(model: UNetConfig, data: DataConfig, *, attention_given: bool) -> UNetConfig:
    """The preset's U-Net reshaped for the data: its channels and image size, with attention kept
    at the same levels (the preset's 7 px of 28 px images is 8 px of 32 px ones)."""
    if model.image_size == data.image_size:
        return dataclasses.replace(model, in_channels=data.channels)
    attention = model.attention_resolutions
    if not attention_given:
        p, levels = model.patch_size, range(len(model.channel_mults))
        old = [model.image_size // p // 2**i for i in levels]
        new = [data.image_size // p // 2**i for i in levels]
        attention = tuple(n for o, n in zip(old, new) if o in attention)
    return dataclasses.replace(model, in_channels=data.channels, image_size=data.image_size,
                               attention_resolutions=attention)


def _summary(config: RunConfig) -> str:
    m, d, t = config.model, config.diffusion, config.train
    stop = f"{t.steps} steps" if t.steps is not None else f"{t.minutes:g} minutes"
    return (
        f"model: U-Net of {m.block} blocks {m.base_channels}x{list(m.channel_mults)}, "
        f"{m.num_res_blocks} blocks/level, "
        f"attention at {list(m.attention_resolutions)} px, {m.in_channels}x{m.image_size}x{m.image_size}\n"
        f"diffusion: {d.schedule} schedule, T={d.num_train_timesteps}, predicts {d.prediction_type}, "
        f"{d.loss} loss" + (f" with min-SNR-{d.min_snr_gamma:g} weights" if d.loss_weighting == "min-snr" else "")
        + "\n"
        f"training: {stop}, batch {t.batch_size}x{t.grad_accum}, lr {t.lr:g}, EMA {t.ema_decay}, "
        f"{t.precision}, on {config.data.dataset}"
        + (f", conditional on {m.num_classes} classes (label dropout {t.class_dropout:g})"
           if m.num_classes else "")
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: argparse.Namespace) -> int:
    """``ddpm train --num-processes N ...`` is ``accelerate launch ... -m ddpm train ...``,
    run in this process so that a failed training process ends in its own message, not in the
    launcher's traceback."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    rest, skip = [], False
    for arg in args.argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            rest.append(arg)
    launch = [
        # Accelerate's torchrun-based launcher; on a machine without GPUs it uses gloo on CPUs.
        "--multi_gpu", "--num_processes", str(args.num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "ddpm", *rest,
    ]
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # The processes share this machine's cores (torchrun alone would give each one thread).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.num_processes))
    print(f"launching {args.num_processes} processes: accelerate launch {' '.join(launch)}",
          flush=True)
    try:
        launch_command(launch_command_parser().parse_args(launch))
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"ddpm train: error: {len(exc.failures)} of {args.num_processes} training processes "
              f"failed (exit code {', '.join(map(str, codes))}); their messages are above",
              file=sys.stderr)
        return max(codes) if codes and max(codes) > 0 else 1
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    launcher = args.num_processes > 1 and "WORLD_SIZE" not in os.environ
    main_process = int(os.environ.get("RANK", "0")) == 0
    log = print if main_process and not launcher else (lambda *a, **k: None)

    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out) != run_dir:
            raise UsageError("--resume continues a run in place; drop --out or point it at the same folder")
        if not list_checkpoints(run_dir):
            raise UsageError(
                f"cannot resume {run_dir}: it has no checkpoints in {run_dir / CHECKPOINT_DIR}; "
                f"start a new run with 'ddpm train --out {run_dir}'"
            )
        config = resume_config(run_dir, steps=args.steps, minutes=args.minutes)
        machine = {k: getattr(args, k) for k in RESUME_MACHINE if getattr(args, k) is not None}
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **machine))
        _check_resume_options(args, config)
        log(f"resuming {run_dir}")
    else:
        run_dir = Path(args.out or f"runs/{args.preset}")
        config = _override(get_preset(args.preset), args)
        if args.conditional:
            config = _conditional(config)
        elif args.class_dropout is not None or args.guidance is not None:
            raise UsageError("--class-dropout and --guidance are settings of a class-conditional "
                             "model; add --conditional")
    check_run(config, run_dir, resume=bool(args.resume),
              num_processes=args.num_processes if launcher else 1)
    if launcher:  # checked here once, not N times by the processes; the data fetched once
        open_dataset(config.data)
        return _launch(args)
    log(_summary(config))
    log(f"parameters: {count_parameters(UNet(config.model)):,}")
    log(f"run directory: {run_dir}  (config in {run_dir / CONFIG_FILE})")
    result = train(config, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if not main_process:
        return 0 if result.stopped_by is None else 128 + result.stopped_by
    if result.stopped_by is not None:
        name = signal.Signals(result.stopped_by).name
        print(f"ddpm train: stopped by {name} at step {result.step}; checkpoint: "
              f"{result.checkpoint}; continue with 'ddpm train --resume {run_dir}'",
              file=sys.stderr)
        return 128 + result.stopped_by  # the shell's code for a process ended by that signal
    print(f"trained {result.step} steps in {result.elapsed_s / 60:.1f} min, last loss {result.last_loss:.4f}"
          + (f", {result.skipped_steps} updates skipped (non-finite loss)"
             if result.skipped_steps else ""))
    print(f"checkpoint: {result.checkpoint}")
    if best_checkpoint_path(run_dir).is_file():
        print(f"best checkpoint (lowest FID): {best_checkpoint_path(run_dir)}")
    if result.grid is not None:
        print(f"sample grid: {result.grid}")
    if result.progress is not None:
        print(f"training progress: {result.progress}")
    return 0


# 'ddpm train --resume' continues a run with the config it started with. Options may be repeated
# (a job script that is simply run again), but only these may change:
RESUME_MACHINE = ("device", "threads")  # where it runs, which changes no result
RESUME_MAY_CHANGE = {("train", "steps"), ("train", "minutes"),  # the stopping rule
                     *(("train", k) for k in RESUME_MACHINE)}


def _check_resume_options(args: argparse.Namespace, saved: RunConfig) -> None:
    """Refuse an option given with --resume that differs from the run's saved config: it would
    otherwise be silently ignored, or change the run half-way."""
    asked = _override(saved, args).to_dict()
    if args.conditional and not saved.model.num_classes:
        asked["model"]["num_classes"] = "the dataset's classes"
    for section, values in saved.to_dict().items():
        for key, value in values.items():
            new = asked[section][key]
            if (section, key) not in RESUME_MAY_CHANGE and new != value:
                raise UsageError(
                    f"--resume continues {args.resume} with the settings it was started with "
                    f"({CONFIG_FILE}), but the command line changes {section}.{key} from "
                    f"{value!r} to {new!r}; drop that option, or start a new run with --out")


def _conditional(config: RunConfig) -> RunConfig:
    """The config of a model conditioned on the dataset's classes (their number read from it)."""
    classes = open_dataset(config.data).classes
    if not classes:
        raise UsageError(f"--conditional needs class labels, and {config.data.dataset} in "
                         f"{config.data.data_dir} has none; add --folder-labels to take them "
                         f"from its subfolders")
    model = dataclasses.replace(config.model, num_classes=len(classes))
    return dataclasses.replace(config, model=model)


def _check_steps(steps: int, T: int) -> None:
    """Sampling steps are a subset of the model's T training timesteps (--steps >= 1 is argparse's)."""
    if steps > T:
        raise UsageError(f"--steps {steps} is more than the model's {T} training timesteps; use 1..{T}")


def _cmd_sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    if out.suffix.lower() in (".png", ".npz"):  # checked now, not after minutes of sampling
        _check_out(args.out, (".png", ".npz"))
    elif out.is_file():
        raise UsageError(f"--out {out} is a file; give a folder, a .png grid or an .npz")
    else:
        check_writable(out, "the output folder")
    settings = {k: v for k, v in {
        "sampler": args.sampler, "num_sample_steps": args.steps, "spacing": args.spacing,
        "eta": args.eta, "variance": args.variance, "x0_transform": args.x0_transform,
        "guidance": args.guidance,
    }.items() if v is not None}
    sc = dataclasses.replace(pipe.config.sample, **settings)
    _check_steps(sc.num_sample_steps, pipe.schedule.num_train_timesteps)
    if args.eta is not None and sc.sampler != "ddim":
        raise UsageError(f"--eta is a DDIM setting; add --sampler ddim or drop --eta {args.eta}")
    if not 0.0 <= sc.eta <= 1.0:
        raise UsageError(f"--eta must be between 0 and 1, got {sc.eta}")
    labels, nrow, n = _class_request(pipe, args.class_, args.n)
    t0 = time.perf_counter()
    images = pipe.generate(n, seed=args.seed, batch_size=args.batch_size, labels=labels,
                           progress=not args.no_progress, **settings)
    seconds = time.perf_counter() - t0
    guided = f", guidance {sc.guidance:g}" if pipe.num_classes else ""
    what = f"{n} images ({sc.sampler}, {sc.num_sample_steps} steps{guided}, {seconds:.1f} s)"
    if args.class_ == "all":
        what += f", {args.n} of each of {pipe.num_classes} classes"
    elif args.class_ is not None:
        what += f" of class {labels}{_class_name(pipe, labels)}"
    if out.suffix.lower() == ".png":
        save_grid(images, out, nrow=nrow)
        print(f"wrote a grid of {what} to {out}")
    elif out.suffix.lower() == ".npz":
        save_npz(images, out)
        print(f"wrote {what} to {out} (uint8 array 'arr_0', [N, H, W, C])")
    else:
        save_images(images, out)
        print(f"wrote {what} to {out}/")
    return 0


def _class_name(pipe, index: int) -> str:
    return f" ({pipe.classes[index]})" if index < len(pipe.classes) else ""


def _class_request(pipe, text: str | None, n: int, *, allow_all: bool = True,
                   ) -> tuple[torch.Tensor | int | None, int | None, int]:
    """``--class`` as (labels for generate, grid row length, number of images): an index, a
    class name (any case), or all (``n`` of each class, one grid row per class)."""
    if text is None:
        return None, None, n
    if pipe.num_classes == 0:
        raise UsageError(f"--class {text}: this model was trained without class labels; drop "
                         f"--class, or train a model with --conditional")
    if text == "all" and not allow_all:
        raise UsageError("--class all is for 'ddpm sample'; here give one class, by index or name")
    if text == "all":
        return torch.arange(pipe.num_classes).repeat_interleave(n), n, n * pipe.num_classes
    names = [c.lower() for c in pipe.classes]
    if text.lower() in names:
        return names.index(text.lower()), None, n
    try:
        index = int(text)
    except ValueError:
        known = f"one of {', '.join(pipe.classes)}" if pipe.classes else "a class index"
        raise UsageError(f"--class {text!r} is not a class of this model; give {known}, an index "
                         f"0..{pipe.num_classes - 1}, or all") from None
    if not 0 <= index < pipe.num_classes:
        raise UsageError(f"--class {index} is out of range: this model has classes "
                         f"0..{pipe.num_classes - 1}")
    return index, None, n


def _eval_table(r: EvalResult) -> str:
    prc = r.precision is not None
    head = f"{'':14}{'n':>7}{'FID':>10}{'KID':>22}" + (f"{'precision':>11}{'recall':>8}" if prc else "")
    rows = [head]
    for name, n, fid, kid, kid_std, p, rc in (
        ("generated", r.n, r.fid, r.kid, r.kid_std, r.precision, r.recall),
        ("floor (real)", r.floor_n, r.floor_fid, r.floor_kid, None, r.floor_precision, r.floor_recall),
    ):
        kid_text = f"{kid:.5f}" + (f" +- {kid_std:.5f}" if kid_std is not None else "")
        rows.append(f"{name:14}{n:>7}{fid:>10.3f}{kid_text:>22}" + (f"{p:>11.3f}{rc:>8.3f}" if prc else ""))
    what = f"{r.sampler}, {r.steps} steps, seed {r.seed}" if r.sampler else "given images"
    times = ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items())
    return (f"{r.extractor} features vs {r.dataset} {r.split} ({r.reference_n:,} images); "
            f"{what}\n" + "\n".join(rows) + f"\ntime: {times}")


def _cmd_eval(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.images is None):
        raise UsageError("give either a run directory or checkpoint to generate from, or "
                         "--images DIR|SAMPLES.npz, not both")
    sample_options = {"--sampler": args.sampler, "--steps": args.steps, "--spacing": args.spacing,
                      "--save-samples": args.save_samples, "--no-ema": args.no_ema or None,
                      "--guidance": args.guidance}
    if args.images is not None:
        given = [k for k, v in sample_options.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply when generating from a checkpoint; "
                             f"drop them with --images")
        if args.dataset is None:
            raise UsageError(f"--images needs --dataset to compare against ({', '.join(DATASETS)})")
        images = load_images(args.images)
        if args.n is not None:
            if args.n > len(images):
                raise UsageError(f"--n {args.n} but {args.images} holds only {len(images)} images")
            images = images[: args.n]
        dataset, data_dir = args.dataset, args.data_dir
        options, provenance = {}, {}
    else:
        pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema)
        dataset = args.dataset or pipe.config.data.dataset
        data_dir = args.data_dir or pipe.config.data.data_dir
        # The run's own images, as its model saw them; another --dataset is taken as it comes.
        options = data_options(pipe.config.data) if dataset == pipe.config.data.dataset else {}
        settings = {k: v for k, v in {"sampler": args.sampler, "num_sample_steps": args.steps,
                                      "spacing": args.spacing, "guidance": args.guidance,
                                      }.items() if v is not None}
        sc = dataclasses.replace(pipe.config.sample, **settings)
        _check_steps(sc.num_sample_steps, pipe.schedule.num_train_timesteps)
        if sc.guidance and not pipe.num_classes:
            raise UsageError(f"--guidance {sc.guidance:g} needs a class-conditional model; this "
                             f"one was trained without labels")
        if args.save_samples and Path(args.save_samples).exists():  # checked before sampling
            raise UsageError(f"--save-samples {args.save_samples} exists; choose a new file")
    evaluator = Evaluator(dataset, data_dir, split=args.split, extractor=args.extractor,
                          data_options=options,
                          inception_weights=args.inception_weights, cache_dir=args.cache_dir,
                          device=resolve_device(args.device), progress=not args.no_progress)
    if args.images is None:
        n = args.n or 10_000
        start = time.perf_counter()
        generated = pipe.generate(n, seed=args.seed, batch_size=args.batch_size,
                                  progress=not args.no_progress, **settings)
        provenance = {"sampler": sc.sampler, "steps": sc.num_sample_steps,
                      "seconds": {"sampling": time.perf_counter() - start}}
        if args.save_samples:
            save_npz(generated, args.save_samples)
        images = to_uint8(generated)
    result = evaluator.evaluate(images, seed=args.seed, prc=args.prc, **provenance)
    print(json.dumps(result.to_dict()) if args.json else _eval_table(result))
    return 0


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; add --force to replace it or choose another --out")
    acc, seconds = train_classifier(args.dataset, args.data_dir, out, epochs=args.epochs, seed=args.seed,
                                    progress=not args.no_progress)
    print(f"{args.dataset} classifier: test accuracy {acc:.2%} after {args.epochs} epochs "
          f"({seconds / 60:.1f} min); weights in {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    config = _override(get_preset(args.preset), args)
    progress = (lambda message: None) if args.json else (lambda m: print(f"measuring {m}", flush=True))
    result = bench(config, seconds=args.seconds, sample_batch_size=args.sample_batch_size,
                   progress=progress)
    print(json.dumps(result.to_dict()) if args.json else format_table(result))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    names = [args.name] if args.name else sorted(PRESETS)
    print(json.dumps({n: get_preset(n).to_dict() for n in names}, indent=2))
    return 0


# --- ddpm viz -------------------------------------------------------------------------------------


def _check_out(path: str, suffixes: Sequence[str], option: str = "--out") -> Path:
    """Refuse, before any work, an output whose suffix is not one of ``suffixes`` or whose folder
    cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name ending in {suffixes[0]}")
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path}: the file must end in {', '.join(suffixes)}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"{option} {path}: cannot write in {out.parent}, which is a file; "
                         f"choose a folder")
    if (reason := unwritable(out.parent)) is not None:
        raise UsageError(f"{option} {path}: cannot write in {out.parent}: {reason}; "
                         f"choose a writable folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _check_timesteps_in_range(timesteps: Sequence[int], T: int) -> None:
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise UsageError(f"--timesteps {bad[0]} is outside 0..{T - 1} (T = {T}); "
                         f"give steps in 0..{T - 1} or raise --num-timesteps")


def _viz_data(args: argparse.Namespace):
    return load_dataset(args.dataset, args.data_dir, getattr(args, "split", "train"))


def _random_images(args: argparse.Namespace) -> torch.Tensor:
    data = _viz_data(args)
    if args.n > len(data):
        raise UsageError(f"--n {args.n} but the split holds only {len(data)} images")
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data), generator=generator)[: args.n]
    return to_model_range(data.images[index])


def _cmd_viz_forward(args: argparse.Namespace) -> int:
    out = _check_out(args.out, FIGURE_SUFFIXES)
    _check_timesteps_in_range(args.timesteps, args.num_timesteps)
    x0 = _random_images(args)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    blocks = []
    for name in args.schedule:
        schedule = make_schedule(name, args.num_timesteps)
        blocks.append((name, forward_noised(x0, schedule, args.timesteps, eps).transpose(0, 1)))
    save_image_table(blocks, [f"t={t}" for t in args.timesteps], out,
                     title=f"q(x_t | x_0), T = {args.num_timesteps}")
    print(f"wrote the forward process of {args.n} {args.dataset} images at "
          f"{len(args.timesteps)} steps ({', '.join(args.schedule)}) to {out}")
    return 0


def _cmd_viz_reverse(args: argparse.Namespace) -> int:
    out = _check_out(args.out, ANIMATION_SUFFIXES)
    sheet = _check_out(args.sheet, FIGURE_SUFFIXES, "--sheet") if args.sheet else None
    if args.hold < 0:
        raise UsageError(f"--hold must be 0 or more seconds, got {args.hold}")
    if out.suffix.lower() == ".mp4":
        video_writer()  # missing imageio-ffmpeg is told now, not after sampling
    if args.n > 256:
        raise UsageError(f"--n {args.n} is more than a frame can show well; use at most 256")
    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    settings = {k: v for k, v in {"sampler": args.sampler, "num_sample_steps": args.steps,
                                  "spacing": args.spacing, "guidance": args.guidance,
                                  }.items() if v is not None}
    sc = dataclasses.replace(pipe.config.sample, **settings)
    _check_steps(sc.num_sample_steps, pipe.schedule.num_train_timesteps)
    if sc.num_sample_steps < 2:
        raise UsageError("an animation of the reverse process needs --steps 2 or more")
    frames = args.frames or min(sc.num_sample_steps, 40)
    if frames > sc.num_sample_steps:
        raise UsageError(f"--frames {frames} is more than the {sc.num_sample_steps} sampling steps; "
                         f"use at most {sc.num_sample_steps} frames or more --steps")
    if sheet is not None and args.sheet_columns > sc.num_sample_steps:
        raise UsageError(f"--sheet-columns {args.sheet_columns} is more than the "
                         f"{sc.num_sample_steps} sampling steps")
    labels, _, _ = _class_request(pipe, args.class_, args.n, allow_all=False)
    states, x0_preds, timesteps = pipe.trace(args.n, seed=args.seed, labels=labels,
                                             progress=not args.no_progress, **settings)
    images, _ = reverse_frames(states, x0_preds if args.show_x0 else None, frames, scale=args.scale)
    save_animation(images, out, fps=args.fps, hold_s=args.hold)
    print(f"wrote the reverse process of {args.n} images ({sc.sampler}, {sc.num_sample_steps} "
          f"steps) as {len(images)} frames to {out}")
    if sheet is not None:
        columns = evenly_spaced(states.shape[0], args.sheet_columns)
        labels = [f"t={timesteps[i]:.0f}" if i < len(timesteps) else "output" for i in columns]
        rows = min(args.n, 8)
        blocks = [("x_t", states[columns, :rows].transpose(0, 1))]
        if args.show_x0:
            blocks.append(("predicted x0", x0_preds[columns, :rows].transpose(0, 1)))
        save_image_table(blocks, labels, sheet, title=f"reverse process ({sc.sampler}, "
                                                      f"{sc.num_sample_steps} steps)")
        print(f"wrote a contact sheet of {len(columns)} steps to {sheet}")
    return 0


def _cmd_viz_data(args: argparse.Namespace) -> int:
    out = _check_out(args.out, (".png", ".jpg", ".jpeg", ".webp"))
    save_grid(_random_images(args), out)
    print(f"wrote {args.n} {args.dataset} {args.split} images to {out}")
    return 0


def _cmd_viz_schedule(args: argparse.Namespace) -> int:
    out = _check_out(args.out, FIGURE_SUFFIXES)
    plot_schedules([make_schedule(name, args.num_timesteps) for name in args.schedule], out)
    print(f"wrote beta, alpha-bar and log-SNR of {', '.join(args.schedule)} to {out}")
    return 0


def _cmd_viz_curves(args: argparse.Namespace) -> int:
    out = _check_out(args.out, FIGURE_SUFFIXES)
    metrics = Path(args.run_dir) / METRICS_FILE
    if not metrics.is_file():
        raise UsageError(f"{args.run_dir} has no {METRICS_FILE}; give the folder of a training run")
    if plot_curves(metrics, out) is None:
        raise UsageError(f"{metrics} has no logged loss yet; train longer than --log-every steps")
    print(f"wrote the curves of {metrics} to {out}")
    return 0


def _one_line_warning(command: str, message, category, filename, lineno, file=None,
                      line=None) -> None:
    """Warnings (skipped files, a damaged newest checkpoint) as one line, like the errors."""
    print(f"ddpm {command}: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # as typed: 'ddpm train --num-processes N' hands them on to its processes
    if args.command == "viz":
        args.command = f"viz {args.figure}"  # messages name the figure: 'ddpm viz reverse: error'
    try:
        with warnings.catch_warnings():
            warnings.showwarning = functools.partial(_one_line_warning, args.command)
            return args.func(args)
    except (UsageError, ValueError, CheckpointError, DatasetNotFoundError, WeightsNotFoundError) as exc:
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SaveError as exc:  # e.g. a full disk: the machine's fault, not a usage error
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        print(f"ddpm {args.command}: error: cannot write {exc.filename}: {exc.strerror}; "
              f"choose a writable path", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as exc:  # training diverged: not a usage error, but no traceback
        print(f"ddpm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            raise
        # Another training process failed and this one lost it mid-collective: the cause is in
        # that process's message, so one line here, not a second traceback.
        print(f"ddpm {args.command} (process {os.environ['RANK']}): stopped: "
              f"{str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
