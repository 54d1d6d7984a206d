"""What every sampler shares: the step it yields, the respaced schedule it walks, and its noise."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from diffusion.core.schedules import NoiseSchedule, Spacing, spaced_timesteps
from diffusion.core.targets import Denoiser


@dataclass(frozen=True)
class SamplerStep:
    """One step of a sampler: the network timestep ``t`` it evaluated, the state ``x`` it moved to, and the clean
    image ``x0_pred`` the network predicted on the way (both ``(B, C, H, W)``). The last step's ``x`` is the
    sample. Collecting ``x`` or ``x0_pred`` over the steps gives the frames of a reverse-process GIF."""

    t: int
    x: Tensor
    x0_pred: Tensor


@dataclass(frozen=True)
class StepTable:
    """A respaced schedule as plain float64 numbers, for samplers whose step coefficients are scalars.

    Row i of every list belongs to the i-th chosen timestep, increasing; ``t[i]`` is the network timestep.
    """

    t: list[int]
    alpha_bar: list[float]

    @classmethod
    def of(cls, schedule: NoiseSchedule) -> StepTable:
        return cls(schedule.network_timesteps.tolist(), schedule.alphas_cumprod.tolist())

    def __len__(self) -> int:
        return len(self.t)

    def a(self, i: int) -> float:
        """sqrt(alpha_bar) at row i; row -1 is the clean data, alpha_bar = 1."""
        return 1.0 if i < 0 else self.alpha_bar[i] ** 0.5

    def s(self, i: int) -> float:
        """sqrt(1 - alpha_bar) at row i; 0 at row -1."""
        return 0.0 if i < 0 else (1.0 - self.alpha_bar[i]) ** 0.5


def respaced(schedule: NoiseSchedule, steps: int, spacing: Spacing) -> NoiseSchedule:
    """The schedule a sampler walks: ``steps`` of ``schedule``'s timesteps, chosen by ``spacing``."""
    return schedule.respace(spaced_timesteps(schedule, steps, spacing))


def timestep_batch(t: int, x: Tensor) -> Tensor:
    """The network timestep ``t`` repeated for each image of ``x``: ``(B,)`` int64 on x's device."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


class NoiseSource(Protocol):
    """Noise with a stream per image (:class:`diffusion.core.drawing.ImageNoise`): ``randn_like(x)`` is standard normal
    noise shaped like x, on its device and in its dtype."""

    def randn_like(self, x: Tensor) -> Tensor: ...


Randomness = torch.Generator | NoiseSource | None


class Sampler(Protocol):
    """A sampler with its options bound: a ``configs/sampler/*.yaml`` instantiated by Hydra (``_partial_``), e.g.
    ``functools.partial(ddim_sample, steps=50, spacing="quadratic", eta=0.0)``. It walks from ``x_T`` to a sample,
    yielding every step; ``generator`` is where its noise comes from (stochastic samplers)."""

    def __call__(
        self, denoise: Denoiser, schedule: NoiseSchedule, x_T: Tensor, *, generator: Randomness = None
    ) -> Iterator[SamplerStep]: ...


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
