"""What export and import share: the names that translate ours to diffusers', the error, the
lazy import of diffusers."""

from __future__ import annotations

from types import ModuleType

import torch

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

WEIGHTS = "diffusion_pytorch_model"  # .safetensors, or the pickled .bin of older diffusers


def same_betas(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float64 beta arrays are one schedule (to float tolerance)."""
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-8))
