"""The model's reverse step p(x_{t-1} | x_t), shared by ancestral sampling and the variational bound."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from diffusion.core.denoiser import Prediction
from diffusion.core.schedules import NoiseSchedule
from diffusion.errors import SettingError

Variance = Literal["beta", "beta_tilde", "learned"]


def p_mean_variance(
    schedule: NoiseSchedule, prediction: Prediction, x_t: Tensor, t: Tensor, variance: Variance
) -> tuple[Tensor, Tensor]:
    """Mean and log-variance of p(x_{t-1} | x_t) = N(mu-tilde(x_t, x0_pred), sigma_t^2 I).

    The mean is the posterior mean of Ho et al. 2020, eq. 7, evaluated at the predicted x_0 (their eq. 11 for
    eps-prediction). The variance is
      ``beta``:       sigma_t^2 = beta_t (Ho et al. 2020, §3.2), except beta-tilde_1 at t = 0, where beta_0 would make
                      the decoder L_0 needlessly loose (improved-diffusion's ``FIXED_LARGE``);
      ``beta_tilde``: sigma_t^2 = beta-tilde_t, the posterior variance (eq. 7), its log clipped at t = 0;
      ``learned``:    log sigma_t^2 = v log beta_t + (1 - v) log beta-tilde_t (Nichol & Dhariwal 2021, eq. 15).

    x_t: ``(B, C, H, W)``; t: ``(B,)`` rows of ``schedule``. Returns two ``(B, C, H, W)`` tensors.
    """
    mean, _, log_tilde = schedule.q_posterior_mean_variance(prediction.x0, x_t, t)
    if variance == "beta_tilde":
        return mean, log_tilde
    log_beta = schedule.at(schedule.log_betas, t, x_t).expand_as(x_t)
    if variance == "beta":
        first = (t == 0).view(-1, *([1] * (x_t.ndim - 1)))
        return mean, torch.where(first, log_tilde, log_beta)
    if variance == "learned":
        if prediction.var_frac is None:
            raise SettingError(
                "variance='learned' needs a model trained with diffusion.learned_variance=true; "
                "this one has a fixed variance, so use variance='beta' or 'beta_tilde'"
            )
        return mean, prediction.var_frac * log_beta + (1.0 - prediction.var_frac) * log_tilde
    raise SettingError(f"unknown reverse-process variance {variance!r}; choose beta, beta_tilde or learned")
