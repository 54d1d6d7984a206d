"""Euler's method on the flow's ODE: the sampler of rectified flow and SD3 (diffusers' FlowMatchEulerDiscrete)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.samplers.base import Randomness, SamplerStep, StepTable
from diffusion.core.schedules import Spacing


def euler_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """Euler's method on dx/dt = u(x, t) = eps - x_0 along the straight path x = (1 - t) x_0 + t eps (Liu et al.
    2023, Algorithm 1's sampling; Esser et al. 2024), over a grid of ``steps`` of the denoiser's levels from the
    noisiest down, then t = 0:

        x <- x + (t_next - t) (eps_pred - x0_pred),

    in the flow's coordinates x = x_t / (a + s), t = s / (a + s) of :mod:`diffusion.core.objectives.flow`, whatever
    the model was trained as (for a model of another objective it is deterministic DDIM, the same step in exact
    arithmetic, on that model's levels). ``x_T`` is the VP state at the largest level (the noise itself at t = 1).
    ``steps`` network evaluations; yields the VP state; deterministic: ``generator`` is unused.
    """
    table = StepTable.of(denoise.levels.grid(steps, spacing))

    def scale(i: int) -> float:  # a + s at row i; 1 at the data (row -1)
        return table.a(i) + table.s(i)

    top = len(table) - 1
    x = x_T / scale(top)
    for i in reversed(range(len(table))):
        prediction = denoise(x * scale(i), table.levels[i])
        t, t_next = table.s(i) / scale(i), table.s(i - 1) / scale(i - 1)
        x = x + (t_next - t) * (prediction.eps - prediction.x0)
        yield SamplerStep(table.levels[i], x * scale(i - 1), prediction.x0)
