"""Noise levels: the one space every sampler works in, and the grids of levels a model is sampled on.

Every formulation of this project noises an image x_0 into a state that is, up to a scale, EDM's x = x_0 + sigma eps
(Karras et al. 2022, eq. 1 with s(t) = 1): the discrete VP family's x_t = a_t x_0 + s_t eps is x / sqrt(1 + sigma^2)
with sigma = s_t / a_t, and a flow's x_t = (1 - t) x_0 + t eps is x / (1 + sigma) with sigma = t / (1 - t). A
:class:`Level` names one noise level by its sigma, together with the VP coefficients of the state the samplers carry,

    x_t = a x_0 + s eps,   a = 1 / sqrt(1 + sigma^2),   s = sigma a,   alpha_bar = a^2,

which stays bounded at every level (x_t is the unit normal noise itself at sigma = inf, a = 0). A model declares where
it may be evaluated as :class:`NoiseLevels`: the rows of its schedule for a model trained at integer timesteps
(:class:`DiscreteLevels`), any sigma in a range for a continuous one (:class:`ContinuousLevels`). Samplers ask it for
a grid of ``steps`` levels (``spacing``) or for the level nearest to a sigma of their own (EDM's Heun), and never ask
what kind of model it is.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.schedules import Spacing, spaced_timesteps
from diffusion.errors import SettingError


@dataclass(frozen=True)
class Level:
    """One noise level, as plain float64 numbers (step coefficients of samplers are scalars).

    sigma: EDM's noise level, in [0, inf]. alpha_bar, a, s: the VP state's coefficients (a = sqrt(alpha_bar),
    s = sqrt(1 - alpha_bar)), given exactly (a discrete model's table values, not recomputed from sigma).
    timestep: the network timestep of a model trained at integer timesteps (the row of its schedule); ``None`` for a
    continuous model.
    """

    sigma: float
    alpha_bar: float
    a: float
    s: float
    timestep: int | None = None

    @classmethod
    def of_sigma(cls, sigma: float) -> Level:
        """The level at ``sigma`` (``inf``: pure noise, a = 0)."""
        if math.isinf(sigma):
            return cls(sigma, 0.0, 0.0, 1.0)
        norm = math.sqrt(1.0 + sigma**2)
        return cls(sigma, 1.0 / (1.0 + sigma**2), 1.0 / norm, sigma / norm)


class NoiseLevels(ABC):
    """Where a model may be evaluated: what the samplers walk.

    Attributes:
        sigma_min, sigma_max: the smallest and the largest level.
        max_steps: the most levels a grid can have (the number of rows of a discrete model); ``None`` for any.
    """

    sigma_min: float
    sigma_max: float
    max_steps: int | None

    @abstractmethod
    def grid(self, steps: int, spacing: Spacing) -> list[Level]:
        """``steps`` distinct levels, increasing, the last one ``sigma_max``, chosen by ``spacing`` (see
        :func:`diffusion.core.schedules.spaced_timesteps` for the discrete rows and :class:`ContinuousLevels`)."""

    @abstractmethod
    def nearest(self, sigma: float) -> Level:
        """The level the model is evaluated at for a sigma a sampler chose: ``sigma`` itself for a continuous model,
        the nearest of its own for a discrete one."""


class DiscreteLevels(NoiseLevels):
    """The rows of a schedule that a network was trained on at integer timesteps; row t is the network timestep t.

    Args:
        alphas_cumprod: alpha_bar_t, float64 ``(T,)``, decreasing (:class:`diffusion.core.schedules.NoiseSchedule`).
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        alpha_bar = alphas_cumprod.detach().to("cpu", torch.float64)
        self.alpha_bar = alpha_bar
        self.sigmas = (1.0 - alpha_bar).sqrt() / alpha_bar.sqrt()  # increasing, float64 (T,)
        self._a, self._s = alpha_bar.sqrt().tolist(), (1.0 - alpha_bar).sqrt().tolist()
        self.sigma_min, self.sigma_max = self.sigmas[0].item(), self.sigmas[-1].item()
        self.max_steps = len(alpha_bar)

    def level(self, t: int) -> Level:
        """Row ``t``: the network timestep t."""
        return Level(self.sigmas[t].item(), self.alpha_bar[t].item(), self._a[t], self._s[t], t)

    def grid(self, steps: int, spacing: Spacing) -> list[Level]:
        return [self.level(t) for t in spaced_timesteps(self.alpha_bar, steps, spacing)]

    def nearest(self, sigma: float) -> Level:
        """The row whose sigma_t is nearest (EDM's ``round_sigma`` for its iDDPM wrapper): a network whose timestep
        embedding was trained at integers only is never evaluated between two of them."""
        return self.level(int((self.sigmas - sigma).abs().argmin()))


class ContinuousLevels(NoiseLevels):
    """Any sigma between ``sigma_of_time(0)`` and ``sigma_of_time(1)``: a model trained at continuous noise levels.

    ``sigma_of_time`` maps the formulation's own time tau in [0, 1] (float64 tensor in, the same shape out,
    increasing) to sigma: EDM's ramp (eq. 5), a flow's t / (1 - t). The spacings of a grid of N levels are then
    ``uniform`` in tau, ``quadratic`` (evenly spaced in sqrt(tau), dense near the data), ``trailing`` (tau = 1/N,
    2/N, ..., 1: the data end left out, as the discrete spacing of that name leaves out t = 0) and ``logsnr``
    (evenly spaced in log sigma, which is log-SNR up to a factor -2), as they are for a discrete model's rows.
    """

    max_steps = None

    def __init__(self, sigma_of_time: Callable[[Tensor], Tensor]) -> None:
        self.sigma_of_time = sigma_of_time
        ends = sigma_of_time(torch.tensor([0.0, 1.0], dtype=torch.float64))
        self.sigma_min, self.sigma_max = ends[0].item(), ends[1].item()

    def grid(self, steps: int, spacing: Spacing) -> list[Level]:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SettingError(f"the number of sampling steps must be at least 1, got {steps!r}")
        if steps == 1:
            return [Level.of_sigma(self.sigma_max)]
        if spacing == "logsnr":
            if math.isinf(self.sigma_max):
                raise SettingError(
                    "spacing=logsnr spaces the levels evenly in log sigma, and this model's reach pure noise (sigma = "
                    "inf; a flow with diffusion.t_max=1): use sampler.spacing=uniform (the model's own time), or "
                    "train it with its largest time below 1 (e.g. diffusion.t_max=0.999)"
                )
            log_sigma = torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), steps, dtype=torch.float64)
            sigmas = log_sigma.exp()
        else:
            ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
            times = {"uniform": ramp, "quadratic": ramp**2, "trailing": torch.arange(1, steps + 1) / steps}
            if spacing not in times:
                raise SettingError(f"unknown spacing {spacing!r}; choose uniform, quadratic, logsnr or trailing")
            sigmas = self.sigma_of_time(times[spacing].to(torch.float64))
        return [Level.of_sigma(s) for s in sigmas.tolist()]

    def nearest(self, sigma: float) -> Level:
        return Level.of_sigma(sigma)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5), decreasing: sigma_i = (sigma_max^(1/rho) + i / (N - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i = 0 .. N - 1, float64 ``(N,)`` (N = 1: sigma_max alone)."""
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
