"""EDM's sampler (Karras et al. 2022, Algorithm 2; Algorithm 1 when S_churn = 0): Heun's second-order method on
the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, over EDM's sigma grid, for every model.

It works in EDM's space x = x_t / a_t = x_t sqrt(1 + sigma^2) and yields the VP state x_t = x / sqrt(1 + sigma^2)
of the pipeline, which is the sample itself at sigma = 0. A ``target=edm`` network is evaluated at the grid's own
sigmas (its denoiser's ``at_sigma``). A network trained at integer timesteps (eps, x0, v on any schedule) is
evaluated only at sigmas it was trained at: every grid sigma, and every sigma that churn raises, is rounded to the
nearest of the model's own sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), as EDM's iDDPM wrapper does
(``round_sigma``, its Table 1 "iDDPM" column), rather than interpolating a fractional timestep as its VP wrapper
does: the network's embedding of a timestep between two integers was never trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from torch import Tensor

from diffusion.core import edm
from diffusion.core.samplers.base import Randomness, SamplerStep, noise_like, timestep_batch
from diffusion.core.schedules import NoiseSchedule
from diffusion.core.targets import Denoiser
from diffusion.errors import SettingError


def check_churn(s_churn: float, s_min: float, s_max: float, s_noise: float) -> None:
    """The churn options: S_churn >= 0, 0 <= S_min <= S_max, S_noise > 0 (the one check of these settings)."""
    if not s_churn >= 0:
        raise SettingError(f"s_churn is the total churn, at least 0 (0: the deterministic Algorithm 1); got {s_churn}")
    if not 0 <= s_min <= s_max:
        raise SettingError(f"s_min and s_max bound the churned sigmas, 0 <= s_min <= s_max; got {s_min}, {s_max}")
    if not s_noise > 0:
        raise SettingError(f"s_noise scales the churn's noise and must be positive, e.g. 1.003; got {s_noise}")


class SigmaDenoiser:
    """D(x; sigma) of a denoiser: continuous for a ``target=edm`` network, at the model's own sigmas otherwise."""

    def __init__(self, denoise: Denoiser, schedule: NoiseSchedule) -> None:
        self.denoise, self.schedule = denoise, schedule
        self.sigmas = (schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod).cpu()  # increasing
        self.continuous: Callable[[Tensor, float], Tensor] | None = getattr(denoise, "at_sigma", None)
        self.sigma_min, self.sigma_max = self.sigmas[0].item(), self.sigmas[-1].item()

    def round(self, sigma: float) -> tuple[float, int]:
        """The sigma the network is evaluated at, and the row it belongs to (nearest, for a discrete model)."""
        row = int((self.sigmas - sigma).abs().argmin())
        return (sigma, row) if self.continuous is not None else (self.sigmas[row].item(), row)

    def __call__(self, x: Tensor, sigma: float, row: int) -> Tensor:
        if self.continuous is not None:
            return self.continuous(x, sigma)
        x_t = x / math.sqrt(1.0 + sigma**2)
        return self.denoise(x_t, timestep_batch(int(self.schedule.network_timesteps[row]), x)).x0


def heun_sample(
    denoise: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    *,
    steps: int,
    sigma_min: float = edm.SIGMA_MIN,
    sigma_max: float = edm.SIGMA_MAX,
    rho: float = edm.RHO,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """``steps`` = N grid sigmas (eq. 5) from sigma_max down to sigma_min, then 0; both ends clipped to the model's
    range (a discrete model's smallest and largest sigma_t). Each step from sigma_i: with churn, sigma_hat = sigma_i
    (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1) for S_min <= sigma_i <= S_max, and x gains noise of variance
    sigma_hat^2 - sigma_i^2 (times S_noise^2); an Euler step to sigma_{i+1}, and Heun's correction with the slope
    there unless sigma_{i+1} = 0. 2N - 1 network evaluations. ``x_T`` is the pipeline's unit normal noise, the VP
    state at the largest sigma, so x starts at x_T sqrt(1 + sigma_0^2)."""
    check_churn(s_churn, s_min, s_max, s_noise)
    D = SigmaDenoiser(denoise, schedule)
    top, bottom = min(sigma_max, D.sigma_max), max(sigma_min, D.sigma_min)
    if bottom > top:
        raise SettingError(f"sampler.sigma_min={sigma_min} lies above this model's largest sigma {D.sigma_max:.3g}")
    grid = [D.round(s) for s in edm.karras_sigmas(steps, bottom, top, rho).tolist()]
    x = x_T * math.sqrt(1.0 + grid[0][0] ** 2)
    for i, (sigma, row) in enumerate(grid):
        sigma_next = grid[i + 1][0] if i + 1 < len(grid) else 0.0
        gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_min <= sigma <= s_max else 0.0
        sigma_hat, row_hat = D.round(sigma * (1.0 + gamma)) if gamma > 0 else (sigma, row)
        if sigma_hat > sigma:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_like(x, generator)
        x0 = D(x, sigma_hat, row_hat)
        slope = (x - x0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        if sigma_next > 0:
            row_next = grid[i + 1][1]
            slope_next = (x_next - D(x_next, sigma_next, row_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * slope + 0.5 * slope_next)
        x = x_next
        yield SamplerStep(int(schedule.network_timesteps[row_hat]), x / math.sqrt(1.0 + sigma_next**2), x0)
