"""Samplers: each walks a respaced schedule from noise x_T to an image and yields every step.

All take ``(denoise, schedule, x_T, *, steps, spacing, generator, ...)`` and only differ in their own options, so a
config can switch between them; with the options bound, each is a :class:`Sampler`. ``denoise`` maps (x_t, t) to
a :class:`diffusion.targets.Prediction`.
"""

from diffusion.samplers.base import NoiseSource, Randomness, Sampler, SamplerStep, final
from diffusion.samplers.ddim import ddim_invert, ddim_sample
from diffusion.samplers.ddpm import ddpm_sample
from diffusion.samplers.dpm_solver import dpm_solver_sample
from diffusion.samplers.score_sde import ode_sample, sde_sample

__all__ = [
    "NoiseSource",
    "Randomness",
    "Sampler",
    "SamplerStep",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_sample",
    "final",
    "ode_sample",
    "sde_sample",
]
