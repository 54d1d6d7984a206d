"""Ancestral sampling of DDPM."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from diffusion.core.reverse import Variance, p_mean_variance
from diffusion.core.samplers.base import Randomness, SamplerStep, noise_like, respaced, timestep_batch
from diffusion.core.schedules import NoiseSchedule, Spacing
from diffusion.core.targets import Denoiser


def ddpm_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    variance: Variance | None,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """Ho et al. 2020, Algorithm 2, on ``steps`` respaced timesteps (Nichol & Dhariwal 2021, §4).

    ``variance`` picks sigma_t^2 (see :func:`diffusion.core.reverse.p_mean_variance`); ``None`` takes the model's
    learned variance when it has one and beta otherwise. One network evaluation per step; computes in x_T's dtype.
    """
    walked = respaced(schedule, steps, spacing)  # rows 0..steps-1; network_timesteps[row] is the network's t
    timesteps = walked.network_timesteps.tolist()
    x = x_T
    for row in reversed(range(len(walked))):
        t = timesteps[row]
        prediction = denoise(x, timestep_batch(t, x))
        chosen = variance or ("learned" if prediction.var_frac is not None else "beta")
        mean, log_variance = p_mean_variance(walked, prediction, x, timestep_batch(row, x), chosen)
        # line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step
        x = mean + torch.exp(0.5 * log_variance) * noise_like(x, generator) if row > 0 else mean
        yield SamplerStep(t, x, prediction.x0)
