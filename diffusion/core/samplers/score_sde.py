"""The score-SDE view of a DDPM network (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

The VP state of :mod:`diffusion.core.levels` follows the VP-SDE dx = -1/2 beta(tau) x dtau + sqrt(beta(tau)) dw, with
score grad log p_t(x) = -eps(x, t) / s_t, whatever the model was trained as. On a grid of levels, the integral of beta
over the step from row i - 1 to row i is int_beta_i = log(alpha_bar_{i-1} / alpha_bar_i), which is what both solvers
below use in place of beta dtau.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.levels import Level
from diffusion.core.samplers.base import Randomness, SamplerStep, StepTable, below_pure_noise, noise_like, walked
from diffusion.core.schedules import Spacing


def _per_image_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


def langevin_correct(
    denoise: Denoiser,
    x: Tensor,
    level: Level,
    s: float,
    alpha: float,
    *,
    snr: float,
    n_steps: int,
    generator: Randomness,
) -> Tensor:
    """Song et al. 2021, Algorithm 5 (corrector for the VP-SDE): n_steps of Langevin dynamics at noise level s,
        eps_step = 2 alpha (r ||z|| / ||score||)^2,   x <- x + eps_step score + sqrt(2 eps_step) z,
    with signal-to-noise ratio r = ``snr``. The norms are per image (the paper's code averages them over the batch,
    which would make one image depend on the others)."""
    for _ in range(n_steps):
        score = -denoise(x, level).eps / s
        z = noise_like(x, generator)
        step = 2 * alpha * (snr * _per_image_norm(z) / _per_image_norm(score)) ** 2
        x = x + step * score + (2 * step).sqrt() * z
    return x


def sde_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    corrector_steps: int,
    snr: float,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """The reverse VP-SDE (Song et al. 2021, eq. 6),
        dx = [-1/2 beta x - beta grad log p_t(x)] dtau + sqrt(beta) dw-bar,
    integrated backwards by Euler-Maruyama: x <- x + (x / 2 + score) int_beta_i + sqrt(int_beta_i) z. With
    ``corrector_steps`` > 0, each predictor step is preceded by Langevin corrector steps (predictor-corrector
    sampling, Algorithm 1). The last step returns the x_0 prediction (Tweedie's formula) instead of adding noise
    (the paper's "denoising" step).
    Network evaluations: steps x (1 + corrector_steps).
    """
    below_pure_noise(denoise.levels, "sde")
    grid = denoise.levels.grid(steps, spacing)
    table, alphas = StepTable.of(grid), walked(grid, "cpu").alphas.tolist()
    x = x_T
    for i in reversed(range(len(table))):
        if corrector_steps:
            x = langevin_correct(
                denoise, x, grid[i], table.s(i), alphas[i], snr=snr, n_steps=corrector_steps, generator=generator
            )
        prediction = denoise(x, grid[i])
        if i == 0:
            x = prediction.x0
        else:
            int_beta = math.log(table.alpha_bar[i - 1] / table.alpha_bar[i])
            score = -prediction.eps / table.s(i)
            x = x + (0.5 * x + score) * int_beta + math.sqrt(int_beta) * noise_like(x, generator)
        yield SamplerStep(grid[i], x, prediction.x0)


def ode_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """The probability-flow ODE of the VP-SDE (Song et al. 2021, eq. 13),
        dx = -1/2 beta [x + grad log p_t(x)] dtau,
    solved with Heun's second-order method. In y = x / a_t and sigma = s_t / a_t it reads dy / dsigma = eps(x, t)
    (Karras et al. 2022, eq. 4 and Algorithm 1), which is where the steps are taken; the final step returns the x_0
    prediction at the smallest timestep. Network evaluations: 2 x steps - 1. Deterministic: ``generator`` is unused.
    """
    below_pure_noise(denoise.levels, "ode")
    table = StepTable.of(denoise.levels.grid(steps, spacing))
    sigma = [table.s(i) / table.a(i) for i in range(len(table))]
    x = x_T
    for i in reversed(range(len(table))):
        prediction = denoise(x, table.levels[i])
        if i == 0:
            x = prediction.x0
        else:
            y, h = x / table.a(i), sigma[i - 1] - sigma[i]
            y_euler = y + h * prediction.eps
            eps_next = denoise(table.a(i - 1) * y_euler, table.levels[i - 1]).eps
            x = table.a(i - 1) * (y + h * 0.5 * (prediction.eps + eps_next))
        yield SamplerStep(table.levels[i], x, prediction.x0)
