"""Flow matching on the straight path (rectified flow; Liu et al. 2023, Lipman et al. 2023), as Stable Diffusion 3
trains it (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis").

Convention (SD3's and diffusers' ``FlowMatchEulerDiscreteScheduler``'s; lucidrains' and torchcfm's run time the other
way): t in [0, 1], t = 0 the data and t = 1 pure noise,

    x_t = (1 - t) x_0 + t eps,        the network predicts the velocity u = dx_t/dt = eps - x_0,

trained with the mean squared error of u (SD3's eq. 2 with the "rf" weighting). Training times t are
``logit_normal`` (SD3: t = sigmoid(n), n ~ N(logit_mean, logit_std^2)) or ``uniform``, then shifted toward noise by
SD3's t' = s t / (1 + (s - 1) t) (``shift``; 1 is none), which moves sampling alike.

The network is given x_t itself and, as its noise conditioning, 1000 t: the scale of the discrete models' timesteps
(and of diffusers' flow pipelines), which every network of this project embeds at its sinusoid's frequencies; t
itself, within [0, 1], would leave most of them unused.

In the samplers' VP space (:mod:`diffusion.core.levels`), x_t = a x_0 + s eps is the flow's state divided by its
sum of coefficients: with n = sqrt((1 - t)^2 + t^2), a = (1 - t) / n and s = t / n, so t = s / (a + s), x_flow =
x_t / (a + s), and EDM's sigma = t / (1 - t). The model is sampled at t in [t_min, t_max].
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from diffusion import checks
from diffusion.core.denoiser import Prediction
from diffusion.core.levels import ContinuousLevels, Level
from diffusion.core.losses import mean_flat
from diffusion.core.objectives.base import NetworkCall, Objective
from diffusion.core.objectives.weighting import LearnedWeighting

TimeSampling = Literal["logit_normal", "uniform"]
TIMESTEP_SCALE = 1000.0  # the network's noise conditioning is 1000 t (see the module docstring)


def shifted(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23 with alpha = s), increasing, fixing 0
    and 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshifted(t: Tensor, shift: float) -> Tensor:
    """The inverse of :func:`shifted`: t = t' / (s - (s - 1) t')."""
    return t / (shift - (shift - 1.0) * t)


class Flow(Objective):
    """Rectified flow: the velocity of the straight path from data to noise.

    Args:
        t_sampling: the training times' distribution, ``logit_normal`` or ``uniform``.
        logit_mean, logit_std: the logit-normal's m and s (SD3's 0 and 1).
        shift: SD3's time shift (1: none), for training and sampling.
        t_min, t_max: the times the model is sampled at lie in [t_min, t_max] (after the shift): the last evaluation
            near the data, the first near (or, at 1, at) pure noise.
        learned_weighting: EDM2's learned uncertainty of the loss (:mod:`.weighting`), on 1000 t.
    """

    def __init__(
        self,
        *,
        t_sampling: TimeSampling,
        logit_mean: float,
        logit_std: float,
        shift: float,
        t_min: float,
        t_max: float,
        learned_weighting: bool,
    ) -> None:
        super().__init__()
        checks.choice("diffusion.t_sampling", t_sampling, get_args(TimeSampling))
        checks.number("diffusion.logit_mean", logit_mean, -10, 10, "SD3's is 0")
        checks.number("diffusion.logit_std", logit_std, 0, 10, "SD3's is 1", open_low=True)
        checks.number("diffusion.shift", shift, 0, 100, "1 for none; SD3 uses 3 at 1024x1024", open_low=True)
        checks.number("diffusion.t_min", t_min, 0, 1, "e.g. diffusers' 0.001", open_low=True, open_high=True)
        checks.number("diffusion.t_max", t_max, t_min, 1, "above t_min, at most 1 (noise), e.g. 0.999", open_low=True)
        self.t_sampling, self.logit_mean, self.logit_std, self.shift = t_sampling, logit_mean, logit_std, shift
        checks.flag("diffusion.learned_weighting", learned_weighting)
        self.t_min, self.t_max = t_min, t_max
        self.weighting = LearnedWeighting() if learned_weighting else None
        self.levels = ContinuousLevels(self.sigma_of_time)

    def sigma_of_time(self, tau: Tensor) -> Tensor:
        """EDM's sigma = t / (1 - t) of the flow's time t, itself t_min + tau (t_max - t_min) shifted; tau in [0, 1]
        (float64, any shape). At t = 1, sigma is infinite: pure noise."""
        t = shifted(self.t_min + tau * (self.t_max - self.t_min), self.shift)
        return t / (1.0 - t)

    # ------------------------------------------------------------------ training
    def training_levels(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """The flow's times t, float32 ``(n,)``, drawn as ``t_sampling`` says and shifted."""
        if self.t_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device, generator=generator))
        else:
            t = torch.rand(n, device=device, generator=generator)
        return shifted(t, self.shift)

    def losses(self, network: NetworkCall, x0: Tensor, level: Tensor, noise: Tensor) -> dict[str, Tensor]:
        t = level.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - t) * x0 + t * noise
        conditioning = TIMESTEP_SCALE * level.float()
        output = network(x_t, conditioning)
        if output.shape != x0.shape:
            raise ValueError(f"the network output has shape {tuple(output.shape)}, expected {tuple(x0.shape)}")
        dtype = torch.promote_types(output.dtype, torch.float32)  # bf16 outputs: the loss in float32
        return self.weighted({"loss": mean_flat((output.to(dtype) - (noise - x0).to(dtype)) ** 2)}, conditioning)

    def sampling_level(self, level: float) -> Level:
        """sigma = t / (1 - t)."""
        t = float(level)
        return Level.of_sigma(t / (1.0 - t) if t < 1.0 else math.inf)

    def quartile(self, level: Tensor) -> Tensor:
        """By the training distribution's CDF, before the shift (which keeps the order)."""
        t = unshifted(level.double(), self.shift)
        if self.t_sampling == "uniform":
            cdf = t
        else:
            z = (torch.logit(t.clamp(1e-12, 1 - 1e-12)) - self.logit_mean) / self.logit_std
            cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        return (cdf * 4).long().clamp(0, 3)

    # ------------------------------------------------------------------ sampling
    def network_input(self, x_t: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """x_flow = x_t / (a + s) at t = s / (a + s), and 1000 t."""
        t = level.s / (level.a + level.s)
        return x_t / (level.a + level.s), torch.full((x_t.shape[0],), TIMESTEP_SCALE * t, device=x_t.device)

    def prediction(self, output: Tensor, x_t: Tensor, level: Level) -> Prediction:
        """x_0 = x_flow - t u and eps = x_flow + (1 - t) u: the pair on the straight line through x_flow."""
        t = level.s / (level.a + level.s)
        x_flow = x_t / (level.a + level.s)
        return Prediction(x_flow - t * output, x_flow + (1.0 - t) * output)
