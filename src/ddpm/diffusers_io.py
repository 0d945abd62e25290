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

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_config, load_run_or_file, load_weights
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


def require_diffusers(what: str):
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
_RENAMES = [
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
                for key, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
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

    out = Path(out_dir)
    if out.exists() and not force:
        raise ValueError(f"{out} exists; add --force to replace it, or choose another folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; choose another --out")
    path, state = load_run_or_file(source)
    config = checkpoint_config(state, path)
    model = UNet(config.model)
    load_weights(model, state, path, ema=use_ema)
    model.eval()
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


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder of ``DDPMPipeline.save_pretrained`` (model_index.json) or of
    ``UNet2DModel.save_pretrained`` (config.json naming UNet2DModel)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file():
        return True
    return _read_json(p / "config.json", quiet=True).get("_class_name") == "UNet2DModel"


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
    raise ExportError(f"its scheduler's beta_schedule {kind!r} is none ddpm can represent "
                      f"(linear, scaled_linear, squaredcos_cap_v2, sigmoid, or trained_betas)")


def _read_json(path: Path, *, quiet: bool = False) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        if quiet:
            return {}
        raise ExportError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return value if isinstance(value, dict) else {}


def _folder_parts(folder: Path) -> tuple[Path, Path]:
    """(the UNet2DModel's folder, the scheduler config file) of a diffusers folder."""
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        unet, sched = index.get("unet"), index.get("scheduler")
        if not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
            raise ExportError(f"{folder}/model_index.json names unet {unet}; ddpm samples "
                              f"pipelines whose unet is a UNet2DModel (DDPMPipeline, DDIMPipeline)")
        if not sched:
            raise ExportError(f"{folder}/model_index.json names no scheduler; its noise schedule "
                              f"is needed to sample")
        return folder / "unet", folder / "scheduler" / "scheduler_config.json"
    sched = folder / "scheduler_config.json"
    if not sched.is_file():
        raise ExportError(f"{folder} holds a UNet2DModel but no scheduler_config.json; save its "
                          f"scheduler there too (scheduler.save_pretrained(folder)), or give the "
                          f"whole pipeline's folder")
    return folder, sched


def load_diffusers(folder: str | os.PathLike, device: torch.device) -> tuple[
        nn.Module, NoiseSchedule, RunConfig, int, tuple[str, ...]]:
    """(network, schedule, config, step, class names) of a diffusers folder, for a Pipeline.

    The network is diffusers' ``UNet2DModel`` behind our ``forward(x_t, t, y)``; a folder
    ddpm exported carries its run's config (``ddpm.json``), one from elsewhere gets a config
    made from the two diffusers configs."""
    diffusers = require_diffusers("sampling a diffusers folder")
    folder = Path(folder)
    try:
        unet_dir, sched_file = _folder_parts(folder)
        uc, sc = _read_json(unet_dir / "config.json"), _read_json(sched_file)
        if uc.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise ExportError(f"{unet_dir}/config.json is a {uc.get('_class_name')}; ddpm "
                              f"samples UNet2DModel")
        if uc.get("time_embedding_type", "positional") != "positional":
            raise ExportError(f"its UNet2DModel embeds time as {uc['time_embedding_type']!r} "
                              f"(a score model of noise levels); ddpm samples DDPM models, "
                              f"whose time embedding is 'positional'")
        saved = _read_json(folder / RUN_CONFIG_FILE, quiet=True)
        named_betas = diffusers_betas(sc)  # before any zero-terminal-SNR rescaling
        config = _config_from_diffusers(uc, sc, saved.get("config"), named_betas)
        betas = zero_terminal_snr_betas(named_betas) if sc.get("rescale_betas_zero_snr") \
            else named_betas
        # each in (0, 1); the last is 1 under zero terminal SNR (x_T is pure noise)
        if betas.min() <= 0 or betas[:-1].max() >= 1 or betas[-1] > 1:
            raise ExportError(f"its scheduler's betas run from {betas.min():.3g} to "
                              f"{betas.max():.3g}; each must lie in (0, 1)")
        unet = _load_unet(diffusers, unet_dir, uc)
    except ExportError as exc:
        raise ValueError(f"{folder} cannot be sampled by ddpm: {exc}") from None
    schedule = schedule_from_betas(config.diffusion.schedule, betas)
    model = DiffusersUNet(unet, config.model.num_classes).to(device).eval().requires_grad_(False)
    return (model, schedule, config, int(saved.get("step", 0)),
            tuple(saved.get("classes", ())))


def _load_unet(diffusers, unet_dir: Path, uc: dict[str, Any]) -> nn.Module:
    """UNet2DModel from its config, its weights read without running code."""
    safetensors = unet_dir / "diffusion_pytorch_model.safetensors"
    binary = unet_dir / "diffusion_pytorch_model.bin"
    if safetensors.is_file():
        from safetensors.torch import load_file
        weights = load_file(str(safetensors))
    elif binary.is_file():
        try:
            weights = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExportError(f"{binary} does not load as plain tensors ({exc}); ddpm loads "
                              f"weights without running code") from None
    else:
        raise ExportError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (or .bin)")
    try:
        unet = diffusers.UNet2DModel.from_config(
            {k: v for k, v in uc.items() if not k.startswith("_")})
        unet.load_state_dict(weights, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ExportError(f"its weights do not fit its UNet2DModel config: "
                          f"{str(exc).splitlines()[0]}") from None
    return unet


def _config_from_diffusers(uc: dict[str, Any], sc: dict[str, Any], saved: dict | None,
                           betas: torch.Tensor) -> RunConfig:
    """Our config of a diffusers model: the run's config that ``ddpm export`` wrote beside it
    (``ddpm.json``) when there is one and it reads; else one made from the diffusers configs.
    Either way the diffusers configs must describe a model ddpm can sample (ExportError).
    ``betas`` are the scheduler's, before any zero-terminal-SNR rescaling."""
    C = int(uc.get("in_channels", 3))
    out_channels = int(uc.get("out_channels", C))
    variance = sc.get("variance_type") or "fixed_small"
    if variance not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                        "learned_range"):
        raise ExportError(f"its scheduler's variance_type {variance!r} is none ddpm can sample "
                          f"(fixed_small, fixed_large, learned_range)")
    learned = variance == "learned_range"
    if out_channels != C * (2 if learned else 1):
        raise ExportError(f"its UNet gives {out_channels} channels for {C}-channel images, where "
                          f"its scheduler's variance_type {variance!r} needs {C * (1 + learned)}")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(sc.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ExportError(f"its scheduler's prediction_type {sc.get('prediction_type')!r} is "
                          f"none ddpm knows (epsilon, sample, v_prediction)")
    base = None
    if isinstance(saved, dict):
        try:
            base = RunConfig.from_dict(saved)
        except ValueError:
            base = None  # written by another version: the diffusers facts alone
    if uc.get("class_embed_type") is not None or uc.get("num_class_embeds"):
        if base is None or not base.model.num_classes or \
                uc.get("class_embed_type") is not None or \
                uc.get("num_class_embeds") != base.model.num_classes + 1:
            raise ExportError("it is a class-conditional UNet2DModel that ddpm did not export; "
                              "ddpm samples those only with the null class that its own "
                              "classifier-free guidance needs")
    if base is not None:
        return base
    size = uc.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    widths = uc.get("block_out_channels") or [64]
    model = UNetConfig(in_channels=C, image_size=int(size), base_channels=int(widths[0]),
                       channel_mults=tuple(max(1, w // widths[0]) for w in widths),
                       num_res_blocks=int(uc.get("layers_per_block", 2)), attention_resolutions=(),
                       learn_variance=learned)
    T = int(sc.get("num_train_timesteps", 1000))
    diffusion = DiffusionConfig(
        schedule=_schedule_name(sc, betas),
        num_train_timesteps=T, prediction_type=prediction,
        zero_terminal_snr=bool(sc.get("rescale_betas_zero_snr", False)))
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
