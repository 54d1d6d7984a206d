"""The interface of a training objective: one formulation of diffusion, whole.

An objective owns everything that differs between formulations (NVlabs' EDM code splits the same into a
preconditioning wrapper and a loss class; here both halves are one object, since they share their settings):

- training: how noise levels are drawn (:meth:`Objective.training_levels`), how an image is noised, what the network
  is given and how its output is scored (:meth:`Objective.losses`), and how the levels group into quarters for
  TensorBoard (:meth:`Objective.quartile`);
- sampling: where the model may be evaluated (:attr:`Objective.levels`), what the network is given at a level of
  the common space (:meth:`Objective.network_input`) and how its output reads as (x_0, eps)
  (:meth:`Objective.prediction`), which :class:`diffusion.core.denoiser.NetworkDenoiser` wraps for the samplers;
- what it supports, declared, so that settings checks and sample.py ask it rather than its name:
  :attr:`Objective.learned_variance`, :attr:`Objective.has_variational_bound`;
- optionally, EDM2's learned weighting of the loss per noise level (:attr:`Objective.weighting`, applied by
  :meth:`Objective.weighted`), a head with parameters of its own that train with the network.

The network is any module called as ``network(x_in, noise_conditioning, labels)`` (:mod:`diffusion.core.networks`);
the objective gives it ``noise_conditioning`` as a float32 ``(B,)`` tensor of its own scale. An objective is an
``nn.Module`` so that tables it keeps as buffers (a discrete schedule's) move with the model; they are not saved. A
learned weighting's head is saved with the network (``objective.weighting.*`` in the model's ``state_dict``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from diffusion.core.denoiser import Denoiser, Prediction
from diffusion.core.levels import Level, NoiseLevels
from diffusion.core.objectives.weighting import LearnedWeighting, uncertainty_weighted
from diffusion.core.reverse import Variance

# network(x_in, noise_conditioning) -> output, the class labels bound: what an objective calls in training
NetworkCall = Callable[[Tensor, Tensor], Tensor]


class Objective(nn.Module, ABC):
    """A formulation of diffusion: training noise levels, noising, network inputs, loss, and the denoiser's reading
    of the output. Subclasses are built by Hydra from ``configs/diffusion/*.yaml`` and check their own settings."""

    levels: NoiseLevels
    learned_variance: bool = False  # the network also outputs a variance (doubling its output channels)
    has_variational_bound: bool = False  # the discrete variational bound on log p(x_0) (sample.py eval=nll)
    weighting: LearnedWeighting | None  # EDM2's learned loss weighting, when the objective has one

    def __init__(self) -> None:
        super().__init__()
        # an instance attribute, not a class default: nn.Module keeps a submodule in _modules, which a class
        # attribute of the same name would shadow
        self.weighting = None

    def weighted(self, terms: dict[str, Tensor], noise_conditioning: Tensor) -> dict[str, Tensor]:
        """``terms`` with the trained-on ``loss`` L replaced by L / e^u + u under :attr:`weighting`, u its head's value
        at the network's ``noise_conditioning`` ``(B,)``; L itself is kept as ``unweighted`` (what TensorBoard's
        quartiles show) and u as ``u``. Without a head, ``terms`` unchanged."""
        if self.weighting is None:
            return terms
        u = self.weighting(noise_conditioning)
        loss = terms["loss"]
        return {**terms, "loss": uncertainty_weighted(loss, u), "unweighted": loss.detach(), "u": u.detach()}

    def output_channels(self, channels: int) -> int:
        """The network's output channels for images of ``channels`` channels."""
        return 2 * channels if self.learned_variance else channels

    # ------------------------------------------------------------------ training, one level per image
    @abstractmethod
    def training_levels(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """The noise levels of ``n`` training images, ``(n,)``, in the objective's own parameterisation."""

    @abstractmethod
    def losses(self, network: NetworkCall, x0: Tensor, level: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """Per-image losses of ``network`` on the images ``x0`` noised to ``level`` with ``noise`` (both
        ``(B, C, H, W)``): ``loss``, the one trained on, ``(B,)``, and any parts worth logging (``vb``)."""

    @abstractmethod
    def sampling_level(self, level: float) -> Level:
        """The :class:`~diffusion.core.levels.Level` of one training level: where the samplers evaluate the model at
        the noise it was trained at."""

    @abstractmethod
    def quartile(self, level: Tensor) -> Tensor:
        """Which quarter of the training distribution of levels each of ``level`` lies in, 0 nearest the data,
        ``(B,)`` int64: ``train/loss_q0`` .. ``q3`` in TensorBoard."""

    # ------------------------------------------------------------------ sampling, one level for the batch
    @abstractmethod
    def network_input(self, x_t: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """What the network is given for the state x_t = a x_0 + s eps at ``level``: its input ``(B, C, H, W)`` and
        its noise conditioning, float32 ``(B,)``."""

    @abstractmethod
    def prediction(self, output: Tensor, x_t: Tensor, level: Level) -> Prediction:
        """The network's ``output`` at (x_t, level) read as (x_0, eps) (and a learned variance)."""

    # ------------------------------------------------------------------ the variational bound, where there is one
    def vlb_terms_bpd(
        self, denoise: Denoiser, x0: Tensor, variance: Variance, generator: torch.Generator | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """With :attr:`has_variational_bound`: yields the terms of the bound on -log p(x0) in bits per dimension,
        ``(index, (B,))``, one network evaluation each; :meth:`prior_bpd` completes the sum."""
        raise NotImplementedError(f"{type(self).__name__} has no variational bound (has_variational_bound is false)")

    def prior_bpd(self, x0: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no variational bound (has_variational_bound is false)")
