"""Prediction targets of the discrete DDPM family: what the network regresses, and the exact conversions between
them.

With a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t) and x_t = a_t x_0 + s_t eps, a network can predict

    eps   the noise (Ho et al. 2020)
    x0    the clean image
    v     the velocity v = a_t eps - s_t x_0 (Salimans & Ho 2022, §4)
    mu    the posterior mean mu-tilde = coef1_t x_0 + coef2_t x_t (Ho et al. 2020, eq. 7)

Each is affine in (x_0, eps) for fixed x_t and t, so every target converts exactly into the pair (x_0, eps) and
back. This module is the one place where the prediction type is resolved: samplers and losses only see the pair.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from diffusion.core.schedules import NoiseSchedule

Target = Literal["eps", "x0", "v", "mu"]
TARGETS: tuple[Target, ...] = get_args(Target)


def signal_and_noise(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """a_t = sqrt(alpha_bar_t) and s_t = sqrt(1 - alpha_bar_t), cast and shaped to broadcast against ``like``."""
    return (
        schedule.at(schedule.sqrt_alphas_cumprod, t, like),
        schedule.at(schedule.sqrt_one_minus_alphas_cumprod, t, like),
    )


def eps_from_x0(schedule: NoiseSchedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """eps = (x_t - a_t x_0) / s_t."""
    a, s = signal_and_noise(schedule, t, x_t)
    return (x_t - a * x0) / s


def to_x0_eps(schedule: NoiseSchedule, target: Target, output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The pair (x_0, eps) implied by a network ``output`` of the given ``target`` at (x_t, t)."""
    a, s = signal_and_noise(schedule, t, x_t)
    if target == "eps":
        return (x_t - s * output) / a, output
    if target == "x0":
        return output, (x_t - a * output) / s
    if target == "v":
        # invert [x_t; v] = [[a, s], [-s, a]] [x_0; eps], a rotation since a^2 + s^2 = 1
        return a * x_t - s * output, s * x_t + a * output
    if target == "mu":
        c1 = schedule.at(schedule.posterior_mean_coef1, t, x_t)
        c2 = schedule.at(schedule.posterior_mean_coef2, t, x_t)
        x0 = (output - c2 * x_t) / c1
        return x0, (x_t - a * x0) / s
    raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")


def from_x0_eps(schedule: NoiseSchedule, target: Target, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """The regression target of the given kind for the pair (x_0, eps) at (x_t, t)."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        a, s = signal_and_noise(schedule, t, x_t)
        return a * eps - s * x0
    if target == "mu":
        c1 = schedule.at(schedule.posterior_mean_coef1, t, x_t)
        return c1 * x0 + schedule.at(schedule.posterior_mean_coef2, t, x_t) * x_t
    raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")


def x0_error_scale(schedule: NoiseSchedule, target: Target, t: Tensor) -> Tensor:
    """k_t with |target error| = k_t |x_0 error| for fixed x_t, float64 ``(B,)``.

    From the conversions above: k = a/s = sqrt(SNR) for eps, 1 for x0, 1/s = sqrt(SNR + 1) for v, coef1 for mu.
    """
    if target == "eps":
        return schedule.snr[t].sqrt()
    if target == "x0":
        return schedule.snr[t].new_ones(t.shape)
    if target == "v":
        return (schedule.snr[t] + 1.0).sqrt()
    if target == "mu":
        return schedule.posterior_mean_coef1[t]
    raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
