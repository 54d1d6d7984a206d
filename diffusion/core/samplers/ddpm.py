"""Ancestral sampling of DDPM."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.reverse import Variance, p_mean_variance
from diffusion.core.samplers.base import Randomness, SamplerStep, noise_like, walked
from diffusion.core.schedules import Spacing


def ddpm_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    variance: Variance | None,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """Ho et al. 2020, Algorithm 2, on a grid of ``steps`` of the denoiser's levels (the respaced schedule of Nichol &
    Dhariwal 2021, §4).

    ``variance`` picks sigma_t^2 (see :func:`diffusion.core.reverse.p_mean_variance`); ``None`` takes the model's
    learned variance when it has one and beta otherwise. One network evaluation per step; computes in x_T's dtype.
    """
    grid = denoise.levels.grid(steps, spacing)
    schedule = walked(grid, x_T.device)  # its rows 0..steps-1 are the levels of the grid
    x = x_T
    for row in reversed(range(len(grid))):
        prediction = denoise(x, grid[row])
        chosen = variance or ("learned" if prediction.var_frac is not None else "beta")
        rows = torch.full((x.shape[0],), row, device=x.device, dtype=torch.long)
        mean, log_variance = p_mean_variance(schedule, prediction, x, rows, chosen)
        # line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step
        x = mean + torch.exp(0.5 * log_variance) * noise_like(x, generator) if row > 0 else mean
        yield SamplerStep(grid[row], x, prediction.x0)
