"""Noise schedules and the float64 tables of the forward process derived from them.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"), with the code's names:

    betas            beta_t                  variance added at step t
    alphas           alpha_t = 1 - beta_t
    alphas_cumprod   alpha_bar_t = prod_{s<=t} alpha_s
    snr              SNR(t) = alpha_bar_t / (1 - alpha_bar_t)   (Kingma et al. 2021)

``t`` is an integer in ``[0, T-1]``; code step ``t`` is the paper's step ``t + 1``. Every table is computed once in
float64 and cast to the dtype of the tensor it multiplies at the point of use, so float32 (or bf16) training does
not accumulate rounding error in products such as ``alpha_bar``.

Rows and timesteps. Every table is indexed by its rows. On the schedule a network is trained on, row t is the
network timestep t, so the math that takes a schedule calls its index ``t`` (targets, reverse process, losses). A
sampler walks a schedule of its own levels (:meth:`NoiseSchedule.respace`, :meth:`NoiseSchedule.from_alpha_bar`)
with rows ``0 .. steps-1``; code that holds both calls that schedule ``walked`` and its index ``row``, and keeps ``t``
for the network timestep.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion.errors import SettingError

ScheduleName = Literal["linear", "cosine", "sigmoid", "quadratic"]
Spacing = Literal["uniform", "quadratic", "logsnr", "trailing"]

MAX_BETA = 0.999  # Nichol & Dhariwal 2021, §3.2: clip betas to avoid a singularity at t = T


def linear_betas(T: int) -> Tensor:
    """Ho et al. 2020, §4: beta from 1e-4 to 0.02 over 1000 steps, both ends scaled by 1000 / T for other T
    (improved-diffusion's ``get_named_beta_schedule``), so the total noise added stays the same."""
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


def quadratic_betas(T: int) -> Tensor:
    """sqrt(beta) linear from sqrt(1e-4) to sqrt(0.02) (the "quad" schedule of Song et al. 2021, DDIM), scaled by
    1000 / T like :func:`linear_betas`."""
    scale = 1000.0 / T
    return torch.linspace(math.sqrt(scale * 1e-4), math.sqrt(scale * 0.02), T, dtype=torch.float64) ** 2


def betas_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t) for a continuous alpha_bar given at the T + 1 points
    0, 1/T, ..., 1 (Nichol & Dhariwal 2021, eq. 17), clipped at 0.999."""
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)


def cosine_betas(T: int) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi / 2) with s = 0.008."""
    s = 0.008
    tau = torch.linspace(0.0, 1.0, T + 1, dtype=torch.float64)
    return betas_from_alpha_bar(torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2)


def sigmoid_betas(T: int) -> Tensor:
    """Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", Algorithm 1 (start -3, end 3,
    tau 1): alpha_bar(t) = (sigmoid(end) - sigmoid(start + t (end - start))) / (sigmoid(end) - sigmoid(start))."""
    start, end = -3.0, 3.0
    tau = torch.linspace(0.0, 1.0, T + 1, dtype=torch.float64)
    v_start, v_end = torch.sigmoid(torch.tensor(start)), torch.sigmoid(torch.tensor(end))
    alpha_bar = (v_end - torch.sigmoid(start + tau * (end - start))) / (v_end - v_start)
    return betas_from_alpha_bar(alpha_bar.clamp(min=1e-9))


SCHEDULES = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "quadratic": quadratic_betas,
}


def make_betas(name: ScheduleName, T: int) -> Tensor:
    """The named schedule for ``T`` steps, float64 of shape ``(T,)``. ``T`` at least 2 is the caller's to check
    (:class:`diffusion.core.objectives.DDPM` checks ``diffusion.timesteps``)."""
    betas = SCHEDULES[name](T)
    if betas.max() >= 1:
        raise SettingError(
            f"the {name} schedule scaled to T={T} steps has betas of {betas.max().item():.3g} (it scales "
            f"beta by 1000 / T); use more than 20 steps with it, or the cosine schedule"
        )
    return betas


def spaced_timesteps(alphas_cumprod: Tensor, steps: int, spacing: Spacing) -> list[int]:
    """``steps`` increasing timesteps of the schedule with ``alphas_cumprod`` (float64 ``(T,)``), always including
    the last; all but ``trailing`` include the first.

    ``uniform``: evenly spaced in t (improved-diffusion's ``space_timesteps``); ``quadratic``: evenly spaced in
    sqrt(t) (Song et al. 2021, DDIM, §D.2), dense near the data; ``logsnr``: evenly spaced in log-SNR (Lu et al.
    2022, DPM-Solver, §3.3); ``trailing``: T/steps apart counting down from T - 1, so the last network evaluation
    is at T/steps - 1 rather than 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", Table 2; lucidrains' DDIM steps the same way). Where rounding makes two equal, later ones move up, so
    all are distinct.
    """
    T = len(alphas_cumprod)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise SettingError(f"the number of sampling steps must be between 1 and T = {T}, got {steps}")
    if steps == 1:
        return [T - 1]
    if spacing == "uniform":
        points = torch.linspace(0, T - 1, steps, dtype=torch.float64)
    elif spacing == "quadratic":
        points = torch.linspace(0, math.sqrt(T - 1), steps, dtype=torch.float64) ** 2
    elif spacing == "trailing":
        points = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).flip(0)
    elif spacing == "logsnr":
        alpha_bar = alphas_cumprod.cpu().to(torch.float64)
        log_snr = (alpha_bar / (1.0 - alpha_bar)).log().flip(0)  # increasing, from t = T - 1 down to t = 0
        targets = torch.linspace(log_snr[-1].item(), log_snr[0].item(), steps, dtype=torch.float64)
        points = _interp(targets, log_snr, torch.arange(T - 1, -1, -1, dtype=torch.float64))
    else:
        raise SettingError(f"unknown timestep spacing {spacing!r}; choose uniform, quadratic, logsnr or trailing")
    chosen: list[int] = []
    for p in points.round().long().tolist():
        chosen.append(max(p, chosen[-1] + 1) if chosen else p)
    if chosen[-1] > T - 1:  # rounding pushed the tail past T - 1: pull it back down, keeping them distinct
        for i in range(len(chosen) - 1, -1, -1):
            chosen[i] = min(chosen[i], T - 1 - (len(chosen) - 1 - i))
    return chosen


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of the points (xp, fp), xp increasing (torch has no ``interp``)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    w = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0.0, 1.0)
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


class NoiseSchedule(nn.Module):
    """The forward process q(x_t | x_0) of a beta schedule, its posterior, and the tables both need.

    The tables are float64 buffers (not saved in checkpoints: they follow from the betas), so Lightning moves them
    with the model and no code calls ``.to(device)``. ``network_timesteps`` maps the rows of a respaced schedule to
    the timesteps the network was trained on (the identity for the schedule it was trained with).

    Args:
        betas: float64 ``(T,)``.
        network_timesteps: the network timestep of each row, ``(T,)`` int64; ``None`` means ``0 .. T-1``.
        alphas: 1 - betas, when the caller knows it more exactly than 1 - betas rounds it (betas close to 1).
    """

    def __init__(self, betas: Tensor, network_timesteps: Tensor | None = None, alphas: Tensor | None = None) -> None:
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or (betas.device.type != "meta" and not ((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        alphas = 1.0 - betas if alphas is None else alphas.to(torch.float64)
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # beta-tilde, Ho et al. 2020 eq. 7
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
            "posterior_variance": posterior_variance,
            # beta-tilde is 0 at t = 0; its log is clipped to the value at t = 1 (improved-diffusion), or, for a
            # schedule of one row (a sampler respaced to one step), to beta_0, the other end of the variance range
            "posterior_log_variance_clipped": torch.cat(
                [posterior_variance[1:2] if len(betas) > 1 else betas, posterior_variance[1:]]
            ).log(),
            # Ho et al. 2020 eq. 7: mu-tilde = coef1 * x_0 + coef2 * x_t
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            "log_betas": betas.log(),
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        if network_timesteps is None:
            network_timesteps = torch.arange(len(betas), device=betas.device)
        self.register_buffer(
            "network_timesteps",
            torch.as_tensor(network_timesteps, dtype=torch.long, device=betas.device),
            persistent=False,
        )

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    snr: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    log_betas: Tensor
    network_timesteps: Tensor

    def __len__(self) -> int:
        return self.betas.shape[0]

    @staticmethod
    def at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """``table[t]`` cast to ``like``'s dtype and shaped ``(B, 1, ..., 1)`` to broadcast against ``like``."""
        return table[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (Ho et al. 2020, eq. 4).

        x0, noise: ``(B, C, H, W)``; t: ``(B,)`` int64.
        """
        return (
            self.at(self.sqrt_alphas_cumprod, t, x0) * x0 + self.at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
        mean = self.at(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, self.at(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7)."""
        mean = self.at(self.posterior_mean_coef1, t, x_t) * x0 + self.at(self.posterior_mean_coef2, t, x_t) * x_t
        variance = self.at(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def respace(self, timesteps: Sequence[int]) -> NoiseSchedule:
        """The schedule that jumps between the given increasing timesteps (Nichol & Dhariwal 2021, §4):
        alpha_bar'_i = alpha_bar_{t_i}, beta'_i = 1 - alpha_bar'_i / alpha_bar'_{i-1}. Its ``network_timesteps``
        map each row back to the network's timestep."""
        chosen = [int(t) for t in timesteps]  # checked as plain integers: no device sync, and meta tensors work
        if not chosen or any(b <= a for a, b in itertools.pairwise(chosen)):
            raise ValueError("respacing needs a non-empty, strictly increasing list of timesteps")
        if chosen[0] < 0 or chosen[-1] >= len(self):
            raise ValueError(f"respaced timesteps must lie in [0, {len(self) - 1}]")
        index = torch.tensor(chosen, dtype=torch.long, device=self.betas.device)
        return NoiseSchedule.from_alpha_bar(self.alphas_cumprod[index], self.network_timesteps[index])

    @staticmethod
    def from_alpha_bar(alpha_bar: Tensor, network_timesteps: Tensor | None = None) -> NoiseSchedule:
        """The schedule whose rows have the given alpha_bar (float64, decreasing): beta_i = 1 - alpha_bar_i /
        alpha_bar_{i-1}, alpha_bar_{-1} = 1. The schedule a sampler walks, from the levels it visits."""
        alphas = alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        return NoiseSchedule(1.0 - alphas, network_timesteps, alphas)
