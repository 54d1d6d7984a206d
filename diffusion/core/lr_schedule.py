"""The learning-rate schedule: a linear warm-up, then a constant rate, a cosine (Loshchilov & Hutter 2017, SGDR,
eq. 5, without restarts) or EDM2's inverse square root (Karras et al. 2024, eq. 16), as a factor of the base rate at
each optimizer step."""

from __future__ import annotations

import math
from typing import Literal, get_args

from diffusion.errors import SettingError

LRShape = Literal["constant", "cosine", "inv_sqrt"]


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, shape: LRShape, min_lr_ratio: float, t_ref: int
) -> float:
    """The factor of the base learning rate for optimizer step ``step`` (0-based).

    Warm-up: (step + 1) / warmup_steps up to 1, so the first step already moves the weights. Then
    - ``constant``: 1;
    - ``cosine``: from 1 at the end of the warm-up down to ``min_lr_ratio`` at ``total_steps``,
        min_lr_ratio + (1 - min_lr_ratio) (1 + cos(pi p)) / 2,
      with the progress p = (step - warmup_steps) / (total_steps - warmup_steps) clamped to [0, 1];
    - ``inv_sqrt``: EDM2's alpha_ref / sqrt(max(t / t_ref, 1)) with t = step and t_ref = ``t_ref`` in optimizer
      steps (the paper counts both in batches: ``ref_batches``), so constant until t_ref and then decaying as
      1 / sqrt(t), with no end to reach (the run's length does not enter);
    times the ramp. ``t_ref`` is read by ``inv_sqrt`` only, ``min_lr_ratio`` by ``cosine`` only.
    """
    if shape not in get_args(LRShape):
        raise SettingError(f"optimizer.lr_schedule must be constant, cosine or inv_sqrt, got {shape!r}")
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if shape == "constant":
        return ramp
    if shape == "inv_sqrt":
        return ramp / math.sqrt(max(step / t_ref, 1.0))
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return ramp * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
