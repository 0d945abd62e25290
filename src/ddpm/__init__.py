"""ddpm: train denoising diffusion image generators from scratch; sample and inspect them.

The Python API mirrors the command line::

    from ddpm import UNet, UNetConfig, make_schedule, get_preset, train, load_pipeline
"""

__version__ = "0.2.0"

from .config import (
    DataConfig,
    DiffusionConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    with_overrides,
)
from .diffusion import q_posterior, q_sample, training_loss
from .models import UNet, UNetConfig
from .pipeline import Pipeline, load_pipeline
from .presets import get_preset
from .samplers import ancestral_sample, ddim_sample, dpmpp_2m_sample, euler_sample, heun_sample
from .schedules import NoiseSchedule, make_schedule
from .timesteps import make_timesteps
from .train import train

__all__ = [
    "DataConfig", "DiffusionConfig", "NoiseSchedule", "Pipeline", "RunConfig", "SampleConfig",
    "TrainConfig", "UNet", "UNetConfig", "ancestral_sample", "ddim_sample", "dpmpp_2m_sample",
    "euler_sample", "get_preset", "heun_sample", "load_pipeline", "make_schedule",
    "make_timesteps", "q_posterior", "q_sample", "train", "training_loss", "with_overrides",
]
