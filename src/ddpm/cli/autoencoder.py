"""``ddpm train-autoencoder``: the autoencoder of latent diffusion, trained as a run directory
(or resumed); ``--dry-run`` shows the config it would train."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from ..autoencoder import SECTIONS, TRAIN_SETTINGS, AutoencoderRunConfig, scores_text
from ..models import count_parameters
from ..models.autoencoder import Autoencoder
from ..presets import AUTOENCODER_PRESETS, get_autoencoder_preset
from ..rundir import CONFIG_FILE
from ..train_autoencoder import check_autoencoder_run, resumed_config, train_autoencoder
from .options import Defaults, add_settings, describe, given_settings

TITLES = {"model": "model (the autoencoder)", "loss": "loss", "data": "data",
          "train": "training"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-autoencoder", formatter_class=Defaults,
        help="train the autoencoder of latent diffusion (or resume one)",
        description=(
            "Train a KL-regularised autoencoder (Rombach et al. 2021), the first stage of "
            "latent diffusion (docs/latent.md). Its checkpoints hold the "
            "scale factor that gives the latents unit variance; reconstruction grids (originals "
            "above, reconstructions below) go to RUN_DIR/samples, and the last step logs PSNR "
            "and, for MNIST and Fashion-MNIST, rFID on the test split."))
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run directory to create (default: runs/autoencoder-DATASET)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its newest checkpoint, with its saved "
                        "config (--steps, --minutes, --threads and --device may change)")
    p.add_argument("--preset", choices=sorted(AUTOENCODER_PRESETS), default=None,
                   help="start from this named recipe (its settings: 'ddpm presets NAME'); the "
                        "options given override it (default: the defaults shown below)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config as JSON with the parameter count, and exit "
                        "without writing anything")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    defaults = AutoencoderRunConfig().to_dict()

    def note(key: str, default: Any) -> str:
        section, name = key.split(".")
        return f"default: {describe(defaults[section][name])}"

    groups: dict[str, argparse._ArgumentGroup] = {}
    for section in ("model", "loss", "data", "train"):
        add_settings(p, section, only=TRAIN_SETTINGS if section == "train" else None,
                     sections=SECTIONS, titles=TITLES, default_note=note, groups=groups)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = given_settings(args)
    base = get_autoencoder_preset(args.preset) if args.preset else AutoencoderRunConfig()
    if args.resume:
        run_dir = Path(args.resume)
        config, step = resumed_config(run_dir, given, preset=base if args.preset else None)
    else:
        config = base.with_overrides(given)
        run_dir = Path(args.out or f"runs/autoencoder-{config.data.dataset}")
    check_autoencoder_run(config, run_dir, resume=bool(args.resume))
    params = count_parameters(Autoencoder(config.model))
    if args.dry_run:
        print(json.dumps({"config": config.to_dict(), "parameters": params}, indent=2))
        return 0
    m, d = config.model, config.data
    c, s, _ = m.latent_shape
    print(f"autoencoder: {d.dataset} {d.channels}x{d.image_size}x{d.image_size} -> latents "
          f"{c}x{s}x{s} (F = {m.downsample}), {params:,} parameters, "
          f"{config.loss.reconstruction} + {config.loss.kl_weight:g} KL")
    if args.resume:
        print(f"resuming {run_dir} at step {step} (with the config saved in it)")
    print(f"run directory: {run_dir}  (config in {run_dir / CONFIG_FILE})")
    result = train_autoencoder(config, run_dir, resume=bool(args.resume),
                               progress=not args.no_progress)
    if result.stopped_by is not None:
        name = signal.Signals(result.stopped_by).name
        print(f"ddpm train-autoencoder: stopped by {name} at step {result.step}; checkpoint: "
              f"{result.checkpoint}; continue with 'ddpm train-autoencoder --resume {run_dir}'",
              file=sys.stderr)
        return 128 + result.stopped_by
    print(f"trained {result.step} steps in {result.elapsed_s / 60:.1f} min, last loss "
          f"{result.last_loss:.4g}; latent scale factor {result.scale_factor:.4g}")
    if result.scores:
        print(f"test reconstructions: {scores_text(result.scores)}")
    print(f"checkpoint: {result.checkpoint}")
    return 0

