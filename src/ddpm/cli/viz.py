"""``ddpm viz FIGURE``: the forward process, the reverse process, data, schedules and curves."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..cascade import Cascade, stage_settings
from ..data import DATASETS, SPLITS, load_dataset, to_model_range
from ..pipeline import load_pipeline
from ..rundir import METRICS_FILE
from ..schedules import SCHEDULES, make_schedule
from ..viz import (
    ANIMATION_SUFFIXES,
    FIGURE_SUFFIXES,
    enlarged,
    evenly_spaced,
    forward_noised,
    plot_curves,
    plot_schedules,
    reverse_frames,
    save_animation,
    save_grid,
    save_image_table,
    video_writer,
)
from .options import (
    Defaults,
    Parser,
    UsageError,
    add_model_options,
    check_out,
    name_list,
    number,
    positive_int,
    seed,
    whole_list,
)
from .sample import (
    add_cascade_options,
    add_class_option,
    add_classifier_options,
    add_sample_settings,
    cascade_request,
    class_request,
    classifier_request,
    sample_settings,
)

FORWARD_TIMESTEPS = (0, 10, 50, 100, 150, 200, 250, 300, 400, 600, 800, 999)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz", help="pictures: forward noising, the reverse process, data, schedules, curves",
        description="Draw the figures of diffusion. Each command writes the file given by --out; "
                    "its extension picks the format.",
    )
    vs = p.add_subparsers(dest="figure", metavar="FIGURE", parser_class=Parser)
    vs.required = True
    figure = f"figure file: {', '.join(FIGURE_SUFFIXES)}"
    data_dir_help = "folder holding the dataset (default: its usual folder, see ddpm train --help)"

    f = vs.add_parser("forward", formatter_class=Defaults,
                      help="real images noised by q(x_t | x_0) at chosen t, one column per t",
                      description="The forward process: the same real images at each t (t = 0 is "
                                  "the data, t = k after k noising steps), one row block per "
                                  "schedule.")
    f.add_argument("--out", required=True, help=figure)
    f.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    f.add_argument("--data-dir", help=data_dir_help)
    f.add_argument("--n", type=positive_int, default=4, help="images (rows per schedule)")
    f.add_argument("--timesteps", type=whole_list, default=FORWARD_TIMESTEPS, metavar="T1,T2,...",
                   help="the t of each column, in 0..T-1")
    f.add_argument("--schedule", type=name_list(SCHEDULES), default=("linear",), metavar="NAME,...",
                   help=f"beta schedules, from {', '.join(SCHEDULES)}")
    f.add_argument("--num-timesteps", type=positive_int, default=1000, help="diffusion steps T")
    f.add_argument("--seed", type=seed, default=0, help="seed of the images chosen and the noise")
    f.set_defaults(func=run_forward)

    r = vs.add_parser("reverse", formatter_class=Defaults,
                      help="the reverse process from noise to images as a GIF or MP4",
                      description="Animate a trained model's reverse process: a grid of samples "
                                  "per frame from x_T to the output, the last frame held.")
    r.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    r.add_argument("--out", required=True, help=f"animation: {', '.join(ANIMATION_SUFFIXES)}")
    r.add_argument("--n", type=positive_int, default=16, help="images in each frame's grid")
    r.add_argument("--frames", type=number(int, at_least=2),
                   help="frames, spread evenly from x_T to the output (default: min(steps, 40))")
    r.add_argument("--seed", type=seed, default=0, help="seed of the noise (as 'ddpm sample --seed')")
    r.add_argument("--show-x0", action="store_true",
                   help="show the network's prediction of x0 beside each x_t")
    r.add_argument("--sheet", metavar="SHEET.png",
                   help=f"also write a contact sheet of chosen steps ({figure})")
    r.add_argument("--sheet-columns", type=number(int, at_least=2), default=8,
                   help="steps on the sheet")
    add_cascade_options(r)
    add_class_option(r, all_classes=False)
    add_classifier_options(r)
    r.add_argument("--fps", type=number(float, above=0), default=12.0, help="frames per second")
    r.add_argument("--hold", type=number(float, at_least=0), default=1.5,
                   help="seconds the last frame is held")
    r.add_argument("--scale", type=positive_int, default=2, help="pixels per image pixel")
    add_sample_settings(r)
    add_model_options(r)
    r.set_defaults(func=run_reverse)

    d = vs.add_parser("data", formatter_class=Defaults, help="a grid of real training images")
    d.add_argument("--out", required=True, help="image file: .png, .jpg or .webp")
    d.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    d.add_argument("--data-dir", help=data_dir_help)
    d.add_argument("--split", choices=SPLITS, default="train")
    d.add_argument("--n", type=positive_int, default=64, help="images, chosen at random")
    d.add_argument("--seed", type=seed, default=0, help="seed of the choice")
    d.set_defaults(func=run_data)

    c = vs.add_parser("schedule", formatter_class=Defaults,
                      help="beta_t, alpha-bar_t and log-SNR against t")
    c.add_argument("--out", required=True, help=figure)
    c.add_argument("--schedule", type=name_list(SCHEDULES), default=SCHEDULES, metavar="NAME,...",
                   help=f"from {', '.join(SCHEDULES)}")
    c.add_argument("--num-timesteps", type=positive_int, default=1000, help="diffusion steps T")
    c.set_defaults(func=run_schedule)

    u = vs.add_parser("curves", formatter_class=Defaults,
                      help="loss (and FID when logged) against step, from a run's metrics")
    u.add_argument("run_dir", metavar="RUN_DIR")
    u.add_argument("--out", required=True, help=figure)
    u.set_defaults(func=run_curves)


def _check_timesteps_in_range(timesteps: Sequence[int], T: int) -> None:
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise UsageError(f"--timesteps {bad[0]} is outside 0..{T - 1} (T = {T}); "
                         f"give steps in 0..{T - 1} or raise --num-timesteps")


def _random_images(args: argparse.Namespace) -> torch.Tensor:
    data = load_dataset(args.dataset, args.data_dir, getattr(args, "split", "train"))
    if args.n > len(data):
        raise UsageError(f"--n {args.n} but the split holds only {len(data)} images")
    generator = torch.Generator().manual_seed(args.seed)
    index = torch.randperm(len(data), generator=generator)[: args.n]
    return to_model_range(data.images[index])


def run_forward(args: argparse.Namespace) -> int:
    out = check_out(args.out, FIGURE_SUFFIXES)
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


def run_reverse(args: argparse.Namespace) -> int:
    out = check_out(args.out, ANIMATION_SUFFIXES)
    sheet = check_out(args.sheet, FIGURE_SUFFIXES, "--sheet") if args.sheet else None
    if out.suffix.lower() == ".mp4":
        video_writer()  # missing imageio-ffmpeg is told now, not after sampling
    if args.n > 256:
        raise UsageError(f"--n {args.n} is more than a frame can show well; use at most 256")
    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema,
                         precision=args.precision, compile=args.compile)
    settings, sc = sample_settings(args, pipe)
    steps = sc.num_sample_steps
    if steps < 2:
        raise UsageError("an animation of the reverse process needs --steps 2 or more")
    frames = args.frames or min(steps, 40)
    if frames > steps:
        raise UsageError(f"--frames {frames} is more than the {steps} sampling steps; "
                         f"use at most {steps} frames or more --steps")
    if sheet is not None and args.sheet_columns > steps:
        raise UsageError(f"--sheet-columns {args.sheet_columns} is more than the {steps} "
                         f"sampling steps")
    guidance = classifier_request(args, pipe)
    labels, _, _ = class_request(pipe, args.class_, args.n, allow_all=False,
                                 classifier=guidance.get("classifier"))
    chain = cascade_request(args, pipe, guidance)
    if chain.stages and sheet is not None:
        raise UsageError("--sheet draws one model's reverse process; drop --sheet or --then")
    states, x0_preds, timesteps = pipe.trace(args.n, seed=args.seed, labels=labels,
                                             progress=not args.no_progress, **guidance, **settings)
    if chain.stages:
        images = _chain_frames(chain, args, states, x0_preds, labels, frames)
    else:
        images, _ = reverse_frames(states, x0_preds if args.show_x0 else None, frames,
                                   scale=args.scale)
    save_animation(images, out, fps=args.fps, hold_s=args.hold)
    stages = f", then {len(chain.stages)} super-resolution stage(s)" if chain.stages else ""
    print(f"wrote the reverse process of {args.n} images ({sc.sampler}, {steps} steps{stages}) "
          f"as {len(images)} frames to {out}")
    if sheet is not None:
        columns = evenly_spaced(states.shape[0], args.sheet_columns)
        column_labels = [f"t={timesteps[i]:.0f}" if i < len(timesteps) else "output" for i in columns]
        rows = min(args.n, 8)
        blocks = [("x_t", states[columns, :rows].transpose(0, 1))]
        if args.show_x0:
            blocks.append(("predicted x0", x0_preds[columns, :rows].transpose(0, 1)))
        save_image_table(blocks, column_labels, sheet,
                         title=f"reverse process ({sc.sampler}, {steps} steps)")
        print(f"wrote a contact sheet of {len(columns)} steps to {sheet}")
    return 0


def _chain_frames(chain: Cascade, args: argparse.Namespace, states: torch.Tensor,
                  x0_preds: torch.Tensor, given: torch.Tensor | int | None,
                  frames: int) -> list[np.ndarray]:
    """The frames of a cascade's reverse processes, the base's and each stage's in turn, every
    frame at the last stage's size (the smaller stages' pixels repeated)."""
    size = chain.image_shape[-1]
    labels = chain.base.class_labels(args.n, given)
    steps = stage_settings(args.stage_steps, args.stage_sampler)
    traces = [(states, x0_preds)]
    for k, stage in enumerate(chain.stages, start=1):
        low = to_model_range(traces[-1][0][-1])  # the stage before's 8-bit output
        traces.append(stage.trace(args.n, seed=args.seed + k, progress=not args.no_progress,
                                  labels=labels if stage.num_classes else None, low_res=low,
                                  **steps)[:2])
    out = []
    for s, x0 in traces:
        s, x0 = enlarged(s, size), enlarged(x0, size)
        count = min(frames, s.shape[0])
        out += reverse_frames(s, x0 if args.show_x0 else None, count, scale=args.scale)[0]
    return out


def run_data(args: argparse.Namespace) -> int:
    out = check_out(args.out, (".png", ".jpg", ".jpeg", ".webp"))
    save_grid(_random_images(args), out)
    print(f"wrote {args.n} {args.dataset} {args.split} images to {out}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    out = check_out(args.out, FIGURE_SUFFIXES)
    plot_schedules([make_schedule(name, args.num_timesteps) for name in args.schedule], out)
    print(f"wrote beta, alpha-bar and log-SNR of {', '.join(args.schedule)} to {out}")
    return 0


def run_curves(args: argparse.Namespace) -> int:
    out = check_out(args.out, FIGURE_SUFFIXES)
    metrics = Path(args.run_dir) / METRICS_FILE
    if not metrics.is_file():
        raise UsageError(f"{args.run_dir} has no {METRICS_FILE}; give the folder of a training run")
    if plot_curves(metrics, out) is None:
        raise UsageError(f"{metrics} has no logged loss yet; train longer than --log-every steps")
    print(f"wrote the curves of {metrics} to {out}")
    return 0
