"""A network trained under an objective: the model a checkpoint holds and every sampler draws from.

It knows nothing of training (the LightningModule of :mod:`diffusion.training.module` wraps it to train), so
sample.py draws images with Lightning not even installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from diffusion.core.denoiser import Denoiser, NetworkDenoiser, SamplingOptions
from diffusion.core.objectives import Objective
from diffusion.errors import RunError, SettingError

DEFAULT_SAMPLING = SamplingOptions()  # clip x0, no guidance, no thresholding


class DiffusionModel(nn.Module):
    """``network`` trained under ``objective`` on images of ``image_shape`` = (C, H, W).

    Args:
        compile: ``torch.compile`` the network on first use (for training and sampling alike).
        channels_last: give the network channels-last inputs (and keep its weights so).
        checkpointing: activation checkpointing, for a network that declares it (:class:`~diffusion.core.networks.
            Network`'s ``checkpointing``).

    Its ``state_dict`` holds the network's weights (``network.*``); the objective's tables follow from its settings.
    """

    def __init__(
        self,
        network: nn.Module,
        objective: Objective,
        image_shape: tuple[int, int, int],
        *,
        compile: bool,
        channels_last: bool,
        checkpointing: bool,
    ) -> None:
        super().__init__()
        if not hasattr(network, "num_classes") or not (network.num_classes is None or type(network.num_classes) is int):
            raise SettingError(
                f"model._target_: the network {type(network).__qualname__} must say which class labels it takes, as an "
                f"attribute num_classes (an int, or None for an unconditional network); README, 'Adding a network'"
            )
        if checkpointing:
            if not hasattr(network, "checkpointing"):
                raise SettingError(
                    f"model.checkpointing=true: the network {type(network).__qualname__} cannot recompute its "
                    f"activations (it has no checkpointing switch); leave model.checkpointing=false"
                )
            network.checkpointing = True
        self.network, self.objective = network, objective
        self.image_shape = tuple(image_shape)
        self.compile_network, self.channels_last = compile, channels_last
        if channels_last:
            self.network.to(memory_format=torch.channels_last)

    @property
    def num_classes(self) -> int | None:
        return self.network.num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        return next(iter(self.network.parameters()), torch.empty(0)).device

    def network_output(self, x_in: Tensor, noise_conditioning: Tensor, labels: Tensor | None) -> Tensor:
        """The network, compiled on first use when ``compile`` is on, with channels-last inputs when asked."""
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        if not self.compile_network:
            return self.network(x_in, noise_conditioning, labels)
        # Kept out of the registered children (no second copy of the weights in state_dict) and out of copies
        # (__getstate__): a compiled function calls the module it was made from, so the EMA's deep copy, whose
        # weights differ, must compile its own.
        compiled = self.__dict__.get("_compiled_network")
        if compiled is None:
            compiled = self.__dict__["_compiled_network"] = torch.compile(self.network)
        return compiled(x_in, noise_conditioning, labels)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_network", None)
        return state

    def denoiser(self, options: SamplingOptions = DEFAULT_SAMPLING, labels: Tensor | None = None) -> Denoiser:
        """The model as a :class:`~diffusion.core.denoiser.Denoiser` for the samplers, drawn as ``options`` say
        (classifier-free guidance when ``options.guidance`` != 1)."""
        if labels is None and self.conditional:
            raise RunError("this model is class-conditional: give the class labels to sample")
        if labels is not None and not self.conditional:
            raise RunError("this model was trained without class labels, so it cannot sample given labels")
        return NetworkDenoiser(
            self.network_output,
            self.objective,
            labels=labels,
            guidance=options.guidance,
            null_label=self.num_classes,
            clip_x0=options.clip_x0,
            dynamic_threshold=options.dynamic_threshold,
        )

    def denoiser_for(self, options: SamplingOptions = DEFAULT_SAMPLING) -> Callable[[Tensor | None], Denoiser]:
        """The denoiser for a batch's labels, for :func:`diffusion.core.drawing.draw`."""
        return lambda labels: self.denoiser(options, labels)

    @contextlib.contextmanager
    def sampling(self, inference: bool = True) -> Iterator[None]:
        """Evaluation mode (no dropout) under ``torch.inference_mode``, restored afterwards; ``inference=False``
        leaves autograd on, for what differentiates the denoiser (the likelihood's divergence)."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(inference):
                yield
        finally:
            self.train(was_training)
