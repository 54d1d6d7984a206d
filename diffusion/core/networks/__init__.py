"""The networks an objective trains: any ``nn.Module`` of the :class:`Network` interface, one module each
(:mod:`.unet`: the DDPM / improved-DDPM UNet; :mod:`.edm2`: EDM2's magnitude-preserving UNet; :mod:`.uvit`: U-ViT).
``configs/model/*.yaml`` names one as its ``_target_``.

Hydra builds the network from the ``model`` settings, less the speed switches that the model applies itself
(``compile``, ``channels_last``, ``checkpointing``), and with three arguments that follow from the data and the
objective: ``image_size``, ``in_channels`` and ``out_channels``. So a network of one's own needs no change to this
project: ``python train.py model=custom model._target_=mypackage.MyNet +model.width=64`` (README, "Adding a
network").
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class Network(Protocol):
    """A denoising network.

    Attributes:
        num_classes: the class labels it is conditioned on, ``None`` for an unconditional network. The label
            ``num_classes`` means "no label" (classifier-free guidance trains it through label dropout).
        checkpointing: optional; a network that can recompute its activations in the backward pass (activation
            checkpointing, ``model.checkpointing=true``) has this attribute and switches on when it is set.
    """

    num_classes: int | None

    def __call__(self, x: Tensor, noise_conditioning: Tensor, labels: Tensor | None) -> Tensor:
        """x: ``(B, in_channels, H, W)``, the input the objective prepares; noise_conditioning: ``(B,)`` float32, the
        objective's conditioning value (the timestep for the discrete objectives, ln(sigma) / 4 for EDM); labels:
        ``(B,)`` int64 or ``None``. Returns ``(B, out_channels, H, W)``."""
        ...


def check_inputs(
    name: str,
    x: Tensor,
    noise_conditioning: Tensor,
    labels: Tensor | None,
    shape: tuple[int, int, int],
    *,
    conditional: bool,
) -> None:
    """The checks of a network's call: images of ``shape`` = (C, H, W), one noise conditioning per image, and labels
    exactly when the network is ``conditional``; a ``ValueError`` that says which, named after the network."""
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"the {name} expects images of shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if noise_conditioning.shape != (x.shape[0],):
        raise ValueError(
            f"expected one noise level per image, shape ({x.shape[0]},), got {tuple(noise_conditioning.shape)}"
        )
    if (labels is None) == conditional:
        raise ValueError(
            f"this {name} is class-conditional and needs labels"
            if labels is None
            else f"this {name} is unconditional (model.num_classes is not set) and takes no labels"
        )
