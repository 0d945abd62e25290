"""ddpm and the diffusers library: export a trained model as a diffusers folder, and sample a
diffusers folder with ddpm's samplers, figures and FID.

Export (:func:`export_diffusers`, ``ddpm export RUN --format diffusers OUT``) writes what
``diffusers.DDPMPipeline.from_pretrained(OUT)`` loads: ``model_index.json``, ``unet/`` (a
``UNet2DModel`` config and its weights, the EMA's, as safetensors) and ``scheduler/`` (a
``DDPMScheduler`` config), plus ``ddpm.json``, the run's own config, which diffusers ignores and
ddpm reads back. Our U-Net is Ho et al.'s, and so is diffusers' ``UNet2DModel``; the export maps
each of our tensors to its place there (:func:`to_unet2d_weights`), loads the result with
diffusers, and writes the folder only if that model computes our network's outputs on a random
batch. What ``UNet2DModel`` cannot express (ConvNeXt blocks, patches, per-layer GroupNorm group
counts, ...) is refused with one line naming it (:func:`unet2d_config`).

Import (:func:`load_diffusers`): a folder written by ``DDPMPipeline.save_pretrained``, or by
``UNet2DModel.save_pretrained`` together with its scheduler's ``save_pretrained``, becomes the
network, noise schedule and config of a ``Pipeline``: diffusers' own ``UNet2DModel`` computes the
network (so any of its configurations works), its weights read from safetensors or with
``torch.load(weights_only=True)``; the schedule is rebuilt in float64 from the scheduler's
config (:func:`diffusers_betas`, the formulas of diffusers' schedulers).

diffusers is an optional dependency: ``pip install 'ddpm[diffusers]'``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import settings
from .checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_config,
    load_run_or_file,
    load_weights,
    read_torch_file,
    run_of,
    unwritable,
)
from .config import DiffusionConfig, RunConfig, SampleConfig, build_schedule
from .models import UNet
from .models.unet import AttentionBlock, UNetConfig
from .schedules import NoiseSchedule, make_schedule, schedule_from_betas, zero_terminal_snr_betas

EXTRA = "pip install 'ddpm[diffusers]'"
RUN_CONFIG_FILE = "ddpm.json"  # our config beside diffusers' files; diffusers ignores it

# Our names <-> diffusers' for what the network predicts and the sampler's variance.
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"posterior": "fixed_small", "beta": "fixed_large", "learned": "learned_range"}
# Each of our schedules and the diffusers beta_schedule that, with our betas' end points as
# beta_start and beta_end, defines the same betas (checked numerically: :func:`scheduler_config`).
SCHEDULE_NAMES = {"linear": "linear", "quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}


class ExportError(ValueError):
    """A model or folder diffusers and ddpm cannot exchange; the message says why, in one line."""


def require_diffusers(what: str) -> ModuleType:
    """The diffusers module, or a ValueError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"{what} needs the diffusers library, which is not installed: "
                         f"{EXTRA}") from None
    return diffusers


# --- export ----------------------------------------------------------------------------------


def unet2d_config(mc: UNetConfig, model: UNet) -> dict[str, Any]:
    """The ``UNet2DModel`` config that holds ``model`` (built from ``mc``) exactly, or an
    ExportError naming the first thing diffusers' blocks cannot express."""
    def refuse(reason: str) -> ExportError:
        return ExportError(f"cannot export to diffusers: {reason}; diffusers' UNet2DModel would "
                           f"compute something else, so nothing was written")

    if mc.block != "resnet":
        raise refuse(f"the model has {mc.block} blocks (--arch {mc.block}); UNet2DModel has "
                     f"resnet blocks only")
    if mc.patch_size != 1:
        raise refuse(f"the model folds {mc.patch_size}x{mc.patch_size} patches into channels "
                     f"(--patch-size {mc.patch_size}); UNet2DModel has no such input layer")
    if mc.channel_mults[0] != 1:
        raise refuse(f"its first level is {mc.channel_mults[0]}x the base width (--channel-mults "
                     f"{','.join(map(str, mc.channel_mults))}); in UNet2DModel the input "
                     f"convolution and the time embedding take the first level's width")
    if not mc.time_silu:
        raise refuse("it was trained by ddpm before 0.2, whose resnet blocks read the time "
                     "embedding without the SiLU that UNet2DModel applies")
    groups = {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) != 1:
        widths = sorted({m.num_channels for m in model.modules() if isinstance(m, nn.GroupNorm)})
        raise refuse(f"its GroupNorms have {sorted(groups)} groups (--norm-groups "
                     f"{mc.norm_groups} over widths {widths}), UNet2DModel one count for all; "
                     f"train with a --norm-groups that divides every width")
    heads = {(m.qkv.in_channels, m.heads) for m in model.modules() if isinstance(m, AttentionBlock)}
    if all(h == 1 for _, h in heads):
        head_dim = None  # UNet2DModel: one head as wide as the block
    elif all(c % mc.attention_head_dim == 0 for c, _ in heads):
        head_dim = mc.attention_head_dim
    else:
        raise refuse(f"its attention widths {sorted(c for c, _ in heads)} are not multiples of "
                     f"--attention-head-dim {mc.attention_head_dim}")
    sizes = mc.level_sizes()
    attn = [size in mc.attention_resolutions for size in sizes]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": mc.image_size,
        "in_channels": mc.in_channels,
        "out_channels": mc.in_channels * (2 if mc.learn_variance else 1),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        # timestep_embedding: [sin, cos] of t * 10000^(-i/half), i = 0 .. half-1
        "flip_sin_to_cos": False,
        "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [mc.base_channels * m for m in mc.channel_mults],
        "layers_per_block": mc.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": mc.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": groups.pop(),
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        # our label K is the null class of classifier-free guidance: K + 1 embeddings
        "num_class_embeds": mc.num_classes + 1 if mc.num_classes else None,
    }


# Our parameter names -> UNet2DModel's, by the position of each tensor in the network.
_BLOCK_PARTS = {"norm1": "norm1", "conv1": "conv1", "time_proj": "time_emb_proj", "norm2": "norm2",
                "conv2": "conv2", "skip": "conv_shortcut"}
_RENAMES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"time_mlp\.0\.", "time_embedding.linear_1."),
    (r"time_mlp\.2\.", "time_embedding.linear_2."),
    (r"class_emb\.", "class_embedding."),
    (r"(down|up)_levels\.(\d+)\.blocks\.(\d+)\.(\w+)\.", lambda m: (
        f"{m[1]}_blocks.{m[2]}.resnets.{m[3]}.{_BLOCK_PARTS[m[4]]}.")),
    (r"(down|up)_levels\.(\d+)\.attns\.(\d+)\.", r"\1_blocks.\2.attentions.\3."),
    (r"downsamples\.(\d+)\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"upsamples\.(\d+)\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"mid_block1\.(\w+)\.", lambda m: f"mid_block.resnets.0.{_BLOCK_PARTS[m[1]]}."),
    (r"mid_block2\.(\w+)\.", lambda m: f"mid_block.resnets.1.{_BLOCK_PARTS[m[1]]}."),
    (r"mid_attn\.", "mid_block.attentions.0."),
    (r"norm_out\.", "conv_norm_out."),
]


def to_unet2d_weights(model: UNet) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict under UNet2DModel's names, float32 and contiguous (safetensors).

    Attention: our 1x1 ``qkv`` conv ``[3C, C, 1, 1]`` holds q, k and v one after another, each
    head's channels together, as diffusers' ``to_q``, ``to_k`` and ``to_v`` linears ``[C, C]``
    do; ``proj`` is ``to_out.0`` and ``norm`` ``group_norm``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for pattern, repl in _RENAMES:
            name = re.sub("^" + pattern, repl, name)
        tensor = tensor.detach().float().cpu()
        if ".attentions." in name:
            part, kind = name.rsplit(".", 2)[-2:]  # e.g. ("qkv", "weight")
            base = name[: -len(f"{part}.{kind}")]
            if part == "qkv":
                for key, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0), strict=True):
                    out[f"{base}{key}.{kind}"] = chunk.flatten(1) if kind == "weight" else chunk
                continue
            if part == "proj":
                name, tensor = f"{base}to_out.0.{kind}", tensor.flatten(1) if kind == "weight" else tensor
            elif part == "norm":
                name = f"{base}group_norm.{kind}"
        out[name] = tensor.contiguous()
    return out


def scheduler_config(config: RunConfig, schedule: NoiseSchedule) -> dict[str, Any]:
    """The DDPMScheduler settings of a run: its betas by name where diffusers' formula for that
    name gives ours (within float32), else as ``trained_betas``; prediction type, the sampler's
    variance, its x0 transform and its spacing of the steps."""
    dc, sc = config.diffusion, config.sample
    if dc.preconditioning != "none":
        raise ExportError(f"cannot export to diffusers: the model was trained with "
                          f"--preconditioning {dc.preconditioning}, which scales the network's "
                          f"input and output by the noise level; diffusers' UNet2DModel and "
                          f"schedulers have no such step, so nothing was written")
    betas = schedule.betas
    if dc.zero_terminal_snr:  # diffusers rescales the named schedule's betas itself
        betas = make_schedule(dc.schedule, dc.num_train_timesteps).betas
    named = {"beta_schedule": SCHEDULE_NAMES[dc.schedule], "beta_start": float(betas[0]),
             "beta_end": float(betas[-1]), "trained_betas": None}
    if not _same(diffusers_betas({**named, "num_train_timesteps": dc.num_train_timesteps}), betas):
        named = {"beta_schedule": "linear", "beta_start": float(betas[0]),
                 "beta_end": float(betas[-1]), "trained_betas": betas.tolist()}
    return {
        "num_train_timesteps": dc.num_train_timesteps, **named,
        "rescale_betas_zero_snr": dc.zero_terminal_snr,
        "prediction_type": PREDICTION_TYPES[dc.prediction_type],
        "variance_type": VARIANCE_TYPES[sc.variance],
        "clip_sample": sc.x0_transform == "clip", "clip_sample_range": 1.0,
        # Saharia et al.'s dynamic thresholding, s = the 99.5th percentile of |x0|, at least 1
        # and (ours) unbounded above
        "thresholding": sc.x0_transform == "dynamic", "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1e6 if sc.x0_transform == "dynamic" else 1.0,
        # the run's own choice of steps, where diffusers has it (same definitions as ours)
        **({"timestep_spacing": sc.spacing} if sc.spacing in ("linspace", "leading", "trailing")
           else {}),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-8))


def export_diffusers(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                     force: bool = False, use_ema: bool = True) -> dict[str, Any]:
    """Write the run or checkpoint ``source`` as a diffusers DDPMPipeline folder ``out_dir``.

    The folder is written beside ``out_dir`` and moved into place only when diffusers' model
    loaded from it gives our network's outputs (max |difference| < 1e-4 on a random batch, in
    float32); an existing ``out_dir`` is replaced only with ``force``, and only then. Returns
    what was checked: ``{"max_abs_diff", "scheduler", "unet"}``."""
    diffusers = require_diffusers("ddpm export --format diffusers")
    from safetensors.torch import save_file

    out = _export_destination(source, out_dir, force)
    if is_diffusers_folder(source):
        raise ExportError(f"{source} is a diffusers folder already; 'ddpm export' writes one from "
                          f"a ddpm run directory or .pt checkpoint")
    path, state = load_run_or_file(source)
    config = checkpoint_config(state, path)
    model = UNet(config.model)
    load_weights(model, state, path, ema=use_ema)
    model.eval()
    diverged = [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if diverged:
        raise ExportError(f"cannot export to diffusers: tensor {diverged[0]!r} of the "
                          f"{'EMA' if use_ema else 'raw'} weights of {path} holds NaN or infinite "
                          f"values (the run diverged); nothing was written")
    unet_config = unet2d_config(config.model, model)
    schedule = build_schedule(config)
    sched = scheduler_config(config, schedule)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        version = diffusers.__version__
        _write_json(tmp / "unet" / "config.json",
                    {**unet_config, "_diffusers_version": version})
        save_file(to_unet2d_weights(model), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / "scheduler_config.json",
                    {"_class_name": "DDPMScheduler", "_diffusers_version": version, **sched})
        _write_json(tmp / "model_index.json", {
            "_class_name": "DDPMPipeline", "_diffusers_version": version,
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]})
        _write_json(tmp / RUN_CONFIG_FILE, {"config": config.to_dict(), "step": int(state["step"]),
                                            "classes": list(state.get("classes", ())),
                                            "ema": use_ema})
        # The proof: diffusers' own classes, loaded from the folder, against our network.
        unet = diffusers.UNet2DModel.from_pretrained(tmp / "unet").eval()
        scheduler = diffusers.DDPMScheduler.from_pretrained(tmp / "scheduler")
        diff = _max_output_difference(model, unet, config.model, schedule.num_train_timesteps)
        if not diff < 1e-4:
            raise ExportError(f"cannot export to diffusers: the exported UNet2DModel differs from "
                              f"the model by up to {diff:.2e} on a random batch; nothing was written")
        ours = schedule.alphas_cumprod
        theirs = scheduler.alphas_cumprod.double()
        if not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6):
            raise ExportError(f"cannot export to diffusers: its DDPMScheduler's alpha_bar differs "
                              f"from the run's by up to {(theirs - ours).abs().max():.2e}; nothing "
                              f"was written")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"max_abs_diff": diff, "scheduler": sched, "unet": unet_config,
            "step": int(state["step"]), "source": str(path)}


def _export_destination(source: str | os.PathLike, out_dir: str | os.PathLike,
                        force: bool) -> Path:
    """``out_dir`` as a Path, or a ValueError before any work: a folder that cannot be made, one
    that is a file, holds anything 'ddpm export' does not write, or exists (unless ``force``),
    and one that is, holds or lies inside the run of ``source`` (symlinks resolved), which
    replacing it would delete."""
    if not str(out_dir).strip():
        raise ValueError("OUT_DIR is empty; give the folder to write")
    out = Path(out_dir)
    run, dest = run_of(source), out.resolve()
    what = "run" if run.is_dir() else "checkpoint"
    where = ("is" if dest == run else "holds" if dest in run.parents else
             "lies inside" if run in dest.parents else None)
    if where is not None:
        raise ValueError(f"OUT_DIR {out} {where} the {what} being exported ({run}); choose a "
                         f"folder outside it, so that writing OUT_DIR cannot delete the {what}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; choose another OUT_DIR")
    # Replacing deletes the folder: --force may replace an empty one or an export, never a
    # folder holding anything else (a mistyped OUT_DIR of one's home folder must lose nothing).
    if out.is_dir() and (foreign := _not_exported(out)):
        shown = ", ".join(repr(name) for name in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        one = len(foreign) == 1
        files = "1 file that is" if one else f"{len(foreign)} files that are"
        raise ValueError(f"OUT_DIR {out} exists and holds {files} not part of a diffusers "
                         f"export ({shown}); --force replaces only an empty folder or a previous "
                         f"export: remove {'it' if one else 'them'} yourself, or choose a new "
                         f"folder")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; add --force to replace it, or choose another folder")
    if (reason := unwritable(out.parent)) is not None:
        raise ValueError(f"cannot write {out}: {reason}; choose another OUT_DIR")
    return out


def _not_exported(out: Path) -> list[str]:
    """What the folder ``out`` holds that :func:`export_diffusers` does not write, sorted: every
    name in it when it has no model_index.json (then it is no export)."""
    ours = {"model_index.json", RUN_CONFIG_FILE, "unet/config.json", f"unet/{WEIGHTS}.safetensors",
            "scheduler/scheduler_config.json"}
    names = []
    for entry in os.scandir(out):
        if entry.name in ("unet", "scheduler") and entry.is_dir(follow_symlinks=False):
            names += [f"{entry.name}/{inner.name}" for inner in os.scandir(entry)]
        else:
            names.append(entry.name + "/" * entry.is_dir(follow_symlinks=False))
    if "model_index.json" not in names:
        return sorted(names)
    return sorted(name for name in names if name not in ours)


def _max_output_difference(model: UNet, unet: nn.Module, mc: UNetConfig, T: int) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, mc.in_channels, mc.image_size, mc.image_size, generator=generator)
    t = torch.tensor([0, T // 3, 2 * T // 3, T - 1])
    y = torch.arange(4) % (mc.num_classes + 1) if mc.num_classes else None
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = unet(x, t, class_labels=y).sample
    return float((ours - theirs).abs().max())


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    deleted only once the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- import ----------------------------------------------------------------------------------

# What a diffusers folder may ask for, checked before anything is built or allocated: far above
# any published model, and low enough that a typo or a hostile file cannot make ddpm allocate
# gigabytes or loop for hours.
MAX_TIMESTEPS = 100_000  # published schedules have 1,000 steps (improved DDPM's 4,000)
MAX_SAMPLE_SIZE = 4096  # published UNet2DModels make images of 32 to 1024 pixels
MAX_LAYERS_PER_BLOCK = 32  # published ones have 1 to 3
MAX_JSON_BYTES = 16 << 20  # a scheduler config with MAX_TIMESTEPS trained_betas is ~2.5 MB
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on its JSON header
WEIGHTS = "diffusion_pytorch_model"  # .safetensors, or the pickled .bin of older diffusers
# Names that only a diffusers folder holds: a folder (not a ddpm run) with any of them is taken
# for one, and load_diffusers says what it lacks.
_DIFFUSERS_PARTS = ("model_index.json", "unet", "scheduler", "scheduler_config.json",
                    f"{WEIGHTS}.safetensors", f"{WEIGHTS}.bin")


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder meant as a diffusers model: ``DDPMPipeline.save_pretrained``'s (model_index.json),
    ``UNet2DModel.save_pretrained``'s (config.json naming UNet2DModel, its weights), or one with
    their parts that is not a ddpm run (no checkpoints/), whose lack :func:`load_diffusers` says."""
    p = Path(path)
    if not p.is_dir() or (p / CHECKPOINT_DIR).is_dir():
        return False
    if any(os.path.lexists(p / name) for name in _DIFFUSERS_PARTS):
        return True
    try:
        return _read_json(p, "config.json").get("_class_name") == "UNet2DModel"
    except ExportError:
        return False


def diffusers_betas(sc: dict[str, Any]) -> torch.Tensor:
    """The betas ``[T]`` float64 that a diffusers scheduler config defines (the formulas of
    diffusers' DDPM/DDIM schedulers, in float64), before any zero-terminal-SNR rescaling."""
    T = int(sc.get("num_train_timesteps", 1000))
    start, end = float(sc.get("beta_start", 1e-4)), float(sc.get("beta_end", 0.02))
    if sc.get("trained_betas") is not None:
        betas = torch.tensor(sc["trained_betas"], dtype=torch.float64)
        if betas.shape != (T,):
            raise ExportError(f"its trained_betas has {betas.numel()} values for "
                              f"num_train_timesteps {T}")
        return betas
    kind = sc.get("beta_schedule", "linear")
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def f(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                            dtype=torch.float64)
    if kind == "sigmoid":  # GeoDiff's: sigmoid over [-6, 6] scaled into [beta_start, beta_end]
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
    raise ExportError(f"its scheduler's beta_schedule {_shown(kind)} is none ddpm can represent "
                      f"(linear, scaled_linear, squaredcos_cap_v2, sigmoid, or trained_betas)")


# --- reading the folder's files: each refusal names the file (relative to the folder) -------


def _shown(value: Any, limit: int = 40) -> str:
    """``value`` as its JSON file spells it (null, NaN, [1, 2]; a string quoted as Python
    quotes it, as the names in these messages are), cut (``settings.shown``)."""
    return settings.shown(value, limit, "python" if isinstance(value, str) else "json")


def _regular_file(path: Path, shown: str) -> int:
    """The size of ``path``, a regular file or a link to one (the hub's cache links its files),
    else an ExportError: a device such as /dev/zero, or a pipe, would be read forever."""
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ExportError(f"{shown} is a link to {os.readlink(path)}, which does not "
                              f"exist") from None
        raise ExportError(f"{shown} is missing") from None
    except OSError as exc:
        raise ExportError(f"cannot read {shown}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ExportError(f"{shown} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise ExportError(f"{shown} is not a regular file but a device or a pipe"
                          + (f" ({os.readlink(path)})" if path.is_symlink() else ""))
    return st.st_size


def _read_json(folder: Path, name: str | Path, *,
               advice: str = "save the model again with save_pretrained") -> dict[str, Any]:
    """The JSON object in ``folder/name``, or an ExportError naming ``name``, what is wrong and
    ending with ``advice``."""
    shown = Path(name).as_posix()
    size = _regular_file(folder / name, shown)
    if size > MAX_JSON_BYTES:
        raise ExportError(f"{shown} is {size / 2**20:.0f} MB, more than a config can be "
                          f"({MAX_JSON_BYTES >> 20} MB); it is not a diffusers config")
    try:
        value = json.loads((folder / name).read_bytes())
    except OSError as exc:
        raise ExportError(f"cannot read {shown}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested beyond reason
        raise ExportError(f"{shown} is not JSON ({str(exc).splitlines()[0][:100]}); "
                          f"{advice}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        raise ExportError(f"{shown} holds {kind.get(type(value), 'a number')} where its settings "
                          f"belong, a JSON object {{\"key\": value, ...}}; {advice}")
    return value


def _is_int(value: Any, low: int, high: int | float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_beta(value: Any) -> bool:
    """A number a beta can be: finite, in (0, 1)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value < 1)


def _setting(config: dict[str, Any], shown: str, key: str, default: Any,
             ok: Callable[[Any], bool], expected: str) -> Any:
    """``config[key]`` (``default`` where absent), or an ExportError naming the file ``shown``,
    the key, its value and the ``expected`` one."""
    value = config.get(key, default)
    if not ok(value):
        raise ExportError(f"{shown}: {key} is {_shown(value)}; expected {expected}")
    return value


def _folder_parts(folder: Path) -> tuple[Path, Path, str | None]:
    """(the UNet2DModel's folder, its scheduler config file, the scheduler class the pipeline
    names or None) of a diffusers folder, relative to it."""
    if os.path.lexists(folder / "model_index.json"):
        index = _read_json(folder, "model_index.json")
        unet, sched = index.get("unet"), index.get("scheduler")
        if not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
            raise ExportError(f"model_index.json names unet {_shown(unet)}; ddpm samples "
                              f"pipelines whose unet is a UNet2DModel (DDPMPipeline, DDIMPipeline)")
        if not sched:
            raise ExportError("model_index.json names no scheduler; its noise schedule is needed "
                              "to sample")
        if not (isinstance(sched, list) and len(sched) == 2 and isinstance(sched[1], str)):
            raise ExportError(f"model_index.json names scheduler {_shown(sched)}; expected "
                              f"[library, class] such as [\"diffusers\", \"DDPMScheduler\"]")
        return Path("unet"), Path("scheduler", "scheduler_config.json"), sched[1]
    if os.path.lexists(folder / "config.json") and not (folder / "unet").is_dir():
        _read_json(folder, "config.json")  # a UNet2DModel's, or a file to name
        if not (folder / "scheduler_config.json").is_file():
            raise ExportError("it holds a UNet2DModel but no scheduler_config.json; save its "
                              "scheduler there too (scheduler.save_pretrained(folder)), or give "
                              "the whole pipeline's folder")
        return Path("."), Path("scheduler_config.json"), None
    raise ExportError("it is neither a ddpm run (no checkpoints/ckpt-STEP.pt) nor a diffusers "
                      "pipeline folder (model_index.json is missing); give a run directory of "
                      "'ddpm train', a .pt checkpoint, or a folder as DDPMPipeline.save_pretrained "
                      "writes it: model_index.json, unet/ and scheduler/")


def _unet_settings(diffusers: ModuleType, uc: dict[str, Any], shown: str) -> dict[str, Any]:
    """The settings UNet2DModel is built with: its defaults under the keys of ``uc`` it takes
    (others are ignored, as diffusers ignores them); an ExportError, naming the key and its
    value, for a model ddpm cannot sample or one that would be enormous to build."""
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    c = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    c.update((k, v) for k, v in uc.items() if k in c)
    name = uc.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ExportError(f"{shown} is a {_shown(name)}; ddpm samples UNet2DModel")
    if c["time_embedding_type"] != "positional":
        raise ExportError(f"its UNet2DModel embeds time as {_shown(c['time_embedding_type'])} "
                          f"(a score model of noise levels); ddpm samples DDPM models, whose "
                          f"time embedding is 'positional'")
    C = _setting(c, shown, "in_channels", None, lambda v: _is_int(v, 1, 3) and v != 2,
                 "1 or 3 (grey or RGB images)")
    _setting(c, shown, "out_channels", None, lambda v: _is_int(v, 1, 2 * C),
             f"{C} (or {2 * C} with a learned variance)")
    size = _setting(c, shown, "sample_size", None, lambda v: _is_int(v, 1, MAX_SAMPLE_SIZE) or (
        isinstance(v, list) and len(v) == 2 and v[0] == v[1] and _is_int(v[0], 1, MAX_SAMPLE_SIZE)),
        f"the side of its square images, 1 to {MAX_SAMPLE_SIZE} pixels")
    levels = MAX_SAMPLE_SIZE.bit_length()  # each level but the last halves the image
    widths = _setting(c, shown, "block_out_channels", None, lambda v: isinstance(v, (list, tuple))
                      and 1 <= len(v) <= levels and all(_is_int(w, 1) for w in v),
                      f"a list of 1 to {levels} channel counts, each a positive integer")
    for key in ("down_block_types", "up_block_types"):
        _setting(c, shown, key, None, lambda v: isinstance(v, (list, tuple)) and len(v) == len(
            widths) and all(isinstance(b, str) for b in v),
            f"a list of {len(widths)} block names, one per block_out_channels")
    _setting(c, shown, "layers_per_block", None, lambda v: _is_int(v, 1, MAX_LAYERS_PER_BLOCK),
             f"an integer from 1 to {MAX_LAYERS_PER_BLOCK}")
    _setting(c, shown, "norm_num_groups", None, lambda v: _is_int(v, 1), "a positive integer")
    for key in ("attention_head_dim", "num_class_embeds"):
        _setting(c, shown, key, None, lambda v: v is None or _is_int(v, 1),
                 "null or a positive integer")
    side, halvings = size[0] if isinstance(size, list) else size, len(widths) - 1
    if side % 2**halvings:
        raise ExportError(f"{shown}: sample_size {side} is not a multiple of {2**halvings}, as "
                          f"the {halvings} downsamplings between its {len(widths)} levels "
                          f"(block_out_channels) need; the model cannot make images of that size")
    return c


def _check_scheduler(diffusers: ModuleType, sc: dict[str, Any], shown: str, named: str | None) -> None:
    """An ExportError, naming the key and its value, for a scheduler config that defines no
    DDPM noise schedule or one ddpm cannot sample; ``named`` is the class model_index.json
    gives it (diffusers loads that one)."""
    name = named or sc.get("_class_name", "DDPMScheduler")
    try:
        cls = getattr(diffusers, name) if isinstance(name, str) and name.isidentifier() else None
    except Exception:  # diffusers' lazy import fails variously for a class of another framework
        cls = None
    if not isinstance(cls, type):
        raise ExportError(f"its scheduler {_shown(name)} is none that diffusers "
                          f"{diffusers.__version__} has")
    # (cls is a class here, so __init__ is its own; mypy guards against reading an instance's)
    if "beta_schedule" not in inspect.signature(cls.__init__).parameters:  # type: ignore[misc]
        raise ExportError(f"its scheduler {name} has no beta schedule; ddpm samples models "
                          f"trained on one (DDPMScheduler, DDIMScheduler, ...)")
    T = _setting(sc, shown, "num_train_timesteps", 1000, lambda v: _is_int(v, 2, MAX_TIMESTEPS),
                 f"an integer from 2 to {MAX_TIMESTEPS:,}")
    kind = _setting(sc, shown, "beta_schedule", "linear", lambda v: isinstance(v, str),
                    "the name of a schedule, such as \"linear\"")
    trained = sc.get("trained_betas")
    if trained is not None:
        if not isinstance(trained, list) or len(trained) != T:
            raise ExportError(f"{shown}: trained_betas has "
                              f"{len(trained) if isinstance(trained, list) else _shown(trained)} "
                              f"values; expected a list of num_train_timesteps = {T}")
        for i, beta in enumerate(trained):
            if not _is_beta(beta):
                raise ExportError(f"{shown}: trained_betas[{i}] is {_shown(beta)}; expected a "
                                  f"finite number in (0, 1)")
    elif kind in ("linear", "scaled_linear", "sigmoid"):  # the schedules made of the two
        for key, default in (("beta_start", 1e-4), ("beta_end", 0.02)):
            _setting(sc, shown, key, default, _is_beta, "a finite number in (0, 1)")
    for key in ("prediction_type", "variance_type"):
        _setting(sc, shown, key, None, lambda v: v is None or isinstance(v, str),
                 "a name, such as \"epsilon\" or \"fixed_small\"")
    for key in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        _setting(sc, shown, key, False, lambda v: isinstance(v, bool), "true or false")


def _saved_run(folder: Path) -> dict[str, Any]:
    """What 'ddpm export' wrote beside diffusers' files (ddpm.json), checked; {} without one."""
    if not os.path.lexists(folder / RUN_CONFIG_FILE):
        return {}
    saved = _read_json(folder, RUN_CONFIG_FILE, advice="delete it to sample by the diffusers "
                                                    "configs alone")
    _setting(saved, RUN_CONFIG_FILE, "config", None, lambda v: v is None or isinstance(v, dict),
             "the run's config, a JSON object")
    _setting(saved, RUN_CONFIG_FILE, "step", 0, lambda v: _is_int(v, 0), "an integer >= 0")
    _setting(saved, RUN_CONFIG_FILE, "classes", [], lambda v: isinstance(v, list) and all(
        isinstance(name, str) for name in v), "a list of class names")
    return saved


def load_diffusers(folder: str | os.PathLike, device: torch.device) -> tuple[
        nn.Module, NoiseSchedule, RunConfig, int, tuple[str, ...]]:
    """(network, schedule, config, step, class names) of a diffusers folder, for a Pipeline.

    The network is diffusers' ``UNet2DModel`` behind our ``forward(x_t, t, y)``; a folder
    ddpm exported carries its run's config (``ddpm.json``), one from elsewhere gets a config
    made from the two diffusers configs. Every file is checked before anything is built."""
    diffusers = require_diffusers("sampling a diffusers folder")
    folder = Path(folder)
    try:
        unet_dir, sched_file, sched_class = _folder_parts(folder)
        uc = _unet_settings(diffusers, _read_json(folder, unet_dir / "config.json"),
                            (unet_dir / "config.json").as_posix())
        sc = _read_json(folder, sched_file)
        _check_scheduler(diffusers, sc, sched_file.as_posix(), sched_class)
        saved = _saved_run(folder)
        named_betas = diffusers_betas(sc)  # before any zero-terminal-SNR rescaling
        config = _config_from_diffusers(uc, sc, saved.get("config"), named_betas)
        betas = zero_terminal_snr_betas(named_betas) if sc.get("rescale_betas_zero_snr") \
            else named_betas
        # each in (0, 1); the last is 1 under zero terminal SNR (x_T is pure noise)
        if betas.min() <= 0 or betas[:-1].max() >= 1 or betas[-1] > 1:
            raise ExportError(f"its scheduler's betas run from {betas.min():.3g} to "
                              f"{betas.max():.3g}; each must lie in (0, 1)")
        unet = _load_unet(diffusers, folder, unet_dir, uc)
    except ExportError as exc:
        raise ValueError(f"{folder} cannot be sampled by ddpm: {exc}") from None
    schedule = schedule_from_betas(config.diffusion.schedule, betas)
    model = DiffusersUNet(unet, config.model.num_classes).to(device).eval().requires_grad_(False)
    return (model, schedule, config, int(saved.get("step", 0)),
            tuple(saved.get("classes", ())))


def _read_safetensors(path: Path, shown: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; its header is checked first (8 bytes of length, then
    that much JSON), so that damage is named rather than reported from deep in its reader."""
    from safetensors.torch import load_file

    size = _regular_file(path, shown)
    if size < 8:
        raise ExportError(f"{shown} is {size} bytes, too few for a safetensors file (8 bytes of "
                          f"header length, a header, the tensors); it is empty or cut short")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ExportError(f"{shown} is not a safetensors file or is damaged: its first 8 "
                              f"bytes give a {length}-byte header, but {size - 8} bytes follow")
        header = f.read(length)
    try:
        if not isinstance(json.loads(header), dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise ExportError(f"{shown} is not a safetensors file or is damaged: its {length}-byte "
                          f"header is not a JSON object") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' reader raises its own error type for each damage
        raise ExportError(f"{shown} is a damaged safetensors file "
                          f"({str(exc).splitlines()[0][:120]})") from None


def _read_weights(folder: Path, unet_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(the UNet2DModel's tensors by name, the file they came from), read without running code:
    safetensors, or a ``.bin`` that holds tensors only (``torch.load(weights_only=True)``)."""
    safetensors, binary = unet_dir / f"{WEIGHTS}.safetensors", unet_dir / f"{WEIGHTS}.bin"
    if os.path.lexists(folder / safetensors):
        return _read_safetensors(folder / safetensors, safetensors.as_posix()), \
            safetensors.as_posix()
    if not os.path.lexists(folder / binary):
        raise ExportError(f"{safetensors.as_posix()} is missing (and so is the .bin of older "
                          f"diffusers): the folder holds no weights")
    _regular_file(folder / binary, binary.as_posix())
    weights = read_torch_file(
        folder / binary, "plain tensor file", error=ExportError,
        advice="; if you trust its source, convert it to safetensors (diffusers' "
               "save_pretrained writes them)")
    if not (isinstance(weights, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in weights.items())):
        raise ExportError(f"{binary.as_posix()} holds a {type(weights).__name__}, not a dict of "
                          f"named tensors (a state dict)")
    return weights, binary.as_posix()


def _load_unet(diffusers: ModuleType, folder: Path, unet_dir: Path, uc: dict[str, Any]) -> nn.Module:
    """UNet2DModel of the checked settings ``uc``, its weights read without running code and
    checked tensor by tensor against the shapes the settings give."""
    weights, shown = _read_weights(folder, unet_dir)
    config_file = (unet_dir / "config.json").as_posix()
    try:
        with torch.device("meta"):  # shapes only: the tensors come from the weights file
            unet = diffusers.UNet2DModel.from_config(uc)
    except Exception as exc:  # diffusers refuses a config it cannot build with many types
        raise ExportError(f"{config_file}: diffusers cannot build a UNet2DModel of it "
                          f"({str(exc).splitlines()[0][:120]})") from None
    expected = unet.state_dict()
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    if missing:
        raise ExportError(f"{shown} lacks {len(missing)} of the tensors {config_file} needs, "
                          f"such as {_shown(missing[0], 60)}; the weights belong to another model")
    if extra:
        raise ExportError(f"{shown} has {len(extra)} tensor(s) {config_file} has no place for, "
                          f"such as {_shown(extra[0], 60)}; the weights belong to another model")
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise ExportError(f"{shown}: tensor {_shown(name, 60)} holds {tensor.dtype}, not "
                              f"floating-point weights")
        if tensor.shape != expected[name].shape:
            raise ExportError(f"{shown}: tensor {_shown(name, 60)} is {list(tensor.shape)}, "
                              f"where {config_file} needs {list(expected[name].shape)}; the "
                              f"weights belong to another model")
        if not torch.isfinite(tensor).all():
            raise ExportError(f"{shown}: tensor {_shown(name, 60)} holds NaN or infinite values; "
                              f"the model diverged before it was saved, or the file is damaged")
    # bf16 and fp16 files become float32, what ddpm samples in (and autocasts from)
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    return unet


def _config_from_diffusers(uc: dict[str, Any], sc: dict[str, Any], saved: dict | None,
                           betas: torch.Tensor) -> RunConfig:
    """Our config of a diffusers model: the run's config that ``ddpm export`` wrote beside it
    (``ddpm.json``) when there is one and it reads; else one made from the diffusers configs.
    Either way the diffusers configs (``uc`` as :func:`_unet_settings` gives it) must describe
    a model ddpm can sample (ExportError). ``betas`` are the scheduler's, before any
    zero-terminal-SNR rescaling."""
    C, out_channels = uc["in_channels"], uc["out_channels"]
    variance = sc.get("variance_type") or "fixed_small"
    if variance not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                        "learned_range"):
        raise ExportError(f"its scheduler's variance_type {_shown(variance)} is none ddpm can "
                          f"sample (fixed_small, fixed_large, learned_range)")
    learned = variance == "learned_range"
    if out_channels != C * (2 if learned else 1):
        raise ExportError(f"its UNet gives {out_channels} channels for {C}-channel images, where "
                          f"its scheduler's variance_type {variance!r} needs {C * (1 + learned)}")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(sc.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ExportError(f"its scheduler's prediction_type {_shown(sc.get('prediction_type'))} "
                          f"is none ddpm knows (epsilon, sample, v_prediction)")
    base = None
    if isinstance(saved, dict):
        try:
            base = RunConfig.from_dict(saved)
        except ValueError:
            base = None  # written by another version: the diffusers facts alone
    if uc["class_embed_type"] is not None or uc["num_class_embeds"]:
        if base is None or not base.model.num_classes or uc["class_embed_type"] is not None or \
                uc["num_class_embeds"] != base.model.num_classes + 1:
            raise ExportError("it is a class-conditional UNet2DModel that ddpm did not export; "
                              "ddpm samples those only with the null class that its own "
                              "classifier-free guidance needs")
    size = uc["sample_size"][0] if isinstance(uc["sample_size"], list) else uc["sample_size"]
    T = sc.get("num_train_timesteps", 1000)
    if base is not None:
        ours = (base.model.in_channels, base.model.image_size, base.model.learn_variance,
                base.diffusion.num_train_timesteps, base.diffusion.prediction_type)
        if ours != (C, size, learned, T, prediction):
            def facts(c: int, s: int, lv: bool, t: int, p: str) -> str:
                variance = "a learned" if lv else "a fixed"
                return f"{c}x{s}x{s} images, {variance} variance, T = {t}, {p}"
            raise ExportError(f"{RUN_CONFIG_FILE} describes {facts(*ours)}, its diffusers "
                              f"configs {facts(C, size, learned, T, prediction)}: they were "
                              f"edited after 'ddpm export'; delete {RUN_CONFIG_FILE} to sample "
                              f"by the diffusers configs alone")
        return base
    widths = uc["block_out_channels"]
    model = UNetConfig(in_channels=C, image_size=size, base_channels=widths[0],
                       channel_mults=tuple(max(1, w // widths[0]) for w in widths),
                       num_res_blocks=uc["layers_per_block"], attention_resolutions=(),
                       learn_variance=learned)
    diffusion = DiffusionConfig(
        schedule=_schedule_name(sc, betas),
        num_train_timesteps=T, prediction_type=prediction,
        zero_terminal_snr=sc.get("rescale_betas_zero_snr", False))
    sample = SampleConfig(
        sampler="ddpm", num_sample_steps=T,
        variance={"fixed_large": "beta", "fixed_large_log": "beta",
                  "learned_range": "learned"}.get(variance, "posterior"),
        x0_transform="clip" if sc.get("clip_sample", True) else
        ("dynamic" if sc.get("thresholding") else "none"))
    return RunConfig(model=model, diffusion=diffusion, sample=sample)


def _schedule_name(sc: dict[str, Any], betas: torch.Tensor) -> str:
    """Ours, where the scheduler's betas are one of our schedules (Ho et al.'s linear 1e-4 ..
    0.02 is); else "diffusers NAME", a schedule ddpm samples but does not train."""
    T = int(sc.get("num_train_timesteps", 1000))
    for name in SCHEDULE_NAMES:
        try:
            if _same(betas, make_schedule(name, T).betas):
                return name
        except ValueError:  # a T our schedule refuses
            continue
    kind = "trained_betas" if sc.get("trained_betas") is not None else sc.get("beta_schedule")
    return f"diffusers {kind} {betas[0]:.3g}..{betas[-1]:.3g}"


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` behind ddpm's denoiser call ``(x_t, t, y) -> prediction``."""

    def __init__(self, unet: nn.Module, num_classes: int = 0):
        super().__init__()
        self.unet, self.num_classes = unet, num_classes

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes and y is None:
            y = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y if self.num_classes else None).sample
