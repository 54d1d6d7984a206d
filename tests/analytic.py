"""Data distributions whose optimal denoiser E[x_0 | x_t] is known in closed form, for testing samplers and losses
without a network.

For x_0 ~ N(m, s^2) per dimension and x_t = a x_0 + sigma eps (a^2 = alpha_bar, sigma^2 = 1 - alpha_bar),
x_t ~ N(a m, a^2 s^2 + sigma^2) and, by Bayes' rule for Gaussians,
    E[x_0 | x_t] = m + a s^2 / (a^2 s^2 + sigma^2) (x_t - a m).
For a mixture sum_k w_k N(m_k, s_k^2), the same holds per component, weighted by the posterior responsibilities
p(k | x_t) ∝ w_k N(x_t; a m_k, a^2 s_k^2 + sigma^2). Every dimension is independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.denoiser import Prediction
from diffusion.core.levels import DiscreteLevels, Level, NoiseLevels
from diffusion.core.schedules import NoiseSchedule, make_betas


@dataclass(frozen=True)
class GaussianMixture:
    """A 1-D mixture applied independently to every dimension; one component is a plain Gaussian."""

    weights: tuple[float, ...]
    means: tuple[float, ...]
    stds: tuple[float, ...]

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        k = torch.multinomial(torch.tensor(self.weights), math.prod(shape), replacement=True, generator=generator)
        z = torch.randn(math.prod(shape), generator=generator, dtype=torch.float64)
        means, stds = torch.tensor(self.means, dtype=torch.float64), torch.tensor(self.stds, dtype=torch.float64)
        return (means[k] + stds[k] * z).view(shape)

    @property
    def mean(self) -> float:
        return sum(w * m for w, m in zip(self.weights, self.means, strict=True))

    @property
    def std(self) -> float:
        second = sum(w * (s**2 + m**2) for w, m, s in zip(self.weights, self.means, self.stds, strict=True))
        return math.sqrt(second - self.mean**2)

    def posterior_mean(self, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
        """E[x_0 | x_t] for x_t ~ q(x_t) at noise level alpha_bar (broadcastable to x_t)."""
        a, var_noise = alpha_bar.sqrt(), 1.0 - alpha_bar
        log_resp, means = [], []
        for w, m, s in zip(self.weights, self.means, self.stds, strict=True):
            var = a**2 * s**2 + var_noise
            log_resp.append(math.log(w) - 0.5 * (x_t - a * m) ** 2 / var - 0.5 * var.log())
            means.append(m + a * s**2 / var * (x_t - a * m))
        resp = torch.softmax(torch.stack(log_resp), dim=0)
        return (resp * torch.stack(means)).sum(0)

    def denoiser(self, levels: NoiseLevels) -> OptimalDenoiser:
        """The optimal denoiser for this data, evaluated at ``levels`` (a discrete model's rows, or any sigma of a
        continuous one: E[x_0 | x_t] depends on the level only, whatever the formulation)."""
        return OptimalDenoiser(self, levels)


class OptimalDenoiser:
    """E[x_0 | x_t] of a :class:`GaussianMixture` as a :class:`diffusion.core.denoiser.Denoiser`."""

    rows_per_image = 1

    def __init__(self, data: GaussianMixture, levels: NoiseLevels) -> None:
        self.data, self.levels = data, levels

    def __call__(self, x_t: Tensor, level: Level) -> Prediction:
        alpha_bar = torch.tensor(level.alpha_bar, dtype=x_t.dtype, device=x_t.device)
        x0 = self.data.posterior_mean(x_t, alpha_bar)
        return Prediction(x0=x0, eps=(x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt())


GAUSSIAN = GaussianMixture(weights=(1.0,), means=(0.3,), stds=(0.5,))
MIXTURE = GaussianMixture(weights=(0.3, 0.7), means=(-0.6, 0.5), stds=(0.15, 0.2))


def schedule_levels(name: str, timesteps: int = 1000) -> DiscreteLevels:
    """The levels of a discrete model trained on the named beta schedule."""
    return DiscreteLevels(NoiseSchedule(make_betas(name, timesteps)).alphas_cumprod)
