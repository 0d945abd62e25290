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

from .common import EXTRA, PREDICTION_TYPES, RUN_CONFIG_FILE, ExportError, require_diffusers
from .export import export_diffusers, scheduler_config, to_unet2d_weights, unet2d_config
from .folder import diffusers_betas, is_diffusers_folder
from .load import DiffusersUNet, load_diffusers

__all__ = ["EXTRA", "PREDICTION_TYPES", "RUN_CONFIG_FILE", "DiffusersUNet", "ExportError",
           "diffusers_betas", "export_diffusers", "is_diffusers_folder", "load_diffusers",
           "require_diffusers", "scheduler_config", "to_unet2d_weights", "unet2d_config"]
