"""EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when S_churn = 0): Heun's second-order method on
the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, over EDM's sigma grid, for every model.

It works in EDM's space x = x_t / a = x_t sqrt(1 + sigma^2) and yields the VP state x_t = x / sqrt(1 + sigma^2)
of the pipeline, which is the sample itself at sigma = 0. Every sigma of the grid, and every sigma that churn raises,
is evaluated at the denoiser's level nearest to it (:meth:`diffusion.core.levels.NoiseLevels.nearest`): the sigma
itself for a continuous model, the nearest of its own sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for a network
trained at integer timesteps, as EDM's iDDPM wrapper does (``round_sigma``, its Table 1 "iDDPM" column), rather than
interpolating a fractional timestep as its VP wrapper does: the network's embedding of a timestep between two integers
was never trained.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.levels import Level, karras_sigmas
from diffusion.core.samplers.base import Randomness, SamplerStep, noise_like
from diffusion.errors import SettingError


def check_churn(s_churn: float, s_min: float, s_max: float, s_noise: float) -> None:
    """The churn options: S_churn >= 0, 0 <= S_min <= S_max, S_noise > 0 (the one check of these settings)."""
    if not s_churn >= 0:
        raise SettingError(f"s_churn is the total churn, at least 0 (0: the deterministic Algorithm 1); got {s_churn}")
    if not 0 <= s_min <= s_max:
        raise SettingError(f"s_min and s_max bound the churned sigmas, 0 <= s_min <= s_max; got {s_min}, {s_max}")
    if not s_noise > 0:
        raise SettingError(f"s_noise scales the churn's noise and must be positive, e.g. 1.003; got {s_noise}")


def heun_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    s_churn: float,
    s_min: float,
    s_max: float,
    s_noise: float,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """``steps`` = N grid sigmas (eq. 5) from sigma_max down to sigma_min, then 0; both ends clipped to the model's
    range (``denoise.levels``). Each step from sigma_i: with churn, sigma_hat = sigma_i (1 + gamma), gamma =
    min(S_churn / N, sqrt(2) - 1) for S_min <= sigma_i <= S_max, and x gains noise of variance sigma_hat^2 -
    sigma_i^2 (times S_noise^2); an Euler step to sigma_{i+1}, and Heun's correction with the slope there unless
    sigma_{i+1} = 0. 2N - 1 network evaluations. ``x_T`` is the pipeline's unit normal noise, the VP state at the
    largest sigma, so x starts at x_T sqrt(1 + sigma_0^2)."""
    check_churn(s_churn, s_min, s_max, s_noise)
    levels = denoise.levels
    top, bottom = min(sigma_max, levels.sigma_max), max(sigma_min, levels.sigma_min)
    if bottom > top:
        raise SettingError(
            f"sampler.sigma_min={sigma_min} lies above this model's largest sigma {levels.sigma_max:.3g}"
        )
    grid = [levels.nearest(s) for s in karras_sigmas(steps, bottom, top, rho).tolist()]

    def D(x: Tensor, level: Level) -> Tensor:
        """D(x; sigma) = E[x_0 | x] for x = x_0 + sigma n, through the VP state x / sqrt(1 + sigma^2)."""
        return denoise(x / math.sqrt(1.0 + level.sigma**2), level).x0

    x = x_T * math.sqrt(1.0 + grid[0].sigma ** 2)
    for i, level in enumerate(grid):
        sigma = level.sigma
        sigma_next = grid[i + 1].sigma if i + 1 < len(grid) else 0.0
        gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_min <= sigma <= s_max else 0.0
        level_hat = levels.nearest(sigma * (1.0 + gamma)) if gamma > 0 else level
        sigma_hat = level_hat.sigma
        if sigma_hat > sigma:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_like(x, generator)
        x0 = D(x, level_hat)
        slope = (x - x0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        if sigma_next > 0:
            slope_next = (x_next - D(x_next, grid[i + 1])) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * slope + 0.5 * slope_next)
        x = x_next
        yield SamplerStep(level_hat, x / math.sqrt(1.0 + sigma_next**2), x0)
