"""Samplers: each walks a grid of the denoiser's noise levels from noise x_T to an image and yields every step.

All take ``(denoise, x_T, *, steps, generator, ...)`` and only differ in their own options, so a config can switch
between them; with the options bound, each is a :class:`Sampler`. ``denoise`` is a
:class:`diffusion.core.denoiser.Denoiser`: it maps the state x_t at a :class:`diffusion.core.levels.Level` to a
:class:`diffusion.core.denoiser.Prediction`, and its ``levels`` say where the model may be evaluated, so a sampler
works on every objective alike.
"""

from diffusion.core.samplers.base import NoiseSource, Randomness, Sampler, SamplerStep, final
from diffusion.core.samplers.ddim import ddim_invert, ddim_sample
from diffusion.core.samplers.ddpm import ddpm_sample
from diffusion.core.samplers.dpm_solver import dpm_solver_sample
from diffusion.core.samplers.heun import heun_sample
from diffusion.core.samplers.score_sde import ode_sample, sde_sample

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
    "heun_sample",
    "ode_sample",
    "sde_sample",
]
