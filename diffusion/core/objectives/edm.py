"""The EDM formulation (Karras, Aittala, Aila and Laine 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): continuous noise levels sigma, the preconditioned denoiser and its loss.

Data y in [-1, 1] is noised as x = y + sigma n. The network F is wrapped (the paper's Table 1, "Ours") as

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = ln(sigma) / 4,

and trained with lambda(sigma) ||D(y + sigma n; sigma) - y||^2, lambda = 1 / c_out^2, at ln sigma ~ N(P_mean,
P_std^2). Since D - y = c_out (F - (y - c_skip x) / c_out), the weighted loss is the plain squared error of F
against the effective target (y - c_skip x) / c_out (the paper's eq. 8), computed here in that form, which keeps
the weight of order one at every sigma.

The samplers carry the VP state x_t = a x with a = 1 / sqrt(1 + sigma^2) (:mod:`diffusion.core.levels`), so the
network is given (c_in / a) x_t and D = (c_skip / a) x_t + c_out F, the coefficients computed in float64 and cast:
no intermediate of the size of x (up to 80 times x_t) is rounded. A model may be sampled at any sigma in
[sigma_min, sigma_max], its own time tau in [0, 1] running along the grid of eq. 5 with exponent rho.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion import checks
from diffusion.core.denoiser import Prediction
from diffusion.core.levels import ContinuousLevels, Level
from diffusion.core.objectives.base import NetworkCall, Objective
from diffusion.core.objectives.weighting import LearnedWeighting


def preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) at ``sigma`` (any shape; the same shape back)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4.0


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(output: Tensor, y: Tensor, x: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """Per-image lambda(sigma) mean ||D(x; sigma) - y||^2 for the network ``output`` F at x = y + sigma n, as the
    squared error of F against (y - c_skip x) / c_out; ``(B,)``, sigma ``(B,)``."""
    if output.shape != y.shape:
        raise ValueError(f"the network output has shape {tuple(output.shape)}, expected {tuple(y.shape)}")
    c_skip, c_out, _, _ = (c.view(-1, *([1] * (y.ndim - 1))).to(y.dtype) for c in preconditioning(sigma, sigma_data))
    target = (y - c_skip * x) / c_out
    dtype = torch.promote_types(output.dtype, torch.float32)  # bf16 outputs: the loss in float32
    return ((output.to(dtype) - target.to(dtype)) ** 2).flatten(1).mean(1)


def karras_ramp(tau: Tensor, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """sigma(tau) = (sigma_min^(1/rho) + tau (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho: eq. 5 with tau = 1 -
    i / (N - 1), increasing from sigma_min at tau = 0 to sigma_max at tau = 1."""
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + tau * (hi - lo)) ** rho


class EDM(Objective):
    """EDM's preconditioned denoiser and loss.

    Args:
        p_mean, p_std: the training distribution ln sigma ~ N(p_mean, p_std^2).
        sigma_data: the standard deviation of the data the preconditioning assumes.
        sigma_min, sigma_max, rho: the levels the model is sampled at: sigma in [sigma_min, sigma_max], a grid
            ``uniform`` in its time being eq. 5's with exponent rho.
        learned_weighting: EDM2's learned uncertainty of the loss (:mod:`.weighting`), on c_noise.
    """

    def __init__(
        self,
        *,
        p_mean: float,
        p_std: float,
        sigma_data: float,
        sigma_min: float,
        sigma_max: float,
        rho: float,
        learned_weighting: bool,
    ) -> None:
        super().__init__()
        if p_mean is None or p_std is None:
            checks.fail("diffusion.p_mean", p_mean, "and diffusion.p_std must be given", "EDM2's are -0.4 and 1.0")
        checks.number("diffusion.p_mean", p_mean, -10, 10, "the mean of ln sigma in training; EDM2's is -0.4")
        checks.number(
            "diffusion.p_std", p_std, 0, 10, "the spread of ln sigma in training; EDM2's is 1.0", open_low=True
        )
        checks.number("diffusion.sigma_data", sigma_data, 0, 10, "EDM's is 0.5, for data in [-1, 1]", open_low=True)
        checks.number("diffusion.sigma_min", sigma_min, 0, 1e4, "EDM's is 0.002", open_low=True)
        checks.number("diffusion.sigma_max", sigma_max, sigma_min, 1e4, "above sigma_min; EDM's is 80", open_low=True)
        checks.number("diffusion.rho", rho, 0, 100, "EDM's is 7", open_low=True)
        checks.flag("diffusion.learned_weighting", learned_weighting)
        self.weighting = LearnedWeighting() if learned_weighting else None
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.levels = ContinuousLevels(lambda tau: karras_ramp(tau, sigma_min, sigma_max, rho))

    # ------------------------------------------------------------------ training
    def training_levels(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """sigma with ln sigma ~ N(p_mean, p_std^2), float32."""
        return (self.p_mean + self.p_std * torch.randn(n, device=device, generator=generator)).exp()

    def losses(self, network: NetworkCall, x0: Tensor, level: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """x = y + sigma n; F sees c_in x and c_noise."""
        sigma = level.to(torch.float64).view(-1, *([1] * (x0.ndim - 1)))
        x = x0 + sigma.to(x0.dtype) * noise
        _, _, c_in, c_noise = preconditioning(sigma, self.sigma_data)
        output = network(c_in.to(x0.dtype) * x, c_noise.flatten().float())
        terms = {"loss": edm_loss(output, x0, x, level.to(torch.float64), self.sigma_data)}
        return self.weighted(terms, c_noise.flatten().float())

    def sampling_level(self, level: float) -> Level:
        return Level.of_sigma(float(level))

    def quartile(self, level: Tensor) -> Tensor:
        """By the normal CDF of ln sigma: the quarters of the training distribution."""
        z = (level.log() - self.p_mean) / self.p_std
        return (0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) * 4).long().clamp(0, 3)

    # ------------------------------------------------------------------ sampling
    def network_input(self, x_t: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(c_in / a) x_t and c_noise = ln(sigma) / 4, with c_in / a = sqrt(1 + sigma^2) / sqrt(sigma^2 +
        sigma_data^2)."""
        scale = math.sqrt(1.0 + level.sigma**2) / math.sqrt(level.sigma**2 + self.sigma_data**2)
        c_noise = torch.full((x_t.shape[0],), math.log(level.sigma) / 4.0, device=x_t.device)
        return scale * x_t, c_noise

    def prediction(self, output: Tensor, x_t: Tensor, level: Level) -> Prediction:
        """x_0 = D = (c_skip / a) x_t + c_out F, with c_skip / a = sigma_data^2 sqrt(1 + sigma^2) / (sigma^2 +
        sigma_data^2)."""
        total = level.sigma**2 + self.sigma_data**2
        c_skip_a = self.sigma_data**2 * math.sqrt(1.0 + level.sigma**2) / total
        c_out = level.sigma * self.sigma_data / math.sqrt(total)
        return Prediction.of_x0(c_skip_a * x_t + c_out * output, x_t, level)
