"""Denoising diffusion implicit models: sampling and inversion."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.samplers.base import Randomness, SamplerStep, StepTable, noise_like
from diffusion.core.schedules import Spacing
from diffusion.errors import SettingError


def check_eta(eta: float) -> None:
    """DDIM's eta: 0 is deterministic, 1 ancestral (for a call that did not come through settings.py's ranges)."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0.0 <= eta <= 1.0:
        raise SettingError(f"DDIM's eta must lie in [0, 1] (0 is deterministic DDIM, 1 ancestral), got {eta!r}")


def ddim_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    eta: float,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """Song et al. 2021 (DDIM), eq. 12 with sigma_t(eta) of eq. 16, on a grid of ``steps`` of the denoiser's levels.

    eta = 0 is the deterministic DDIM, eta = 1 is ancestral DDPM with sigma_t^2 = beta-tilde. One network
    evaluation per step; step coefficients in float64, the state in x_T's dtype.
    """
    check_eta(eta)
    table = StepTable.of(denoise.levels.grid(steps, spacing))
    x = x_T
    for i in reversed(range(len(table))):
        prediction = denoise(x, table.levels[i])
        a_bar, a_bar_prev = table.alpha_bar[i], (table.alpha_bar[i - 1] if i > 0 else 1.0)
        sigma = eta * ((1 - a_bar_prev) / (1 - a_bar) * (1 - a_bar / a_bar_prev)) ** 0.5
        # eq. 12: "predicted x_0" + "direction pointing to x_t" + "random noise"
        x = a_bar_prev**0.5 * prediction.x0 + (1 - a_bar_prev - sigma**2) ** 0.5 * prediction.eps
        if sigma > 0:
            x = x + sigma * noise_like(x, generator)
        yield SamplerStep(table.levels[i], x, prediction.x0)


def ddim_invert(denoise: Denoiser, x0: Tensor, *, steps: int, spacing: Spacing) -> Iterator[SamplerStep]:
    """Encodes images into noise by running deterministic DDIM forwards (Song et al. 2021, §4.3 and §5.4):
    x_{i+1} = a_{i+1} x0_pred(x_i) + s_{i+1} eps_pred(x_i), the network evaluated at the current state.

    The first step starts from a_1 x_0, the noise-free point at the first timestep, and adds the noise predicted
    there. :func:`ddim_sample` with eta = 0 and the same ``steps`` and ``spacing`` maps the last state back to x0,
    up to the discretisation error of both directions (which vanishes as steps grow).
    """
    table = StepTable.of(denoise.levels.grid(steps, spacing))
    prediction = denoise(table.a(0) * x0, table.levels[0])
    x = table.a(0) * x0 + table.s(0) * prediction.eps
    yield SamplerStep(table.levels[0], x, prediction.x0)
    for i in range(1, len(table)):
        prediction = denoise(x, table.levels[i - 1])
        x = table.a(i) * prediction.x0 + table.s(i) * prediction.eps
        yield SamplerStep(table.levels[i], x, prediction.x0)
