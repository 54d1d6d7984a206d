"""Likelihoods through the probability-flow ODE, for any objective (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", Sec. 4.3 and Appendix D.2; the instantaneous change of
variables of Chen et al. 2018; Lipman et al. 2023, Sec. 4, for flows).

In EDM's space x = x_0 + sigma eps (:mod:`diffusion.core.levels`) the probability-flow ODE is dx/dsigma = (x - D(x;
sigma)) / sigma (Karras et al. 2022, eq. 3 with sigma(t) = t); in s = ln sigma,

    dx/ds = f(x, s) = x - D(x; e^s),        d log p_s(x(s)) / ds = -tr(df/dx) = -(d - tr(dD/dx)),

so log p_{sigma_min}(x) = log p_{sigma_max}(x(s_max)) + integral over [s_min, s_max] of (d - tr(dD/dx)) ds, with d
the dimensions and the prior p_{sigma_max} = N(0, (1 + sigma_max^2) I): the unit normal of the VP state every sampler
starts from. The trace is Skilling and Hutchinson's estimate E_z[z^T (dD/dx) z] with ``probes`` Rademacher vectors z,
fixed for the whole solve (exact for a diagonal Jacobian, as a denoiser of independent dimensions has). The ODE is
solved by SciPy's adaptive Runge-Kutta 4(5) (Dormand-Prince, ``solve_ivp(method="RK45")``) to ``rtol`` and ``atol``,
Song et al.'s solver and their 1e-5 tolerances. A discrete model is evaluated at the nearest of its own levels (as
Heun's sampler does), so its ODE is solved on a piecewise-constant denoiser: its figure is an approximation beside
its variational bound.

8-bit data is dequantized uniformly within each value's bin of width 2/255 (the bins of the discrete variational
bound's decoder), so that -log P(x_0) <= E_u[-log p(x_0 + u)] - d log(2/255): :func:`bits_per_dim` adds log2(127.5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.levels import NoiseLevels
from diffusion.errors import SettingError

BIN = 2.0 / 255.0  # the width of an 8-bit value's bin in the model's range [-1, 1]


def dequantize(x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """8-bit images in the model's range, each value moved uniformly within its bin: x_0 + (u - 1/2) 2/255."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return x0 + (u - 0.5) * BIN


def bits_per_dim(log_likelihood: Tensor, dims: int, dequantized: bool) -> Tensor:
    """-log p / (d ln 2), plus log2(127.5) for data dequantized within bins of 2/255 (the bound on the 8-bit
    likelihood)."""
    bits = -log_likelihood / (dims * math.log(2.0))
    return bits + math.log2(1.0 / BIN) if dequantized else bits


def check_likelihood(levels: NoiseLevels) -> None:
    """Refuses a model whose largest level is pure noise (sigma = inf), where the ODE's prior has no scale."""
    if math.isinf(levels.sigma_max):
        raise SettingError(
            "the likelihood integrates the probability-flow ODE up to the model's largest noise level, and this "
            "model's reach pure noise (a flow with diffusion.t_max=1), where the prior has no scale: train it with its "
            "largest time below 1 (e.g. diffusion.t_max=0.999)"
        )


def ode_log_likelihood(
    denoise: Denoiser,
    x: Tensor,
    *,
    probes: int,
    rtol: float,
    atol: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """log p_{sigma_min}(x) in nats per image, float64 ``(B,)``, for x ``(B, C, H, W)`` (in the model's dtype and on its
    device), and the number of the denoiser's evaluations per image (each with ``probes`` vector-Jacobian products).
    x is taken as the state at sigma_min (Song et al. evaluate at their smallest time alike). The denoiser must not
    limit x_0 (no clipping: the ODE needs the model's own field) and may not run under ``torch.inference_mode``;
    ``generator`` draws the probes."""
    levels = denoise.levels
    check_likelihood(levels)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise SettingError(f"eval.probes={probes!r} is not a whole number of at least 1; e.g. eval.probes=1")
    batch, dims = x.shape[0], x[0].numel()
    z = (torch.randint(0, 2, (probes, *x.shape), generator=generator, device=x.device) * 2 - 1).to(x.dtype)
    evaluations = 0

    def field(s: float, y: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        sigma = math.exp(s)
        level = levels.nearest(sigma)
        state = torch.from_numpy(y[: batch * dims]).view(x.shape).to(x.device, x.dtype)
        with torch.enable_grad():
            state.requires_grad_(True)
            x0 = denoise(state * level.a, level).x0  # the samplers' state x_t = a x
            traces = []
            for k in range(probes):
                (grad,) = torch.autograd.grad((x0 * z[k]).sum(), state, retain_graph=k < probes - 1)
                traces.append((grad * z[k]).flatten(1).sum(1))
        trace = torch.stack(traces).mean(0)  # (B,)
        drift = (state - x0).detach().flatten().double().cpu().numpy()
        return np.concatenate([drift, (dims - trace.double()).cpu().numpy()])

    start = np.concatenate([x.detach().flatten().double().cpu().numpy(), np.zeros(batch)])
    span = (math.log(levels.sigma_min), math.log(levels.sigma_max))
    solution = solve_ivp(field, span, start, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"the probability-flow ODE was not solved: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1])
    x_end, integral = end[: batch * dims].view(batch, dims), end[batch * dims :]
    variance = 1.0 + levels.sigma_max**2
    prior = -0.5 * (x_end**2).sum(1) / variance - 0.5 * dims * math.log(2 * math.pi * variance)
    return prior + integral, evaluations
