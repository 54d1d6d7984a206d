"""The EDM formulation (Karras, Aittala, Aila and Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): continuous noise levels sigma, the preconditioned denoiser and its loss.

Data y in [-1, 1] is noised as x = y + sigma n. The network F is wrapped (the paper's Table 1, "Ours") as

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = ln(sigma) / 4,

and trained with lambda(sigma) ||D(y + sigma n; sigma) - y||^2, lambda = 1 / c_out^2, at ln sigma ~ N(P_mean,
P_std^2). Since D - y = c_out (F - (y - c_skip x) / c_out), the weighted loss is the plain squared error of F
against the effective target (y - c_skip x) / c_out (the paper's eq. 8), computed here in that form, which keeps
the weight of order one at every sigma.

The VP models of this project live in the same space: x_t = a_t y + s_t eps is x / sqrt(1 + sigma^2) with
sigma_t = s_t / a_t = sqrt((1 - alpha_bar_t) / alpha_bar_t). A schedule's rows are therefore a table of sigmas,
and :func:`edm_alpha_bar` makes the table an EDM model is sampled on by the row-walking samplers (DDIM,
DPM-Solver++, ancestral): EDM's own sigma grid from sigma_min to sigma_max with rho = 7 (eq. 5), one row per
level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion.errors import SettingError

SIGMA_DATA = 0.5  # the paper's Table 1: the standard deviation of the data it assumes
P_MEAN, P_STD = -1.2, 1.2  # the training distribution of ln sigma (Table 1)
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # the sampling range and grid exponent (Table 1, eq. 5)


def preconditioning(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at ``sigma`` (any shape; the same shape back)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4.0


def loss_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = RHO) -> Tensor:
    """The paper's eq. 5, decreasing: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i = 0 .. N - 1, float64 ``(N,)`` (N = 1: sigma_max alone)."""
    if steps < 1:
        raise SettingError(f"the number of sampling steps must be at least 1, got {steps}")
    if not 0.0 < sigma_min <= sigma_max:
        raise SettingError(
            f"sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}"
        )
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def edm_alpha_bar(T: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """The table an EDM model is sampled on by the row-walking samplers: alpha_bar = 1 / (1 + sigma^2) at EDM's grid
    of ``T`` levels, increasing in sigma with the row, float64 ``(T,)``."""
    sigmas = karras_sigmas(T, sigma_min, sigma_max, rho).flip(0)
    return 1.0 / (1.0 + sigmas**2)


def sample_sigma(n: int, p_mean: float, p_std: float, *, device: torch.device | str = "cpu", generator=None) -> Tensor:
    """Training noise levels: ln sigma ~ N(p_mean, p_std^2), float32 ``(n,)``."""
    return (p_mean + p_std * torch.randn(n, device=device, generator=generator)).exp()


def sigma_quartile(sigma: Tensor, p_mean: float, p_std: float) -> Tensor:
    """Which quarter of the training distribution each sigma falls in (0 the lowest), by the normal CDF of
    ln sigma: the analogue of grouping the discrete timesteps into quartiles."""
    z = (sigma.log() - p_mean) / p_std
    return (0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) * 4).long().clamp(0, 3)


def edm_loss(output: Tensor, y: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """Per-image lambda(sigma) mean ||D(x; sigma) - y||^2 for the network ``output`` F at x = y + sigma n, as the
    squared error of F against (y - c_skip x) / c_out; ``(B,)``, sigma ``(B,)``."""
    if output.shape != y.shape:
        raise ValueError(f"the network output has shape {tuple(output.shape)}, expected {tuple(y.shape)}")
    c_skip, c_out, _, _ = (c.view(-1, *([1] * (y.ndim - 1))).to(y.dtype) for c in preconditioning(sigma, sigma_data))
    target = (y - c_skip * x) / c_out
    dtype = torch.promote_types(output.dtype, torch.float32)  # bf16 outputs: the loss in float32
    return ((output.to(dtype) - target.to(dtype)) ** 2).flatten(1).mean(1)


def denoised(output: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """D(x; sigma) = c_skip x + c_out F for the network ``output`` F (``sigma`` broadcast against x)."""
    c_skip, c_out, _, _ = preconditioning(sigma, sigma_data)
    return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * output.to(x.dtype)
