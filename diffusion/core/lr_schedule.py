"""The learning-rate schedule: a linear warm-up, then a constant or a cosine rate (Loshchilov & Hutter 2017, SGDR,
eq. 5, without restarts), as a factor of the base rate at each optimizer step."""

from __future__ import annotations

import math
from typing import Literal, get_args

from diffusion.errors import SettingError

LRShape = Literal["constant", "cosine"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, shape: LRShape, min_lr_ratio: float) -> float:
    """The factor of the base learning rate for optimizer step ``step`` (0-based).

    Warm-up: (step + 1) / warmup_steps up to 1, so the first step already moves the weights. Then constant 1, or
    cosine from 1 at the end of the warm-up down to ``min_lr_ratio`` at ``total_steps``,
        min_lr_ratio + (1 - min_lr_ratio) (1 + cos(pi p)) / 2,
    with the progress p = (step - warmup_steps) / (total_steps - warmup_steps) clamped to [0, 1], times the ramp.
    """
    if shape not in get_args(LRShape):
        raise SettingError(f"optimizer.lr_schedule must be constant or cosine, got {shape!r}")
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if shape == "constant":
        return ramp
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return ramp * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
