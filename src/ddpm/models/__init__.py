"""Denoiser networks: each maps x_t and t to a prediction of eps, x0 or v (whichever it was trained
on). They know nothing of noise schedules."""

from .unet import UNet, UNetConfig, count_parameters

__all__ = ["UNet", "UNetConfig", "count_parameters"]
