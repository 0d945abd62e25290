"""``ddpm train``: a run from a preset, a config file and the settings given, or a run resumed;
``--dry-run`` shows the config it would train; ``--num-processes N`` launches N processes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    CHECKPOINT_DIR,
    best_checkpoint_path,
    checkpoint_config,
    list_checkpoints,
    load_run_or_file,
)
from ..config import (
    DiffusionConfig,
    RunConfig,
    differences,
    resumable_keys,
    resume_changes,
    resumed,
    with_overrides,
)
from ..configfile import load_config_file
from ..data import open_dataset
from ..latent import resolve_latent
from ..models import UNet, count_parameters
from ..presets import DEFAULT_GPU_PRESET, DEFAULT_PRESET, FORMULATIONS, LATENT_PRESETS, PRESETS, get_preset
from ..rundir import CONFIG_FILE
from ..runtime import resolve_device, training_precision
from ..settings import shown
from ..train import check_run, resolve_sigma_max, train, training_probe
from .options import Defaults, UsageError, add_settings, describe, given_settings, positive_int, setting_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a DDPM (or resume one)", formatter_class=Defaults,
        description=(
            "Train a DDPM from a named preset (and a --config file), overriding any of its "
            "settings. Checkpoints, sample grids, metrics.jsonl and TensorBoard logs go to the "
            "run directory. Unset options keep the preset's value (shown after each option for "
            f"{DEFAULT_PRESET}; all of them with 'ddpm presets' or 'ddpm train --dry-run')."))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"named configuration to start from (default: {DEFAULT_GPU_PRESET} on "
                        f"CUDA, {DEFAULT_PRESET} on a CPU)")
    p.add_argument("--formulation", choices=sorted(FORMULATIONS), default=None,
                   help="a formulation's settings over the preset's (--config and the options "
                        "given override them): edm is Karras et al. 2022's --preconditioning "
                        "edm --timestep-sampling log-normal --loss-weighting edm, sampled with "
                        "--sampler heun --steps 18 --spacing karras; give --sigma-data too")
    p.add_argument("--config", metavar="FILE.json", default=None,
                   help="settings over the preset's: a run's config.json, a hand-written partial "
                        "one such as {\"train\": {\"lr\": 0.001}}, or --dry-run's output; the "
                        "options given here override it")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="run directory to create (default: runs/PRESET)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its newest checkpoint, with its saved config")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config as JSON with the model's parameter count, "
                        "and exit without writing anything")
    p.add_argument("--conditional", action="store_true",
                   help="condition the model on the dataset's class labels (its number of classes "
                        "is read from the data)")
    p.add_argument("--num-processes", type=positive_int, default=1, metavar="N",
                   help="train with N processes on this machine through 'accelerate launch' "
                        "(PyTorch DDP: gloo on CPUs, NCCL on GPUs); --batch-size is split between "
                        "them. For several machines run 'accelerate launch -m ddpm train' "
                        "(docs/distributed.md)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    preset = get_preset(DEFAULT_PRESET).to_dict()

    def note(key: str, default: Any) -> str:
        section, name = key.split(".")
        return f"{DEFAULT_PRESET}: {describe(preset[section][name])}"

    groups: dict[str, argparse._ArgumentGroup] = {}
    for section in ("model", "diffusion", "data", "train", "latent", "superres"):
        add_settings(p, section, default_note=note, groups=groups)
    add_settings(p, "sample", only=("guidance",), default_note=note, groups=groups)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    launcher = args.num_processes > 1 and "WORLD_SIZE" not in os.environ
    main_process = int(os.environ.get("RANK", "0")) == 0
    log = print if main_process and not launcher and not args.dry_run else (lambda *a, **k: None)
    if args.resume:
        run_dir = Path(args.resume)
        config, step, checkpoint = _resumed_config(args, run_dir)
        if config.train.steps == step and not args.dry_run:
            print(f"{run_dir} is at step {step} already, its --steps: nothing to train (give "
                  f"--steps above {step} to train on)")
            return 0
        log(f"resuming {run_dir} at step {step} from {checkpoint} (with the config saved in it)")
    else:
        run_dir = Path(args.out or f"runs/{_preset_name(args)}")
        # a VE run's sigma_max is measured now, so that what is printed and checked is the run's
        config = resolve_sigma_max(_new_config(args), progress=log is print)
    check_run(config, run_dir, resume=bool(args.resume),
              num_processes=args.num_processes if launcher else 1)
    params = count_parameters(UNet(config.model))
    if args.dry_run:
        print(json.dumps({"config": config.to_dict(), "parameters": params}, indent=2))
        return 0
    if launcher:  # checked here once, not N times by the processes; the data fetched once
        open_dataset(config.data)
        return _launch(args, config)
    preset = args.preset or ("the run's" if args.resume else _preset_name(args))
    log(summary(config, preset + (f", formulation {args.formulation}" if args.formulation else "")))
    log(f"parameters: {params:,}")
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


def _new_config(args: argparse.Namespace) -> RunConfig:
    """The preset, the --config file over it, the options given over both (``with_overrides``
    works out what follows from what), the classes of --conditional, and the latents of
    --autoencoder (``latent.resolve_latent``)."""
    typed = given_settings(args)
    overrides = _merged(load_config_file(args.config), typed) if args.config else typed
    if args.formulation:
        overrides = _merged(FORMULATIONS[args.formulation], overrides)
    config = with_overrides(get_preset(_preset_name(args)), overrides)
    if args.conditional:
        config = _conditional(config)
    elif "class_dropout" in typed.get("train", {}) and not config.model.num_classes:
        # (--guidance is checked with the other settings, by RunConfig.validate)
        raise UsageError("--class-dropout is a setting of a class-conditional model; add "
                         "--conditional")
    name = _preset_name(args)
    if name in LATENT_PRESETS and not config.latent.autoencoder:
        raise UsageError(f"preset {name} diffuses an autoencoder's latents: train one first "
                         f"('ddpm train-autoencoder --preset {LATENT_PRESETS[name]} --out AE_RUN'), "
                         f"then add --autoencoder AE_RUN")
    return resolve_latent(config)[0]


def _preset_name(args: argparse.Namespace) -> str:
    """--preset, or the default for the device the run will use: fashion-gpu on CUDA, fashion-cpu
    on a CPU."""
    if args.preset:
        return args.preset
    device = given_settings(args).get("train", {}).get("device", "auto")
    return DEFAULT_GPU_PRESET if resolve_device(device).type == "cuda" else DEFAULT_PRESET


def _merged(low: dict[str, dict[str, Any]], high: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s: {**low.get(s, {}), **high.get(s, {})} for s in set(low) | set(high)}


def _conditional(config: RunConfig) -> RunConfig:
    """The config of a model conditioned on the dataset's classes (their number read from it)."""
    classes = open_dataset(config.data).classes
    if not classes:
        raise UsageError(f"--conditional needs class labels, and {config.data.dataset} in "
                         f"{config.data.data_dir} has none; add --folder-labels to take them "
                         f"from its subfolders")
    return dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                 num_classes=len(classes)))


def _resumed_config(args: argparse.Namespace, run_dir: Path) -> tuple[RunConfig, int, Path]:
    """The run's saved config (the newest checkpoint's copy), with the settings ``--resume`` may
    change (the stopping rule and the machine) taken from the command line; the step it is at,
    and the checkpoint. Any other option must agree with the run: a job script may simply be
    run again with ``--resume`` added, but not change the run half-way."""
    if args.out and Path(args.out) != run_dir:
        raise UsageError("--resume continues a run in place; drop --out or point it at the same folder")
    if not list_checkpoints(run_dir):
        raise UsageError(f"cannot resume {run_dir}: it has no checkpoints in "
                         f"{run_dir / CHECKPOINT_DIR}; start a new run with 'ddpm train --out {run_dir}'")
    path, state = load_run_or_file(run_dir)
    saved = checkpoint_config(state, path)
    typed = given_settings(args)
    from_file = load_config_file(args.config) if args.config else {}
    # A --config file lays its settings over the run's own, as the options do (not over a
    # preset: what the file leaves out is the run's); the options given override the file.
    overrides = _merged(from_file, typed)
    if args.formulation:  # its settings must be the run's, as if each had been given
        overrides = _merged(FORMULATIONS[args.formulation], overrides)
    if args.preset:
        # The config the preset builds must be the run's: compare every setting.
        changes = differences(saved, _new_config(args), resumable=False)
    else:
        changes = resume_changes(saved, overrides)
        if args.conditional and not saved.model.num_classes:
            changes.append(("model.num_classes", 0, "the dataset's classes"))
    may_change = resumable_keys()
    if changes:
        key, old, new = changes[0]
        section, name = key.split(".")
        in_file = name in from_file.get(section, {}) and name not in typed.get(section, {})
        source, fix = ((f"--config {args.config}", "drop it from the file") if in_file else
                       ("the command line", "drop that option"))
        rule = ", ".join(sorted(setting_flags()[k] for k in may_change))
        raise UsageError(
            f"--resume continues {run_dir} with the settings it was started with ({CONFIG_FILE}), "
            f"but {source} changes {key} from {shown(old, 100)} to {shown(new, 100)}; {fix}, or "
            f"start a new run with --out (--resume may change only {rule})")
    allowed = {s: {k: v for k, v in values.items() if f"{s}.{k}" in may_change}
               for s, values in overrides.items()}
    config, step = resumed(saved, allowed), int(state["step"])
    steps = config.train.steps
    if steps is not None and step > steps:
        raise UsageError(f"{run_dir} has trained {step} steps already, more than --steps {steps} "
                         f"(steps count from the start of the run): give more than {step}, or "
                         f"--minutes M to train M minutes more")
    return config, step, path


def summary(config: RunConfig, preset: str) -> str:
    """The run in four lines (five for latent diffusion), printed before training starts."""
    m, d, t = config.model, config.diffusion, config.train
    stop = f"{t.steps} steps" if t.steps is not None else f"{t.minutes:g} minutes"
    device = resolve_device(t.device)
    precision, why = training_precision(t.precision, device, training_probe(config, device))
    return (
        f"preset: {preset}\n"
        f"model: U-Net of {m.block} blocks {m.base_channels}x{list(m.channel_mults)}, "
        f"{m.num_res_blocks} blocks/level, "
        f"attention at {list(m.attention_resolutions)} px, {m.in_channels}x{m.image_size}x{m.image_size}\n"
        f"diffusion: "
        + (f"VE (NCSN), sigma geometric from {d.sigma_min:g} to {d.sigma_max:.4g}" if d.sde == "ve"
           else f"{d.schedule} schedule")
        + f", T={d.num_train_timesteps}"
        + (", continuous t" if d.timestep_sampling == "continuous" else "")
        + f", predicts {d.prediction_type}"
        + (f" through EDM's preconditioning (sigma_data {d.sigma_data:g})"
           if d.preconditioning == "edm" else "")
        + f", {d.loss} loss" + _weighting_text(d) + "\n"
        f"training: {stop}, batch {t.batch_size}x{t.grad_accum}, lr {t.lr:g}, EMA {t.ema_decay}, "
        f"{precision} ({why}), on {config.data.dataset}"
        + (f", conditional on {m.num_classes} classes (label dropout {t.class_dropout:g})"
           if m.num_classes else "")
        + (f"\nlatents: of the autoencoder {config.latent.autoencoder} (F = "
           f"{config.latent.downsample}, the posterior's {config.latent.posterior})"
           if config.latent.autoencoder else "")
        + (f"\nsuper-resolution: from {config.superres.low} px, conditioning augmentation "
           f"{_augmentation_text(config)}" if config.superres.low else "")
    )


def _augmentation_text(config: RunConfig) -> str:
    sr = config.superres
    parts = []
    if sr.noise:
        parts.append(f"noise to a level in [0, {sr.aug_max:g}] (sampling at {sr.aug_level:g})")
    if sr.blur:
        parts.append(f"blur sigma {sr.blur_min:g}-{sr.blur_max:g} px (sampling at {sr.blur_sigma:g})")
    text = ", ".join(parts) or "none"
    return text + ("; outputs projected onto their inputs when sampling" if sr.project else "")


def _weighting_text(d: DiffusionConfig) -> str:
    """How the loss weights and draws t, in words, for the run's summary."""
    text = {"uniform": "", "min-snr": f" with min-SNR-{d.min_snr_gamma:g} weights",
            "edm": f" with EDM weights (sigma_data {d.sigma_data:g})"}[d.loss_weighting]
    if d.timestep_sampling == "log-normal":
        text += f", ln(sigma) ~ N({d.log_sigma_mean:g}, {d.log_sigma_std:g}^2)"
    return text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: argparse.Namespace, config: RunConfig) -> int:
    """``ddpm train --num-processes N ...`` is ``accelerate launch ... -m ddpm train ...``,
    run in this process so that a failed training process ends in its own message, not in the
    launcher's traceback. ``--precision auto`` is chosen here, once for all the processes, and
    handed to them as the launcher's ``--mixed_precision``."""
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
    device = resolve_device(config.train.device)
    precision, why = training_precision(
        config.train.precision, device,
        training_probe(config, device, processes=args.num_processes))
    if config.train.precision == "auto":
        print(f"precision: {precision} ({why})", flush=True)
    launch = [
        # Accelerate's torchrun-based launcher; on a machine without GPUs it uses gloo on CPUs.
        "--multi_gpu", "--num_processes", str(args.num_processes), "--num_machines", "1",
        "--mixed_precision", precision if precision in ("bf16", "fp16") else "no",
        "--dynamo_backend", "no",
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
