"""Training objectives and the variational bound in bits per dimension.

Per-sample losses are ``(B,)`` tensors, the mean over every non-batch dimension ("mean_flat" in improved-diffusion),
so that a loss does not change scale with the image size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffusion.core.denoiser import Prediction
from diffusion.core.reverse import p_mean_variance
from diffusion.core.schedules import NoiseSchedule
from diffusion.core.targets import Target, from_x0_eps, to_x0_eps, x0_error_scale

LossType = Literal["mse", "l1"]
LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the first: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise:
    1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_normal_mass(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, computed on the side of 0 where Phi is not close to 1, so
    that narrow bins far in a tail keep their precision. Floored at log(1e-12) like improved-diffusion."""
    mirror = lower > 0
    lo, hi = torch.where(mirror, -upper, lower), torch.where(mirror, -lower, upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log((-torch.expm1(log_lo - log_hi)).clamp(min=1e-12))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) in nats, elementwise, of 8-bit data x in {-1, -1 + 2/255, ..., 1} under N(mean, e^(2 log_scale)),
    integrated over the bin of width 2/255 around x, the two outer bins reaching to -inf and +inf
    (Ho et al. 2020, eq. 13). Uses the exact normal CDF rather than improved-diffusion's tanh approximation.
    """
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + 1.0 / 255.0)
    lower = inv_scale * (x - mean - 1.0 / 255.0)
    log_below = torch.special.log_ndtr(upper)  # bin of x = -1: (-inf, upper]
    log_above = torch.special.log_ndtr(-lower)  # bin of x = +1: [lower, +inf)
    return torch.where(x < -0.999, log_below, torch.where(x > 0.999, log_above, _log_normal_mass(lower, upper)))


def vb_terms_bpd(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor, model_mean: Tensor, model_log_variance: Tensor
) -> Tensor:
    """One term of the variational bound (Ho et al. 2020, eq. 5) in bits per dimension, ``(B,)``:
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the decoder L_0 = -log p(x_0 | x_1)
    with the discretized Gaussian of eq. 13 at t = 0."""
    true_mean, _, true_log_variance = schedule.q_posterior_mean_variance(x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / LN2
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)) / LN2
    return torch.where(t == 0, nll, kl)


def prior_bpd(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """The prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, ``(B,)``; it has no parameters and is
    near zero for any schedule that ends in (almost) pure noise."""
    t = torch.full((x0.shape[0],), len(schedule) - 1, device=x0.device, dtype=torch.long)
    mean, variance = schedule.q_mean_variance(x0, t)
    return mean_flat(normal_kl(mean, variance.log(), torch.zeros_like(mean), torch.zeros_like(mean))) / LN2


def min_snr_weight(schedule: NoiseSchedule, target: Target, t: Tensor, gamma: float) -> Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023): the loss in x_0 space weighted by min(SNR_t, gamma), expressed
    for the network's target: min(SNR_t, gamma) / k_t^2, where |target error| = k_t |x_0 error|. This gives
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0 and min(SNR, gamma) / (SNR + 1) for v. Float64 ``(B,)``."""
    return schedule.snr[t].clamp(max=gamma) / x0_error_scale(schedule, target, t) ** 2


def training_losses(
    schedule: NoiseSchedule,
    output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    noise: Tensor,
    *,
    target: Target,
    loss: LossType,
    learned_variance: bool,
    vlb_weight: float,
    min_snr_gamma: float | None,
) -> dict[str, Tensor]:
    """Per-sample training losses for the network ``output`` at x_t = q_sample(x0, t, noise), each ``(B,)``.

    ``simple``: L_simple of Ho et al. 2020, eq. 14, generalised to any target, as MSE or L1, optionally min-SNR
    weighted (MSE only). With ``learned_variance`` (output has 2C channels: the target, then the variance
    interpolation in [-1, 1]) the hybrid objective of Nichol & Dhariwal 2021, §3.1: ``loss = simple + vlb_weight * T *
    L_t``, where L_t (``vb``) is the bound's term at t computed with the mean's output detached, so it trains only the
    variance; T * L_t estimates L_vlb.
    """
    var_frac = None
    if learned_variance:
        if output.shape[1] != 2 * x0.shape[1]:
            raise ValueError(f"a learned-variance model must output 2 x {x0.shape[1]} channels, got {output.shape[1]}")
        output, var_output = output.chunk(2, dim=1)
        var_frac = (var_output + 1.0) / 2.0
    if output.shape != x0.shape:
        raise ValueError(f"the network output has shape {tuple(output.shape)}, expected {tuple(x0.shape)}")
    error = output - from_x0_eps(schedule, target, x0, noise, x_t, t)
    simple = mean_flat(error**2) if loss == "mse" else mean_flat(error.abs())
    if min_snr_gamma is not None:  # mse only: the objective's settings check says so
        simple = simple * min_snr_weight(schedule, target, t, min_snr_gamma).to(simple.dtype)
    terms = {"simple": simple}
    if var_frac is not None:
        x0_pred, eps_pred = to_x0_eps(schedule, target, output.detach(), x_t, t)
        mean, log_variance = p_mean_variance(schedule, Prediction(x0_pred, eps_pred, var_frac), x_t, t, "learned")
        terms["vb"] = vb_terms_bpd(schedule, x0, x_t, t, mean, log_variance)
        terms["loss"] = simple + vlb_weight * len(schedule) * terms["vb"]
    else:
        terms["loss"] = simple
    return terms
