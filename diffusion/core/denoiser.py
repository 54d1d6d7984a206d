"""A trained network as a :data:`diffusion.core.targets.Denoiser`: target resolution, guidance and clipping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core import edm
from diffusion.core.schedules import NoiseSchedule
from diffusion.core.targets import Denoiser, Prediction, Target, eps_from_x0, network_input, to_x0_eps
from diffusion.errors import SettingError

# net(x_t, t, labels) -> output, (B, C or 2C, H, W); labels (B,) int64 or None
Network = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class SamplingOptions:
    """How a trained model is sampled, beside the sampler itself: given to the sampling side (previews, the training
    FID, sample.py) and never stored in the model, so none of it is a training setting.

    Attributes:
        guidance: the classifier-free guidance scale (see :func:`network_denoiser`); 1 is none.
        clip_x0: clamp the predicted x_0 to [-1, 1].
        dynamic_threshold: a percentile in (0, 1]: Saharia et al.'s dynamic thresholding instead of clipping.
    """

    guidance: float = 1.0
    clip_x0: bool = True
    dynamic_threshold: float | None = None


def check_dynamic_threshold(percentile: float | None) -> None:
    """The percentile of dynamic thresholding, in (0, 1], or ``None`` for none (the one check of this setting)."""
    if percentile is None:
        return
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0.0 < percentile <= 1.0:
        raise SettingError(f"dynamic_threshold is a percentile in (0, 1], e.g. Imagen's 0.995; got {percentile!r}")


def network_denoiser(
    net: Network,
    schedule: NoiseSchedule,
    *,
    target: Target,
    learned_variance: bool,
    clip_x0: bool,
    dynamic_threshold: float | None = None,
    labels: Tensor | None = None,
    guidance: float = 1.0,
    null_label: int | None = None,
) -> Denoiser:
    """Wraps ``net`` so that it returns a :class:`Prediction`.

    Args:
        target: what the network predicts; resolved into (x_0, eps) by :func:`diffusion.core.targets.to_x0_eps`.
        learned_variance: the network's second C channels are the variance interpolation v in [-1, 1].
        clip_x0: clamp the predicted x_0 to the data range [-1, 1] and recompute eps from it (Ho et al. 2020 clip
            the predicted x_0 when sampling images); leave off for data that is not bounded.
        dynamic_threshold: a percentile p in (0, 1]: instead of clipping, :func:`dynamic_thresholding` of x_0 (Saharia
            et al. 2022), eps recomputed from it; ``None`` for none.
        labels: class labels, ``(B,)``, for a class-conditional network; ``None`` for an unconditional one.
        guidance: classifier-free guidance scale w (Ho & Salimans 2022, eq. 6 written as
            out = out_null + w (out_label - out_null)): 1 is the plain conditional model, 0 the unconditional one,
            larger values trade diversity for fidelity. The conditional and null passes run as one batch. Since
            every target is affine in the output, guiding the output guides x_0 and eps alike.
        null_label: the label the network was trained with for "no class" (needed when guidance != 1).

    The function returned has ``rows_per_image``: images through the network per image denoised (2 with guidance),
    and for a ``target=edm`` network ``at_sigma(x, sigma)``: EDM's D(x; sigma) at any continuous sigma, for samplers
    that work in sigma (:func:`diffusion.core.samplers.heun.heun_sample`).
    """
    check_dynamic_threshold(dynamic_threshold)
    if guidance != 1.0 and labels is None:
        raise ValueError("classifier-free guidance needs class labels: pass labels, or set guidance to 1")
    if guidance != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs the null label of a model trained with label dropout")

    def evaluate(x_in: Tensor, t_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """The network's (guided) output and, with a learned variance, the interpolation v mapped to [0, 1]."""
        if labels is not None and guidance != 1.0:
            null = torch.full_like(labels, null_label)
            both = net(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([labels, null]))
            with_label, without = both.chunk(2)
            output = without + guidance * (with_label - without)
            if learned_variance:  # the variance comes from the conditional pass, as in GLIDE (Nichol et al. 2022)
                output = torch.cat([output[:, : x_in.shape[1]], with_label[:, x_in.shape[1] :]], dim=1)
        else:
            output = net(x_in, t_in, labels)
        var_frac = None
        if learned_variance:
            output, v = output.chunk(2, dim=1)
            var_frac = (v.to(x_in.dtype) + 1.0) / 2.0
        return output.to(x_in.dtype), var_frac  # an autocast network may answer in bf16; the state keeps its dtype

    def limit(x0: Tensor) -> Tensor:
        if dynamic_threshold is not None:
            return dynamic_thresholding(x0, dynamic_threshold)
        return x0.clamp(-1.0, 1.0) if clip_x0 else x0

    def denoise(x_t: Tensor, t: Tensor) -> Prediction:
        output, var_frac = evaluate(*network_input(schedule, target, x_t, t))
        x0, eps = to_x0_eps(schedule, target, output, x_t, t)
        if dynamic_threshold is not None or clip_x0:
            x0 = limit(x0)
            eps = eps_from_x0(schedule, x_t, t, x0)
        return Prediction(x0=x0, eps=eps, var_frac=var_frac)

    def at_sigma(x: Tensor, sigma: float) -> Tensor:
        """EDM's D(x; sigma) at any noise level, for x = y + sigma n: only a ``target=edm`` network has one."""
        sigmas = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
        _, _, c_in, c_noise = edm.preconditioning(sigmas)
        output, _ = evaluate(x * c_in.to(x.dtype).view(-1, *([1] * (x.ndim - 1))), c_noise.float())
        return limit(edm.denoised(output, x, sigmas.view(-1, *([1] * (x.ndim - 1)))))

    denoise.rows_per_image = 2 if labels is not None and guidance != 1.0 else 1  # type: ignore[attr-defined]
    if target == "edm":
        denoise.at_sigma = at_sigma  # type: ignore[attr-defined]
    return denoise


def dynamic_thresholding(x0: Tensor, percentile: float) -> Tensor:
    """Saharia et al. 2022 (Imagen), §2.3: per image, s = max(1, the ``percentile`` quantile of |x0|); x0 is
    clamped to [-s, s] and divided by s. Images whose quantile lies within [-1, 1] are only clipped to [-1, 1];
    saturated ones are pulled inwards instead of being flattened at the bounds. ``(B, ...)`` in, same out."""
    s = torch.quantile(x0.detach().flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
