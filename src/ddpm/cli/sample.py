"""``ddpm sample`` and ``ddpm eval``: images from a trained model, and their FID and KID.

Both (and ``ddpm viz reverse``) take the sample settings (``config.SampleConfig``) as options
and check them through :func:`sample_settings`, the one builder of what a command asks the
pipeline for.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..autoencoder import load_autoencoder, reconstruction_scores, scores_text
from ..cascade import Cascade, upscale
from ..checkpoint import CHECKPOINT_DIR, check_writable
from ..config import GUIDANCE_MAX, SampleConfig
from ..data import DATASETS, IMAGE_SUFFIXES, SPLITS, load_dataset, load_images, to_uint8
from ..metrics import (
    EXTRACTORS,
    INCEPTION_FILE,
    EvalResult,
    Evaluator,
    check_image_count,
    data_options,
    resolve_extractor,
)
from ..noisy_classifier import NoisyClassifierFile, check_compatible, load_noisy_classifier
from ..pipeline import Pipeline, load_pipeline
from ..rundir import CONFIG_FILE, low_res_inputs
from ..runtime import resolve_device
from ..samplers import SAMPLER_OPTIONS, SAMPLER_SPECS, sampler_spec
from ..sde import PROBES
from ..settings import settings_of
from ..superres import SuperResConfig
from ..viz import GRID_SUFFIXES, save_grid, save_images, save_npz
from .options import (
    Defaults,
    UsageError,
    add_model_options,
    add_settings,
    check_out,
    given_settings,
    number,
    positive_int,
    seed,
    setting_flags,
)


def add_sample_settings(p: argparse.ArgumentParser) -> None:
    """The sample settings as options (each defaulting to the run's own)."""
    add_settings(p, "sample", default_note=lambda key, default: "default: the run's")


def sample_settings(args: argparse.Namespace, pipe: Pipeline) -> tuple[dict[str, Any], SampleConfig]:
    """The sample settings given on the command line, and the run's SampleConfig with them
    over it, checked against the model (steps within its T, guidance only with classes) and
    for options that would have no effect with the chosen sampler."""
    settings = given_settings(args).get("sample", {})
    sc = pipe.sample_config(**settings)
    for name in sorted(set(settings) & SAMPLER_OPTIONS):
        if name not in sampler_spec(sc.sampler).options:
            takers = [spec.name for spec in SAMPLER_SPECS.values() if name in spec.options]
            flag = setting_flags()[f"sample.{name}"]  # the option as declared, not rebuilt
            raise UsageError(f"{flag} is a setting of the {' and '.join(takers)} sampler"
                             f"{'s' if len(takers) > 1 else ''}, not of {sc.sampler}; add "
                             f"--sampler {takers[-1]} or drop {flag} {settings[name]}")
    return settings, sc


def class_request(pipe: Pipeline, text: str | None, n: int, *, allow_all: bool = True,
                  classifier: NoisyClassifierFile | None = None,
                  ) -> tuple[torch.Tensor | int | None, int | None, int]:
    """``--class`` as (labels for generate, grid row length, number of images): an index, a
    class name (any case), or all (``n`` of each class, one grid row per class). The classes
    are the model's, or for an unconditional model guided by ``classifier`` the classifier's."""
    if text is None:
        return None, None, n
    num_classes = pipe.num_classes or (classifier.num_classes if classifier is not None else 0)
    classes = pipe.classes or (classifier.classes if classifier is not None else ())
    whose = "this model" if pipe.num_classes else "the classifier"
    if num_classes == 0:
        raise UsageError(f"--class {text}: this model was trained without class labels; drop "
                         f"--class, guide it with --classifier CLF.pt, or train a model with "
                         f"--conditional")
    if text == "all" and not allow_all:
        raise UsageError("--class all is for 'ddpm sample'; here give one class, by index or name")
    if text == "all":
        return torch.arange(num_classes).repeat_interleave(n), n, n * num_classes
    names = [c.lower() for c in classes]
    if text.lower() in names:
        return names.index(text.lower()), None, n
    try:
        index = int(text)
    except ValueError:
        known = f"one of {', '.join(classes)}" if classes else "a class index"
        raise UsageError(f"--class {text!r} is not a class of {whose}; give {known}, an index "
                         f"0..{num_classes - 1}, or all") from None
    if not 0 <= index < num_classes:
        raise UsageError(f"--class {index} is out of range: {whose} has classes "
                         f"0..{num_classes - 1}")
    return index, None, n


def add_classifier_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("classifier guidance (Dhariwal & Nichol 2021)")
    g.add_argument("--classifier", metavar="CLF.pt", default=None,
                   help="guide sampling towards --class with this noise-aware classifier (made by "
                        "'ddpm train-classifier --noisy'); any model, with --guidance too")
    g.add_argument("--classifier-scale", type=number(float, at_least=0, at_most=GUIDANCE_MAX),
                   default=None, metavar="S",
                   help="scale s of the classifier's gradient (default 1; 0 is unguided)")


def classifier_request(args: argparse.Namespace, pipe: Pipeline) -> dict[str, Any]:
    """``--classifier`` and ``--classifier-scale`` as ``generate``'s keyword arguments, the
    classifier loaded and checked against the model (dataset, classes, schedule, image shape)."""
    if args.classifier is None:
        if args.classifier_scale is not None:
            raise UsageError(f"--classifier-scale {args.classifier_scale:g} needs --classifier "
                             f"CLF.pt to scale; add one, or drop the scale")
        return {}
    try:
        classifier = load_noisy_classifier(args.classifier, device=pipe.device)
        check_compatible(classifier, pipe.config, pipe.classes, run=args.checkpoint)
    except ValueError as exc:
        raise UsageError(f"--classifier {args.classifier}: {exc}") from None
    scale = 1.0 if args.classifier_scale is None else args.classifier_scale
    return {"classifier": classifier, "classifier_scale": scale}


def add_class_option(p: argparse.ArgumentParser, all_classes: bool = True) -> None:
    p.add_argument("--class", dest="class_", metavar="INDEX|NAME" + ("|all" if all_classes else ""),
                   help="class-conditional models: the class to draw, by index or name"
                        + (", or all for --n images of every class, one row each" if all_classes
                           else "") + " (default: every class in turn)")


# --- ddpm sample --------------------------------------------------------------------------------


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="generate images from a trained run or checkpoint", formatter_class=Defaults,
        description="Generate images from the EMA weights of a run's newest checkpoint or of a "
                    "checkpoint file, with any sampler and step count.")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run directory (its newest checkpoint is used) or a .pt checkpoint")
    p.add_argument("--n", type=positive_int, default=64, help="number of images")
    p.add_argument("--out", required=True, metavar="DIR|GRID.png|SAMPLES.npz",
                   help="a .png (or .jpg, .webp) path gets one grid; a .npz path one uint8 "
                        "array 'arr_0' [N, H, W, C]; any other path becomes a folder of PNGs")
    p.add_argument("--seed", type=seed, default=0, help="seed of the initial noise and every step")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per batch (128 was fastest on a 2-core CPU)")
    add_workers_option(p)
    add_cascade_options(p)
    add_class_option(p)
    add_sample_settings(p)
    add_classifier_options(p)
    add_model_options(p)
    p.set_defaults(func=run_sample)


def workers(text: str) -> int | str:
    """An argparse type: ``auto`` or a number of worker processes, at least 1."""
    if text.strip() == "auto":
        return "auto"
    try:
        return number(int, at_least=1)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or auto: one process per core)") from None


def add_workers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=workers, default="auto", metavar="N|auto",
                   help="processes that sample the batches side by side on a CPU, each with its "
                        "share of the threads (auto: one per core, at most one per batch; one on "
                        "CUDA); the images are the same for any number")


def check_workers(args: argparse.Namespace) -> None:
    """``--workers`` against the other options, before any model is loaded."""
    if args.compile and args.workers not in ("auto", 1):
        raise UsageError(f"--workers {args.workers} and --compile do not mix (each worker would "
                         f"compile the network again); drop one of them")


def processes_text(pipe: Pipeline) -> str:
    """", N processes" for a summary line when the last generate() used several."""
    return f", {pipe.last_workers} processes" if pipe.last_workers > 1 else ""


def add_cascade_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cascades (Ho et al. 2021; docs/cascade.md)")
    g.add_argument("--then", metavar="SR_RUN", action="append", default=[],
                   help="super-resolve the images with this super-resolution run (repeat for a "
                        "longer chain); each stage samples with its own run's settings")
    g.add_argument("--stage-steps", type=positive_int, default=None, metavar="N",
                   help="sampling steps of every --then stage (default: each run's own)")
    g.add_argument("--stage-sampler", choices=sorted(SAMPLER_SPECS), default=None,
                   help="the sampler of every --then stage (default: each run's own)")
    add_conditioning_options(g)


def add_conditioning_options(g: argparse._ActionsContainer) -> None:
    """A super-resolution stage's conditioning augmentation when sampling."""
    rules = {f.name: rule for f, rule in settings_of(SuperResConfig)}  # as declared
    g.add_argument("--cond-aug-level", type=number(float, rules["aug_level"]), default=None,
                   metavar="LEVEL", help="noise the low-res input of every super-resolution stage "
                                         "to this level (default: each run's own)")
    g.add_argument("--cond-blur", type=number(float, rules["blur_sigma"]), default=None,
                   metavar="SIGMA", help="blur the low-res input of every super-resolution stage "
                                         "by this sigma (default: each run's own)")
    g.add_argument("--cond-project", action="store_const", const=True, default=None,
                   help="make every super-resolution stage's output, averaged down, its input: "
                        "project each predicted x0 (Wang et al. 2023; default: each run's own)")


def conditioned(args: argparse.Namespace, stage: Pipeline) -> Pipeline:
    """``stage`` with the conditioning given by --cond-aug-level, --cond-blur and --cond-project."""
    return stage.conditioned(aug_level=args.cond_aug_level, blur_sigma=args.cond_blur,
                             project=args.cond_project)


def cascade_request(args: argparse.Namespace, pipe: Pipeline, guidance: dict[str, Any]) -> Cascade:
    """``pipe`` and the ``--then`` stages after it, each checked against the one before."""
    stages = [conditioned(args, load_pipeline(path, device=args.device, use_ema=not args.no_ema,
                                              precision=args.precision)) for path in args.then]
    chain = Cascade(conditioned(args, pipe) if pipe.low_res is not None else pipe, stages)
    for flag, value, alone in (("--stage-steps", args.stage_steps, False),
                               ("--stage-sampler", args.stage_sampler, False),
                               ("--cond-aug-level", args.cond_aug_level, True),
                               ("--cond-blur", args.cond_blur, True),
                               ("--cond-project", args.cond_project, True)):
        if value is not None and not stages and not (alone and pipe.low_res is not None):
            raise UsageError(f"{flag} is a setting of the --then stages; add --then SR_RUN")
    if stages and guidance:
        raise UsageError("--classifier guides a model sampled alone; drop it or the --then stages")
    return chain


def generate(chain: Cascade, args: argparse.Namespace, n: int, labels: Any,
             guidance: dict[str, Any], settings: dict[str, Any],
             low_res: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` images of the base model (of a super-resolution model, ``low_res`` super-resolved),
    super-resolved by the chain's stages if it has any."""
    if not chain.stages:
        return chain.base.generate(n, seed=args.seed, batch_size=args.batch_size, labels=labels,
                                   progress=not args.no_progress, low_res=low_res,
                                   workers=args.workers, **guidance, **settings)
    images = chain.generate(n, seed=args.seed, batch_size=args.batch_size, labels=labels,
                            progress=not args.no_progress, stage_steps=args.stage_steps,
                            stage_sampler=args.stage_sampler, workers=args.workers, **settings)
    assert isinstance(images, torch.Tensor)  # (the last stage's, without keep)
    return images


def add_upscale_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upscale", help="super-resolve your own images with a super-resolution run",
        formatter_class=Defaults,
        description="Super-resolve images (an .npz or a folder of image files, each of the side "
                    "the run takes) with a run of 'ddpm train --super-res LOW'.")
    p.add_argument("checkpoint", metavar="SR_RUN", help="a super-resolution run or checkpoint")
    p.add_argument("--images", required=True, metavar="DIR|IMAGES.npz",
                   help="the low-res images: uint8 [N, H, W, C] in an .npz, or a folder of files")
    p.add_argument("--npz-key", metavar="NAME", default=None, help="the array of an .npz to read")
    p.add_argument("--out", required=True, metavar="DIR|GRID.png|SAMPLES.npz",
                   help="as 'ddpm sample --out'")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per batch")
    add_workers_option(p)
    add_conditioning_options(p)
    add_sample_settings(p)
    add_model_options(p)
    p.set_defaults(func=run_upscale)


def _check_sample_out(text: str) -> Path:
    """``--out`` of ``ddpm sample``, checked before any sampling: a grid (.png, .jpg, .webp), an
    .npz, or a folder, which must not be a run's folder, a file, or named like an image."""
    out, formats = Path(text), "a folder, a grid (.png, .jpg or .webp) or an .npz"
    if not text.strip():
        raise UsageError(f"--out is empty; give {formats}")
    suffix = out.suffix.lower()
    if suffix in (*GRID_SUFFIXES, ".npz"):
        return check_out(text, (*GRID_SUFFIXES, ".npz"))
    if suffix in IMAGE_SUFFIXES or suffix in (".gif", ".tif", ".tiff"):
        raise UsageError(f"--out {text}: sample writes no {suffix} files; give {formats}")
    if out.is_file():
        raise UsageError(f"--out {text} is a file; give {formats}")
    if (out / CHECKPOINT_DIR).is_dir() or (out / CONFIG_FILE).is_file():
        raise UsageError(f"--out {text} is a training run's folder; give a new folder for the "
                         f"images")
    check_writable(out, "the output folder")
    return out


def run_sample(args: argparse.Namespace) -> int:
    out = _check_sample_out(args.out)  # now, not after minutes of sampling
    check_workers(args)
    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema,
                         precision=args.precision, compile=args.compile)
    settings, sc = sample_settings(args, pipe)
    guidance = classifier_request(args, pipe)
    labels, nrow, n = class_request(pipe, args.class_, args.n, classifier=guidance.get("classifier"))
    chain = cascade_request(args, pipe, guidance)  # each stage checked now, before sampling
    t0 = time.perf_counter()
    images = generate(chain, args, n, labels, guidance, settings)
    seconds = time.perf_counter() - t0
    guided = f", guidance {sc.guidance:g}" if pipe.num_classes else ""
    if guidance:
        guided += f", classifier scale {guidance['classifier_scale']:g}"
    classes = pipe.classes or (guidance["classifier"].classes if guidance else ())
    adaptive = (f", {pipe.last_evaluations:.0f} network evaluations an image"
                if sampler_spec(sc.sampler).adaptive else "")
    what = (f"{n} images ({sc.sampler}, {sc.num_sample_steps} steps{adaptive}{guided}, "
            f"{pipe.sampling_precision(sc.sampler)}{processes_text(pipe)}, {seconds:.1f} s)")
    if chain.stages:
        k = len(chain.stages)
        what += f", super-resolved by {k} stage{'s' if k > 1 else ''} to " \
                f"{'x'.join(map(str, chain.image_shape))}"
    if args.class_ == "all":
        what += f", {args.n} of each of {pipe.num_classes} classes"
    elif isinstance(labels, int):  # one class, given by index or name
        name = f" ({classes[labels]})" if labels < len(classes) else ""
        what += f" of class {labels}{name}"
    _write_images(images, out, what, nrow)
    return 0


def _write_images(images: torch.Tensor, out: Path, what: str, nrow: int | None = None) -> None:
    if out.suffix.lower() in GRID_SUFFIXES:
        save_grid(images, out, nrow=nrow)
        print(f"wrote a grid of {what} to {out}")
    elif out.suffix.lower() == ".npz":
        save_npz(images, out)
        print(f"wrote {what} to {out} (uint8 array 'arr_0', [N, H, W, C])")
    else:
        save_images(images, out)
        print(f"wrote {what} to {out}/")


def run_upscale(args: argparse.Namespace) -> int:
    out = _check_sample_out(args.out)
    check_workers(args)
    low = load_images(args.images, npz_key=args.npz_key)
    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema,
                         precision=args.precision, compile=args.compile)
    if pipe.low_res is None:
        raise UsageError(f"{args.checkpoint} is not a super-resolution run; upscale takes a run "
                         f"of 'ddpm train --super-res LOW'")
    pipe = conditioned(args, pipe)
    c, size, _ = pipe.image_shape
    if tuple(low.shape[1:]) != (c, pipe.low_res, pipe.low_res):
        raise UsageError(f"{args.images} holds {'x'.join(map(str, low.shape[1:]))} images, and "
                         f"{args.checkpoint} super-resolves {c}x{pipe.low_res}x{pipe.low_res} ones "
                         f"to {size} px")
    settings, sc = sample_settings(args, pipe)
    t0 = time.perf_counter()
    images = upscale(pipe, low, seed=args.seed, batch_size=args.batch_size,
                     progress=not args.no_progress, workers=args.workers, **settings)
    what = (f"{len(images)} images super-resolved from {pipe.low_res} to {size} px ({sc.sampler}, "
            f"{sc.num_sample_steps} steps, {pipe.precision}{processes_text(pipe)}, "
            f"{time.perf_counter() - t0:.1f} s)")
    _write_images(images, out, what)
    return 0


# --- ddpm eval ----------------------------------------------------------------------------------


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="FID and KID of a model or of a set of images", formatter_class=Defaults,
        description=(
            "Score a trained model (it generates --n images) or existing images (--images) with "
            "FID and KID against a dataset split, beside the floor: the same metrics for --n "
            "held-out real images, what a perfect generator would score. Reference statistics "
            "are computed once and cached per dataset, split and feature extractor."))
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", nargs="?",
                   help="a run directory or .pt checkpoint to generate from (or use --images)")
    p.add_argument("--images", metavar="DIR|SAMPLES.npz",
                   help="score these images instead: a folder of PNG/JPEG files or an .npz of "
                        "uint8 [N, H, W, C] (needs --dataset)")
    p.add_argument("--npz-key", metavar="NAME", default=None,
                   help="the array of an --images .npz that holds several (default: its only one, "
                        "or arr_0)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="reference dataset (default: the run's)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset (default: the run's)")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="reference split (default: train); the floor uses held-out images of the "
                        "other split. With --nll: the images scored (default: test)")
    p.add_argument("--n", type=number(int, at_least=2), default=None,
                   help="images to generate (default 10000), to take from --images (default: "
                        "all), or to score with --nll (default 1000)")
    p.add_argument("--nll", action="store_true",
                   help="instead of FID: the negative log-likelihood bound of the model on real "
                        "images, in bits per dimension (Ho et al. 2020, eq. 5), with its "
                        "standard error")
    p.add_argument("--method", choices=("vlb", "ode"), default=None,
                   help="--nll: vlb, the variational bound (the default), or ode, the exact "
                        "likelihood of the probability-flow ODE (Song et al. 2021; it takes "
                        "--sde-view, --ode-rtol, --ode-atol, --probes and --probe)")
    p.add_argument("--probes", type=number(int, at_least=1), default=None, metavar="K",
                   help="--nll --method ode: Hutchinson probes per image (default 1)")
    p.add_argument("--probe", choices=PROBES, default=None,
                   help="--nll --method ode: the probes' law (default rademacher)")
    p.add_argument("--nll-timesteps", metavar="K|all", type=_nll_timesteps, default=50,
                   help="--nll: estimate the bound's T - 1 middle terms from K of them, one per "
                        "stratum of steps (unbiased), or use all of them (T network evaluations "
                        "per image)")
    p.add_argument("--reconstruction", action="store_true",
                   help="instead of FID: how well an autoencoder run (ddpm train-autoencoder) "
                        "reconstructs --n test images (default 2000): PSNR, and rFID where a "
                        "packaged classifier reads the data")
    p.add_argument("--extractor", choices=EXTRACTORS, default="auto",
                   help="features: auto is the packaged classifier for mnist and fashion-mnist "
                        "(offline), inception-v3 (standard FID) otherwise")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help=f"Inception-v3 FID weights ({INCEPTION_FILE}); default: the torch hub cache")
    p.add_argument("--prc", action="store_true",
                   help="also precision and recall (Kynkaanniemi et al. 2019, k = 3)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the generated images and of KID's subsets")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per sampling batch (128 was fastest on a 2-core CPU)")
    add_workers_option(p)
    p.add_argument("--save-samples", metavar="SAMPLES.npz", default=None,
                   help="also keep the generated images, for other tools")
    p.add_argument("--cache-dir", default=None,
                   help="where reference statistics are cached (default: $DDPM_CACHE_DIR or "
                        "~/.cache/ddpm)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    add_cascade_options(p)
    add_class_option(p, all_classes=False)
    add_sample_settings(p)
    add_classifier_options(p)
    add_model_options(p)
    p.set_defaults(func=run_eval)


def _nll_timesteps(text: str) -> int | None:
    if text == "all":
        return None
    return number(int, at_least=1)(text)


def run_eval(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.images is None):
        raise UsageError("give either a run directory or checkpoint to generate from, or "
                         "--images DIR|SAMPLES.npz, not both")
    if args.nll and args.reconstruction:
        raise UsageError("give --nll (a diffusion run) or --reconstruction (an autoencoder run), "
                         "not both")
    ode_only = [flag for flag, value in (("--probes", args.probes), ("--probe", args.probe))
                if value is not None]
    if ode_only and not (args.nll and args.method == "ode"):
        raise UsageError(f"{', '.join(ode_only)} {'apply' if len(ode_only) > 1 else 'applies'} "
                         f"only to the exact likelihood; add --nll --method ode")
    if args.method is not None and not args.nll:
        raise UsageError(f"--method {args.method} chooses how --nll scores; add --nll")
    if args.nll:
        return run_nll(args)
    if args.reconstruction:
        return run_reconstruction(args)
    args.split = args.split or "train"
    if args.images is not None:
        images, dataset, data_dir, options = _given_images(args)
    else:
        if args.npz_key is not None:
            raise UsageError("--npz-key names an array of --images SAMPLES.npz; drop it when "
                             "generating from a checkpoint")
        check_workers(args)
        pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema,
                             precision=args.precision, compile=args.compile)
        settings, sc = sample_settings(args, pipe)
        guidance = classifier_request(args, pipe)
        chain = cascade_request(args, pipe, guidance)
        last = (chain.stages or [pipe])[-1].config.data  # a chain is scored at its last size
        dataset = args.dataset or last.dataset
        data_dir = args.data_dir or last.data_dir
        # The run's own images, as its model saw them; another --dataset is taken as it comes.
        options = data_options(last) if dataset == last.dataset else {}
        labels, _, _ = class_request(pipe, args.class_, 1, allow_all=False,
                                     classifier=guidance.get("classifier"))
        check_image_count(args.n or 10_000, resolve_extractor(args.extractor, dataset), "--n")
        if args.save_samples and Path(args.save_samples).exists():  # checked before sampling
            raise UsageError(f"--save-samples {args.save_samples} exists; choose a new file")
    evaluator = Evaluator(dataset, data_dir, split=args.split, extractor=args.extractor,
                          data_options=options,
                          inception_weights=args.inception_weights, cache_dir=args.cache_dir,
                          device=resolve_device(args.device), progress=not args.no_progress)
    provenance: dict[str, Any] = {}
    if args.images is None:
        start = time.perf_counter()
        n = args.n or 10_000
        # a super-resolution run alone: held-out real images averaged down, super-resolved
        low_res = None
        if pipe.low_res and not chain.stages:
            low_res, held_labels = low_res_inputs(pipe.config, n)
            if pipe.num_classes and labels is None:  # each image's own class
                labels = held_labels
        generated = generate(chain, args, n, labels, guidance, settings, low_res)
        provenance = {"sampler": sc.sampler, "steps": sc.num_sample_steps,
                      "seconds": {"sampling": time.perf_counter() - start}}
        if args.save_samples:
            save_npz(generated, args.save_samples)
        images = to_uint8(generated)
    result = evaluator.evaluate(images, seed=args.seed, prc=args.prc, **provenance)
    print(json.dumps(result.to_dict()) if args.json else _eval_table(result))
    return 0


def run_reconstruction(args: argparse.Namespace) -> int:
    """``ddpm eval AE_RUN --reconstruction``: PSNR and rFID of an autoencoder's reconstructions
    of test images (those its run measured at the end, unless --n or --data-dir differ)."""
    if args.images is not None:
        raise UsageError("--reconstruction scores an autoencoder run's reconstructions; give the "
                         "run, not --images")
    ae = load_autoencoder(args.checkpoint, resolve_device(args.device))
    data = ae.config.data
    if args.data_dir:
        data = replace(data, data_dir=args.data_dir)
    start = time.perf_counter()
    scores = reconstruction_scores(ae.model, data, **({"limit": args.n} if args.n else {}))
    seconds = time.perf_counter() - start
    result = {**scores, "dataset": data.dataset, "autoencoder": str(ae.path), "seconds": seconds}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"reconstructions of {int(scores['n'])} {data.dataset} images by {ae.path}: "
          f"{scores_text(scores)}; {seconds:.1f} s")
    return 0


def run_nll(args: argparse.Namespace) -> int:
    """``ddpm eval RUN --nll``: the bound in bits per dimension on real images (test split)."""
    if args.images is not None:
        raise UsageError("--nll scores a model on real images; give a run directory or "
                         "checkpoint instead of --images")
    sampling_only = [flag for flag, given in (
        ("--save-samples", args.save_samples), ("--prc", args.prc or None),
        ("--classifier", args.classifier), ("--class", args.class_),
        ("--inception-weights", args.inception_weights)) if given is not None]
    ode = args.method == "ode"
    takes = ("sde", "ode_rtol", "ode_atol") if ode else ("variance", "x0_transform")
    sampling_only += [setting_flags()[f"sample.{k}"] for k in given_settings(args).get("sample", {})
                      if k not in takes]
    if sampling_only:
        taken = ", ".join(setting_flags()[f"sample.{k}"] for k in takes)
        raise UsageError(f"{', '.join(sampling_only)} {'do' if len(sampling_only) > 1 else 'does'}"
                         f" not apply to --nll{' --method ode' if ode else ''}; drop "
                         f"{'them' if len(sampling_only) > 1 else 'it'} (it takes {taken})")
    pipe = load_pipeline(args.checkpoint, device=args.device, use_ema=not args.no_ema,
                         precision=args.precision, compile=args.compile)
    if ode:
        settings = given_settings(args).get("sample", {})
        sc = pipe.sample_config(**settings)
    else:
        settings, sc = sample_settings(args, pipe)
    if pipe.decoder is not None:
        raise UsageError("--nll: this run diffuses in an autoencoder's latents, so its bound would "
                         "be on the latents, not on the images' bits; score it by FID/KID instead")
    T = pipe.schedule.num_train_timesteps
    if not ode and args.nll_timesteps is not None and args.nll_timesteps > T - 1:
        raise UsageError(f"--nll-timesteps {args.nll_timesteps} is more than the bound's "
                         f"{T - 1} middle terms; use 1..{T - 1}, or all")
    if ode and float(pipe.schedule.alphas_cumprod[-1]) <= 0:
        raise UsageError("--nll --method ode: this model's schedule reaches zero terminal SNR, "
                         "where the ODE's prior is infinitely wide; score it with --method vlb")
    data = pipe.config.data
    dataset = args.dataset or data.dataset
    split = args.split or "test"
    options = data_options(data) if dataset == data.dataset else {}
    real = load_dataset(dataset, args.data_dir or data.data_dir, split, **options)
    if tuple(real.image_shape) != pipe.image_shape:
        raise UsageError(f"{dataset} {split} images are {'x'.join(map(str, real.image_shape))} "
                         f"but the model takes {'x'.join(map(str, pipe.image_shape))}")
    n = args.n or min(1000, len(real))
    if n > len(real):
        raise UsageError(f"--n {n} but the {dataset} {split} split holds {len(real)} images")
    start = time.perf_counter()
    if ode:
        found = pipe.ode_bits_per_dim(real.images[:n], sde=sc.sde, probes=args.probes or 1,
                                      probe=args.probe or "rademacher", rtol=sc.ode_rtol,
                                      atol=sc.ode_atol, seed=args.seed,
                                      batch_size=args.batch_size, progress=not args.no_progress)
        result = {**found, "dataset": dataset, "split": split, "method": "ode",
                  "seconds": time.perf_counter() - start}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"NLL on {n} {dataset} {split} images (the probability-flow ODE of the {sc.sde} "
                  f"SDE, dequantised, {result['probes']} {result['probe']} probe"
                  f"{'s' if result['probes'] > 1 else ''}, rtol {sc.ode_rtol:g}, atol "
                  f"{sc.ode_atol:g}): {result['bits_per_dim']:.4f} +- "
                  f"{result['bits_per_dim_se']:.4f} bits/dim\n"
                  f"  {result['evaluations_per_image']:.0f} network evaluations an image, fp32; "
                  f"{result['seconds']:.1f} s")
        return 0
    result = pipe.bits_per_dim(real.images[:n], timesteps=args.nll_timesteps, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.no_progress,
                               **settings)
    result = {**result, "dataset": dataset, "split": split, "variance": sc.variance,
              "method": "vlb", "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps(result))
    else:
        terms = ("all terms" if args.nll_timesteps is None
                 else f"{result['timesteps']} of {T - 1} middle terms")
        print(f"NLL bound on {n} {dataset} {split} images ({sc.variance} variances, {terms}): "
              f"{result['bits_per_dim']:.4f} +- {result['bits_per_dim_se']:.4f} bits/dim\n"
              f"  prior {result['prior_bpd']:.5f}, diffusion {result['diffusion_bpd']:.4f}, "
              f"decoder {result['decoder_bpd']:.4f}; {result['seconds']:.1f} s")
    return 0


def _given_images(args: argparse.Namespace) -> tuple[torch.Tensor, str, str | None, dict]:
    """``--images``: the images to score (``--n`` of them), checked against the options that
    only apply when generating."""
    generating = [f"--{k.replace('_', '-')}" for k, v in (
        ("save_samples", args.save_samples), ("no_ema", args.no_ema or None),
        ("classifier", args.classifier), ("class", args.class_), ("then", args.then or None),
        ("stage_steps", args.stage_steps), ("stage_sampler", args.stage_sampler),
        ("cond_aug_level", args.cond_aug_level), ("cond_blur", args.cond_blur),
        ("cond_project", args.cond_project)) if v is not None]
    generating += [setting_flags()[f"sample.{k}"] for k in given_settings(args).get("sample", {})]
    if generating:
        raise UsageError(f"{', '.join(generating)} only apply when generating from a checkpoint; "
                         f"drop them with --images")
    if args.dataset is None:
        raise UsageError(f"--images needs --dataset to compare against ({', '.join(DATASETS)})")
    images = load_images(args.images, npz_key=args.npz_key)
    if args.n is not None:
        if args.n > len(images):
            raise UsageError(f"--n {args.n} but {args.images} holds only {len(images)} images")
        images = images[: args.n]
    check_image_count(len(images), resolve_extractor(args.extractor, args.dataset))
    return images, args.dataset, args.data_dir, {}


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
