"""Export: a trained run as a folder ``diffusers.DDPMPipeline.from_pretrained`` loads, written
only when diffusers' own model computes our network's outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    checkpoint_config,
    load_run_or_file,
    load_weights,
    run_of,
    unwritable,
)
from ..config import RunConfig, build_schedule
from ..models import UNet
from ..models.unet import AttentionBlock, UNetConfig
from ..schedules import NoiseSchedule, make_schedule
from .common import (
    PREDICTION_TYPES,
    RUN_CONFIG_FILE,
    SCHEDULE_NAMES,
    VARIANCE_TYPES,
    WEIGHTS,
    ExportError,
    require_diffusers,
    same_betas,
)
from .folder import diffusers_betas, is_diffusers_folder


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
    if config.latent.autoencoder:
        raise ExportError("cannot export to diffusers: the model diffuses in the latents of a ddpm "
                          "autoencoder, and its export as diffusers' AutoencoderKL is not written "
                          "yet; sample it with 'ddpm sample', so nothing was written")
    if config.superres.low is not None:
        raise ExportError("cannot export to diffusers: a super-resolution model takes its low-res "
                          "input beside x_t, which diffusers' UNet2DModel pipelines do not give "
                          "it; sample it with 'ddpm upscale', so nothing was written")
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
    if not same_betas(diffusers_betas({**named, "num_train_timesteps": dc.num_train_timesteps}), betas):
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
