"""What every sampler shares: the step it yields, the grid of levels it walks, and its noise."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser
from diffusion.core.levels import Level, NoiseLevels
from diffusion.core.schedules import NoiseSchedule
from diffusion.errors import SettingError


@dataclass(frozen=True)
class SamplerStep:
    """One step of a sampler: the ``level`` it evaluated the denoiser at, the state ``x`` it moved to, and the clean
    image ``x0_pred`` the denoiser predicted on the way (both ``(B, C, H, W)``; x is the VP state x_t = a x_0 + s eps of
    :mod:`diffusion.core.levels`). The last step's ``x`` is the sample. Collecting ``x`` or ``x0_pred`` over the steps
    gives the frames of a reverse-process GIF."""

    level: Level
    x: Tensor
    x0_pred: Tensor


@dataclass(frozen=True)
class StepTable:
    """A grid of levels as plain float64 numbers, for samplers whose step coefficients are scalars.

    Row i of every list belongs to the i-th level of the grid, increasing.
    """

    levels: list[Level]
    alpha_bar: list[float]

    @classmethod
    def of(cls, grid: Sequence[Level]) -> StepTable:
        return cls(list(grid), [level.alpha_bar for level in grid])

    def __len__(self) -> int:
        return len(self.levels)

    def a(self, i: int) -> float:
        """sqrt(alpha_bar) at row i; row -1 is the clean data, alpha_bar = 1."""
        return 1.0 if i < 0 else self.alpha_bar[i] ** 0.5

    def s(self, i: int) -> float:
        """sqrt(1 - alpha_bar) at row i; 0 at row -1."""
        return 0.0 if i < 0 else (1.0 - self.alpha_bar[i]) ** 0.5


def below_pure_noise(levels: NoiseLevels, sampler: str) -> None:
    """For a sampler whose steps divide by a (the ODE's sigma = s / a, the SDE's log-ratio of alpha_bar): the
    model's largest level must lie below pure noise."""
    if math.isinf(levels.sigma_max):
        raise SettingError(
            f"sampler={sampler} cannot start from pure noise (sigma = inf), where this model's noise levels reach "
            f"(a flow with diffusion.t_max=1): sample it with sampler=euler, ddim, dpm_solver, ddpm or heun, or "
            f"train it with its largest time below 1 (e.g. diffusion.t_max=0.999)"
        )


def walked(grid: Sequence[Level], device: torch.device | str) -> NoiseSchedule:
    """The schedule whose rows are the levels of ``grid`` (:meth:`NoiseSchedule.from_alpha_bar`), on ``device``: the
    posterior of the reverse process between them (the respaced schedule of Nichol & Dhariwal 2021, §4)."""
    alpha_bar = torch.tensor([level.alpha_bar for level in grid], dtype=torch.float64, device=device)
    return NoiseSchedule.from_alpha_bar(alpha_bar)


class NoiseSource(Protocol):
    """Noise with a stream per image (:class:`diffusion.core.drawing.ImageNoise`): ``randn_like(x)`` is standard normal
    noise shaped like x, on its device and in its dtype."""

    def randn_like(self, x: Tensor) -> Tensor: ...


Randomness = torch.Generator | NoiseSource | None


class Sampler(Protocol):
    """A sampler with its options bound: a ``configs/sampler/*.yaml`` instantiated by Hydra (``_partial_``), e.g.
    ``functools.partial(ddim_sample, steps=50, spacing="uniform", eta=0.0)``. It walks from the unit normal noise
    ``x_T`` (the VP state at the denoiser's largest level) to a sample, yielding every step; ``generator`` is where
    its noise comes from (stochastic samplers)."""

    def __call__(self, denoise: Denoiser, x_T: Tensor, *, generator: Randomness = None) -> Iterator[SamplerStep]: ...


def noise_like(x: Tensor, generator: Randomness) -> Tensor:
    """Standard normal noise shaped like x (on its device, in its dtype), drawn from ``generator``: a torch
    generator on x's device, or a :class:`NoiseSource` that gives every image its own stream."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return generator.randn_like(x)


def final(steps: Iterable[SamplerStep]) -> Tensor:
    """Runs a sampler to the end and returns the sample."""
    last = None
    for step in steps:
        last = step
    if last is None:
        raise ValueError("the sampler took no steps")
    return last.x
