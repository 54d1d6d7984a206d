"""The discrete-time DDPM family (Ho et al. 2020; Nichol & Dhariwal 2021; Salimans & Ho 2022): a beta schedule of T
rows, the network trained at integer timesteps t to predict eps, x0, v or the posterior mean, optionally with a
learned variance and the hybrid loss, and the variational bound on log p(x_0) in bits per dimension.

    training   t ~ U{0, .., T-1},  x_t = a_t x_0 + s_t eps  (Ho et al. 2020, eq. 4),  the network sees (x_t, t)
    loss       L_simple (eq. 14) of the chosen target, MSE or L1, min-SNR-gamma weighted or not (Hang et al. 2023);
               with a learned variance, + lambda T L_t (Nichol & Dhariwal 2021, §3.1)
    sampling   the rows of the schedule (:class:`~diffusion.core.levels.DiscreteLevels`); the VP state is x_t itself
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import get_args

import torch
from torch import Tensor

from diffusion import checks
from diffusion.core.denoiser import Denoiser, Prediction
from diffusion.core.levels import DiscreteLevels, Level
from diffusion.core.losses import LossType, prior_bpd, training_losses, vb_terms_bpd
from diffusion.core.objectives.base import NetworkCall, Objective
from diffusion.core.reverse import Variance, p_mean_variance
from diffusion.core.schedules import NoiseSchedule, ScheduleName, make_betas
from diffusion.core.targets import TARGETS, Target, to_x0_eps


class DDPM(Objective):
    """A network trained at the T integer timesteps of a beta schedule.

    Args:
        timesteps: T, the rows of the schedule (at least 2).
        schedule: the beta schedule (:mod:`diffusion.core.schedules`).
        target: what the network predicts (:mod:`diffusion.core.targets`).
        loss: ``mse`` or ``l1``.
        min_snr_gamma: gamma of min-SNR weighting (MSE only), or ``None`` for none.
        learned_variance: the network also outputs the interpolation of Nichol & Dhariwal's eq. 15.
        vlb_weight: lambda of the hybrid loss, with a learned variance.
    """

    has_variational_bound = True

    def __init__(
        self,
        *,
        timesteps: int,
        schedule: ScheduleName,
        target: Target,
        loss: LossType,
        min_snr_gamma: float | None,
        learned_variance: bool,
        vlb_weight: float,
    ) -> None:
        super().__init__()
        checks.whole_number("diffusion.timesteps", timesteps, 2, "Ho et al. use diffusion.timesteps=1000")
        checks.choice("diffusion.schedule", schedule, get_args(ScheduleName))
        checks.choice("diffusion.target", target, TARGETS)
        checks.choice("diffusion.loss", loss, get_args(LossType))
        checks.number(
            "diffusion.min_snr_gamma", min_snr_gamma, 0, float("inf"), "null for none, e.g. 5.0", open_low=True
        )
        if min_snr_gamma is not None and loss != "mse":
            checks.fail("diffusion.min_snr_gamma", min_snr_gamma, "weights the mse loss only", "set it to null")
        checks.flag("diffusion.learned_variance", learned_variance)
        checks.number("diffusion.vlb_weight", vlb_weight, 0, float("inf"), "Nichol & Dhariwal's is 0.001")
        with torch.device("cpu"):  # numbers, not weights: on the CPU even when the network is built on `meta`
            try:
                betas = make_betas(schedule, timesteps)
            except ValueError as error:
                raise type(error)(f"diffusion.schedule={schedule!r}: {error}") from None
            self.schedule = NoiseSchedule(betas)
        self.levels = DiscreteLevels(self.schedule.alphas_cumprod)
        self.target, self.loss, self.min_snr_gamma = target, loss, min_snr_gamma
        self.learned_variance, self.vlb_weight = learned_variance, vlb_weight

    def __len__(self) -> int:
        return len(self.schedule)

    # ------------------------------------------------------------------ training
    def training_levels(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """Timesteps t uniform over the T rows, int64."""
        return torch.randint(0, len(self.schedule), (n,), device=device, generator=generator)

    def losses(self, network: NetworkCall, x0: Tensor, level: Tensor, noise: Tensor) -> dict[str, Tensor]:
        t = level
        x_t = self.schedule.q_sample(x0, t, noise)
        return training_losses(
            self.schedule,
            network(x_t, t.float()),
            x0,
            x_t,
            t,
            noise,
            target=self.target,
            loss=self.loss,
            learned_variance=self.learned_variance,
            vlb_weight=self.vlb_weight,
            min_snr_gamma=self.min_snr_gamma,
        )

    def sampling_level(self, level: float) -> Level:
        return self.levels.level(int(level))

    def quartile(self, level: Tensor) -> Tensor:
        return level * 4 // len(self.schedule)

    # ------------------------------------------------------------------ sampling
    def network_input(self, x_t: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(x_t, t): the network was trained on the VP state itself, at its timestep."""
        return x_t, torch.full((x_t.shape[0],), float(level.timestep), device=x_t.device)

    def prediction(self, output: Tensor, x_t: Tensor, level: Level) -> Prediction:
        var_frac = None
        if self.learned_variance:
            output, var_output = output.chunk(2, dim=1)
            var_frac = (var_output + 1.0) / 2.0
        t = torch.full((x_t.shape[0],), level.timestep, device=x_t.device, dtype=torch.long)
        x0, eps = to_x0_eps(self.schedule, self.target, output, x_t, t)
        return Prediction(x0, eps, var_frac)

    # ------------------------------------------------------------------ the variational bound
    def vlb_terms_bpd(
        self, denoise: Denoiser, x0: Tensor, variance: Variance, generator: torch.Generator | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """Yields ``(t, L_t)`` for every row from T - 1 to 0, each ``(B,)`` in bits per dimension: one network
        evaluation per term at a fresh x_t ~ q(x_t | x_0) (improved-diffusion's ``calc_bpd_loop``). Their sum plus
        :meth:`prior_bpd` is the negative variational bound on log p(x_0), the NLL in bits/dim that papers report."""
        for step in reversed(range(len(self.schedule))):
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.schedule.q_sample(x0, t, noise)
            prediction = denoise(x_t, self.levels.level(step))
            mean, log_variance = p_mean_variance(self.schedule, prediction, x_t, t, variance)
            yield step, vb_terms_bpd(self.schedule, x0, x_t, t, mean, log_variance)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, ``(B,)``."""
        return prior_bpd(self.schedule, x0)
