"""Prediction targets: what the network regresses, and the exact conversions between them.

With a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t) and x_t = a_t x_0 + s_t eps, a network can predict

    eps   the noise (Ho et al. 2020)
    x0    the clean image
    v     the velocity v = a_t eps - s_t x_0 (Salimans & Ho 2022, §4)
    mu    the posterior mean mu-tilde = coef1_t x_0 + coef2_t x_t (Ho et al. 2020, eq. 7)
    edm   EDM's preconditioned network F (Karras et al. 2022, :mod:`diffusion.core.edm`), at sigma_t = s_t / a_t:
          x_0 = c_skip x + c_out F with x = x_t / a_t; the network sees c_in x and c_noise (:func:`network_input`)

Each is affine in (x_0, eps) for fixed x_t and t, so every target converts exactly into the pair (x_0, eps) and
back. This module is the one place where the prediction type is resolved: samplers and losses only see the pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from diffusion.core import edm
from diffusion.core.schedules import NoiseSchedule
from diffusion.errors import SettingError

Target = Literal["eps", "x0", "v", "mu", "edm"]
TARGETS: tuple[Target, ...] = ("eps", "x0", "v", "mu", "edm")


@dataclass(frozen=True)
class Prediction:
    """What a denoiser says about x_t, in the canonical form every sampler uses.

    x0, eps: ``(B, C, H, W)``, consistent: x_t = a_t x0 + s_t eps.
    var_frac: the learned-variance interpolation in [0, 1] of Nichol & Dhariwal 2021, eq. 15, ``(B, C, H, W)``,
        or ``None`` when the network does not learn its variance.
    """

    x0: Tensor
    eps: Tensor
    var_frac: Tensor | None = None


# A denoiser maps (x_t, t) to a Prediction; t is the network timestep, (B,) int64. Samplers take one of these,
# never a network, so the same code serves the analytic oracles in the tests, the callbacks and sample.py.
Denoiser = Callable[[Tensor, Tensor], Prediction]


def signal_and_noise(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """a_t = sqrt(alpha_bar_t) and s_t = sqrt(1 - alpha_bar_t), cast and shaped to broadcast against ``like``."""
    return (
        schedule.at(schedule.sqrt_alphas_cumprod, t, like),
        schedule.at(schedule.sqrt_one_minus_alphas_cumprod, t, like),
    )


def sigma_of(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> Tensor:
    """sigma_t = s_t / a_t, the EDM noise level of row t, shaped to broadcast against ``like``."""
    a, s = signal_and_noise(schedule, t, like)
    return s / a


def edm_coefficients(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """EDM's preconditioning on x_t rather than x = x_t / a_t: (c_skip / a_t, c_out, c_in / a_t), computed in
    float64 from a_t and s_t as sigma_d^2 a / (s^2 + sigma_d^2 a^2), s sigma_d / sqrt(s^2 + sigma_d^2 a^2) and
    1 / sqrt(s^2 + sigma_d^2 a^2) (sigma = s / a), then cast and shaped to broadcast against ``like``: no
    intermediate of the size of x (up to 80 times x_t) is rounded."""
    a, s = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    d = edm.SIGMA_DATA
    norm = (s**2 + d**2 * a**2).sqrt()
    shape = (-1, *([1] * (like.ndim - 1)))
    return tuple(c.to(like.dtype).view(shape) for c in (d**2 * a / norm**2, s * d / norm, 1.0 / norm))


def network_input(schedule: NoiseSchedule, target: Target, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """What the network is given at (x_t, t): (x_t, t) itself, except for ``edm``, whose network sees
    c_in(sigma) x = (c_in / a_t) x_t and the continuous c_noise(sigma) = ln(sigma) / 4 instead of the row."""
    if target != "edm":
        return x_t, t
    sigma = schedule.sqrt_one_minus_alphas_cumprod[t] / schedule.sqrt_alphas_cumprod[t]  # float64, (B,)
    _, _, c_in_a = edm_coefficients(schedule, t, x_t)
    return c_in_a * x_t, edm.preconditioning(sigma)[3].float()


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
    if target == "edm":
        c_skip_a, c_out, _ = edm_coefficients(schedule, t, x_t)
        x0 = c_skip_a * x_t + c_out * output
        return x0, (x_t - a * x0) / s
    raise SettingError(f"unknown prediction target {target!r}; choose one of {TARGETS}")


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
    if target == "edm":
        c_skip_a, c_out, _ = edm_coefficients(schedule, t, x_t)
        return (x0 - c_skip_a * x_t) / c_out
    raise SettingError(f"unknown prediction target {target!r}; choose one of {TARGETS}")


def x0_error_scale(schedule: NoiseSchedule, target: Target, t: Tensor) -> Tensor:
    """k_t with |target error| = k_t |x_0 error| for fixed x_t, float64 ``(B,)``.

    From the conversions above: k = a/s = sqrt(SNR) for eps, 1 for x0, 1/s = sqrt(SNR + 1) for v, coef1 for mu,
    1 / c_out(sigma) for edm.
    """
    if target == "eps":
        return schedule.snr[t].sqrt()
    if target == "x0":
        return schedule.snr[t].new_ones(t.shape)
    if target == "v":
        return (schedule.snr[t] + 1.0).sqrt()
    if target == "mu":
        return schedule.posterior_mean_coef1[t]
    if target == "edm":
        _, c_out, _, _ = edm.preconditioning(schedule.snr[t].rsqrt())
        return 1.0 / c_out
    raise SettingError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
