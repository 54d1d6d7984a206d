"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE for 10-25 step sampling."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.samplers.base import Randomness, SamplerStep, StepTable
from diffusion.core.schedules import Spacing


def dpm_solver_sample(
    denoise: Denoiser,
    x_T: Tensor,
    *,
    steps: int,
    spacing: Spacing,
    generator: Randomness = None,
) -> Iterator[SamplerStep]:
    """Lu et al. 2022, "DPM-Solver++", Algorithm 2 (multistep second order, data prediction).

    With lambda = log(a / s) and h_i = lambda_{i-1} - lambda_i, each step is
        x_{i-1} = (s_{i-1} / s_i) x_i - a_{i-1} (e^{-h_i} - 1) D_i,
    where D_i is the x_0 prediction at the first step and, afterwards, the extrapolation
        D_i = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i+1},  r_i = h_{i+1} / h_i.
    The last step, to s = 0, is first order and returns the x_0 prediction at the smallest timestep
    (diffusers' ``lower_order_final``). ``steps`` network evaluations. Deterministic: ``generator`` is unused
    and accepted only so that every sampler takes the same arguments.
    """
    table = StepTable.of(denoise.levels.grid(steps, spacing))
    # lambda = -inf at pure noise (a = 0): the first step's h is infinite, e^-h = 0, and it is first order
    lam = [math.log(table.a(i) / table.s(i)) if table.a(i) > 0 else -math.inf for i in range(len(table))]
    x = x_T
    x0_prev, h_prev = None, None
    for i in reversed(range(len(table))):
        prediction = denoise(x, table.levels[i])
        if i == 0:
            x = prediction.x0
        else:
            h = lam[i - 1] - lam[i]
            if x0_prev is None:
                D = prediction.x0
            else:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * prediction.x0 - (1 / (2 * r)) * x0_prev
            x = (table.s(i - 1) / table.s(i)) * x - table.a(i - 1) * math.expm1(-h) * D
            x0_prev, h_prev = prediction.x0, h
        yield SamplerStep(table.levels[i], x, prediction.x0)
