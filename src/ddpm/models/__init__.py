"""Noise-predictor networks. They know nothing of noise schedules."""

from .unet import UNet, UNetConfig, count_parameters

__all__ = ["UNet", "UNetConfig", "count_parameters"]
