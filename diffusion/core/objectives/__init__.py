"""Training objectives, one module per formulation (:mod:`.base` has the interface): the discrete DDPM family
(:class:`DDPM`) and EDM (:class:`EDM`). ``configs/diffusion/*.yaml`` names one as its ``_target_``."""

from diffusion.core.objectives.base import NetworkCall, Objective
from diffusion.core.objectives.ddpm import DDPM
from diffusion.core.objectives.edm import EDM

__all__ = ["DDPM", "EDM", "NetworkCall", "Objective"]
