"""Samplers."""

from .ddim import (
    DDIMConfig,
    DDIMInverseScheduler,
    DDIMScheduler,
    StepOutput,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    make_betas,
    predict_x0_and_eps,
)
from .noise import randn

__all__ = [
    "DDIMConfig",
    "DDIMInverseScheduler",
    "DDIMScheduler",
    "StepOutput",
    "ddim_sigma",
    "ddim_step",
    "ddim_timesteps",
    "make_betas",
    "predict_x0_and_eps",
    "randn",
]
