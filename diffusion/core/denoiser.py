"""The denoiser: what every sampler sees of a model, and a trained network wrapped as one (guidance, clipping).

A denoiser maps the state x_t = a x_0 + s eps at a :class:`~diffusion.core.levels.Level` to a :class:`Prediction`
of (x_0, eps): the common space of :mod:`diffusion.core.levels`, whatever the formulation the network was trained
under and whatever it predicts (NVlabs' EDM code has samplers see only D(x; sigma) in the same way). Samplers take a
:class:`Denoiser`, never a network, so the same code serves the analytic oracles of the tests, the callbacks and
sample.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from diffusion.core.levels import Level, NoiseLevels
from diffusion.errors import SettingError

if TYPE_CHECKING:
    from diffusion.core.objectives.base import Objective


@dataclass(frozen=True)
class Prediction:
    """What a denoiser says about x_t, in the form every sampler uses.

    x0, eps: ``(B, C, H, W)``, consistent: x_t = a x0 + s eps.
    var_frac: the learned-variance interpolation in [0, 1] of Nichol & Dhariwal 2021, eq. 15, ``(B, C, H, W)``,
        or ``None`` when the model does not learn its variance.
    """

    x0: Tensor
    eps: Tensor
    var_frac: Tensor | None = None

    @classmethod
    def of_x0(cls, x0: Tensor, x_t: Tensor, level: Level, var_frac: Tensor | None = None) -> Prediction:
        """x0 with the eps = (x_t - a x0) / s it implies at ``level`` (s > 0)."""
        return cls(x0, (x_t - level.a * x0) / level.s, var_frac)


class Denoiser(Protocol):
    """A model at sampling time.

    Attributes:
        levels: where it may be evaluated (the grids the samplers walk).
        rows_per_image: images through the network per image denoised (2 under classifier-free guidance), for
            counting network evaluations.
    """

    levels: NoiseLevels
    rows_per_image: int

    def __call__(self, x_t: Tensor, level: Level) -> Prediction:
        """x_t: ``(B, C, H, W)``, every image at ``level``."""
        ...


@dataclass(frozen=True)
class SamplingOptions:
    """How a trained model is sampled, beside the sampler itself: given to the sampling side (previews, the training
    FID, sample.py) and never stored in the model, so none of it is a training setting.

    Attributes:
        guidance: the classifier-free guidance scale (see :class:`NetworkDenoiser`); 1 is none.
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


class NetworkDenoiser:
    """A network trained under an objective, as a :class:`Denoiser`.

    The objective says what the network is given at a level and how its output reads as (x_0, eps); this class adds
    what every objective shares: classifier-free guidance and the limit on x_0.

    Args:
        network: ``network(x_in, noise_conditioning, labels) -> output``, the model's network with its speed
            switches (:meth:`diffusion.core.model.DiffusionModel.network_output`).
        objective: the formulation the network was trained under.
        labels: class labels, ``(B,)``, for a class-conditional network; ``None`` for an unconditional one.
        guidance: classifier-free guidance scale w (Ho & Salimans 2022, eq. 6 written as
            out = out_null + w (out_label - out_null)): 1 is the plain conditional model, 0 the unconditional one,
            larger values trade diversity for fidelity. The conditional and null passes run as one batch. Every
            objective reads x_0 and eps affinely from the output, so guiding the output guides them alike; output
            channels beyond the image's (a learned variance) come from the conditional pass, as in GLIDE (Nichol
            et al. 2022).
        null_label: the label the network was trained with for "no class" (needed when guidance != 1).
        clip_x0: clamp the predicted x_0 to the data range [-1, 1] and recompute eps from it (Ho et al. 2020 clip
            the predicted x_0 when sampling images); leave off for data that is not bounded.
        dynamic_threshold: a percentile p in (0, 1]: instead of clipping, :func:`dynamic_thresholding` of x_0 (Saharia
            et al. 2022), eps recomputed from it; ``None`` for none.
    """

    def __init__(
        self,
        network: Callable[[Tensor, Tensor, Tensor | None], Tensor],
        objective: Objective,
        *,
        labels: Tensor | None,
        guidance: float,
        null_label: int | None,
        clip_x0: bool,
        dynamic_threshold: float | None,
    ) -> None:
        check_dynamic_threshold(dynamic_threshold)
        if guidance != 1.0 and labels is None:
            raise ValueError("classifier-free guidance needs class labels: pass labels, or set guidance to 1")
        if guidance != 1.0 and null_label is None:
            raise ValueError("classifier-free guidance needs the null label of a model trained with label dropout")
        self.network, self.objective, self.labels = network, objective, labels
        self.guidance, self.null_label = guidance, null_label
        self.clip_x0, self.dynamic_threshold = clip_x0, dynamic_threshold
        self.guided = labels is not None and guidance != 1.0
        self.levels = objective.levels
        self.rows_per_image = 2 if self.guided else 1

    def output(self, x_in: Tensor, noise_conditioning: Tensor, channels: int) -> Tensor:
        """The network's output, guided when asked, in x_in's dtype (an autocast network may answer in bf16; the
        sampler's state keeps its own dtype). ``channels``: the image's channels, the ones guidance mixes."""
        if not self.guided:
            return self.network(x_in, noise_conditioning, self.labels).to(x_in.dtype)
        assert self.labels is not None and self.null_label is not None
        null = torch.full_like(self.labels, self.null_label)
        both = self.network(
            torch.cat([x_in, x_in]), torch.cat([noise_conditioning, noise_conditioning]), torch.cat([self.labels, null])
        )
        with_label, without = both.chunk(2)
        guided = without[:, :channels] + self.guidance * (with_label[:, :channels] - without[:, :channels])
        return torch.cat([guided, with_label[:, channels:]], dim=1).to(x_in.dtype)

    def limit(self, x0: Tensor) -> Tensor:
        if self.dynamic_threshold is not None:
            return dynamic_thresholding(x0, self.dynamic_threshold)
        return x0.clamp(-1.0, 1.0) if self.clip_x0 else x0

    def __call__(self, x_t: Tensor, level: Level) -> Prediction:
        x_in, noise_conditioning = self.objective.network_input(x_t, level)
        prediction = self.objective.prediction(self.output(x_in, noise_conditioning, x_t.shape[1]), x_t, level)
        if self.dynamic_threshold is None and not self.clip_x0:
            return prediction
        return Prediction.of_x0(self.limit(prediction.x0), x_t, level, prediction.var_frac)


def dynamic_thresholding(x0: Tensor, percentile: float) -> Tensor:
    """Saharia et al. 2022 (Imagen), §2.3: per image, s = max(1, the ``percentile`` quantile of |x0|); x0 is
    clamped to [-s, s] and divided by s. Images whose quantile lies within [-1, 1] are only clipped to [-1, 1];
    saturated ones are pulled inwards instead of being flattened at the bounds. ``(B, ...)`` in, same out."""
    s = torch.quantile(x0.detach().flatten(1).abs().float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
