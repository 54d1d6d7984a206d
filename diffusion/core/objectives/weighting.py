"""EDM2's learned uncertainty of the loss (Karras et al. 2024, Sec. 5 and Appendix B.2; Kendall & Gal 2018): a
small head gives u(sigma), a log-variance of the loss at each noise level, and the loss of an image at noise level
sigma becomes

    L(sigma) / e^u(sigma) + u(sigma),

whose minimum over u is at u = ln L (d/du = 1 - L e^-u): in expectation the head learns ln E[L(sigma)], and the
network's loss at every sigma is divided by its own current size, so no level dominates the gradient as its loss
falls. The head is EDM2's: the noise level's magnitude-preserving Fourier features (128) and a magnitude-preserving
linear layer to one value, on the objective's noise conditioning; it is used in training only. Any objective can own
one (:meth:`~diffusion.core.objectives.base.Objective.weighted`); ``diffusion.learned_weighting=true`` gives EDM and
flow matching theirs.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffusion.core.networks.edm2 import MPConv, MPFourier

CHANNELS = 128  # EDM2's logvar_channels


def uncertainty_weighted(loss: Tensor, u: Tensor) -> Tensor:
    """L / e^u + u, per image ``(B,)``."""
    return loss / u.exp() + u


class LearnedWeighting(nn.Module):
    """u(c) = linear(fourier(c)) for the objective's noise conditioning c, ``(B,) -> (B,)`` (float32). The Fourier
    features span the bandwidths of :class:`~diffusion.core.networks.edm2.MPFourier`, since objectives condition on
    values of order 1 (EDM's ln(sigma) / 4) to 1000 (flow matching's 1000 t)."""

    def __init__(self) -> None:
        super().__init__()
        self.fourier = MPFourier(CHANNELS, (1e-3, 1.0))
        self.linear = MPConv(CHANNELS, 1, ())

    def forward(self, noise_conditioning: Tensor) -> Tensor:
        return self.linear(self.fourier(noise_conditioning.float())).flatten()
