"""Import: a diffusers folder as the network, float64 noise schedule and config of a
``Pipeline``, diffusers' own ``UNet2DModel`` computing the network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..checkpoint import (
    read_torch_file,
)
from ..config import DiffusionConfig, RunConfig, SampleConfig
from ..models.unet import UNetConfig
from ..schedules import NoiseSchedule, make_schedule, schedule_from_betas, zero_terminal_snr_betas
from .common import (
    PREDICTION_TYPES,
    RUN_CONFIG_FILE,
    SCHEDULE_NAMES,
    WEIGHTS,
    ExportError,
    require_diffusers,
    same_betas,
)
from .folder import (
    MAX_SAFETENSORS_HEADER,
    check_scheduler,
    diffusers_betas,
    folder_parts,
    json_shown,
    read_json,
    regular_file,
    saved_run,
    unet_settings,
)


def load_diffusers(folder: str | os.PathLike, device: torch.device) -> tuple[
        nn.Module, NoiseSchedule, RunConfig, int, tuple[str, ...]]:
    """(network, schedule, config, step, class names) of a diffusers folder, for a Pipeline.

    The network is diffusers' ``UNet2DModel`` behind our ``forward(x_t, t, y)``; a folder
    ddpm exported carries its run's config (``ddpm.json``), one from elsewhere gets a config
    made from the two diffusers configs. Every file is checked before anything is built."""
    diffusers = require_diffusers("sampling a diffusers folder")
    folder = Path(folder)
    try:
        unet_dir, sched_file, sched_class = folder_parts(folder)
        uc = unet_settings(diffusers, read_json(folder, unet_dir / "config.json"),
                            (unet_dir / "config.json").as_posix())
        sc = read_json(folder, sched_file)
        check_scheduler(diffusers, sc, sched_file.as_posix(), sched_class)
        saved = saved_run(folder)
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

    size = regular_file(path, shown)
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
    regular_file(folder / binary, binary.as_posix())
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
                          f"such as {json_shown(missing[0], 60)}; the weights belong to another model")
    if extra:
        raise ExportError(f"{shown} has {len(extra)} tensor(s) {config_file} has no place for, "
                          f"such as {json_shown(extra[0], 60)}; the weights belong to another model")
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise ExportError(f"{shown}: tensor {json_shown(name, 60)} holds {tensor.dtype}, not "
                              f"floating-point weights")
        if tensor.shape != expected[name].shape:
            raise ExportError(f"{shown}: tensor {json_shown(name, 60)} is {list(tensor.shape)}, "
                              f"where {config_file} needs {list(expected[name].shape)}; the "
                              f"weights belong to another model")
        if not torch.isfinite(tensor).all():
            raise ExportError(f"{shown}: tensor {json_shown(name, 60)} holds NaN or infinite values; "
                              f"the model diverged before it was saved, or the file is damaged")
    # bf16 and fp16 files become float32, what ddpm samples in (and autocasts from)
    unet.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
    return unet


def _config_from_diffusers(uc: dict[str, Any], sc: dict[str, Any], saved: dict | None,
                           betas: torch.Tensor) -> RunConfig:
    """Our config of a diffusers model: the run's config that ``ddpm export`` wrote beside it
    (``ddpm.json``) when there is one and it reads; else one made from the diffusers configs.
    Either way the diffusers configs (``uc`` as :func:`unet_settings` gives it) must describe
    a model ddpm can sample (ExportError). ``betas`` are the scheduler's, before any
    zero-terminal-SNR rescaling."""
    C, out_channels = uc["in_channels"], uc["out_channels"]
    variance = sc.get("variance_type") or "fixed_small"
    if variance not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                        "learned_range"):
        raise ExportError(f"its scheduler's variance_type {json_shown(variance)} is none ddpm can "
                          f"sample (fixed_small, fixed_large, learned_range)")
    learned = variance == "learned_range"
    if out_channels != C * (2 if learned else 1):
        raise ExportError(f"its UNet gives {out_channels} channels for {C}-channel images, where "
                          f"its scheduler's variance_type {variance!r} needs {C * (1 + learned)}")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(sc.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ExportError(f"its scheduler's prediction_type {json_shown(sc.get('prediction_type'))} "
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
            if same_betas(betas, make_schedule(name, T).betas):
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
