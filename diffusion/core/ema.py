"""The decay of an exponential moving average of the weights, with a warm-up measured in images.

The average is updated after every optimizer step as avg <- beta avg + (1 - beta) w. Its length is given as a
half-life in training images, with a warm-up that caps the half-life at a fraction of the images seen so far
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Appendix F.1 and Table 7:
"EMA half-life" in Mimg, with an "EMA warm-up ratio" of 0.05; their training_loop.py computes exactly this):

    h_n   = min(half_life_images, rampup_ratio * n)       n: images seen before this step
    beta  = 0.5 ** (N / h_n)                               N: images in this step (the global batch)

So after a step of N images the weight of what the average held halves every h_n images, whatever the batch size
or the number of devices: the same half-life at batch 128 on one GPU and at batch 32 on four. At the first step
(n = 0) beta = 0 and the average starts at the trained weights; during the warm-up the average spans the last
``rampup_ratio`` of training, so the random initial weights are forgotten within the first steps instead of
lingering for thousands (a fixed beta leaves beta^n of them in the average after n steps). Once
rampup_ratio * n > half_life_images, beta is the fixed decay 0.5 ** (N / half_life_images): a published per-step
decay d at batch N is the half-life N ln(1/2) / ln(d) (0.9999 at batch 128: 887,184 images).
"""

from __future__ import annotations

import math

from diffusion.errors import SettingError


def ema_decay(images_seen: float, batch_images: float, half_life_images: float, rampup_ratio: float | None) -> float:
    """beta for a step of ``batch_images`` images after ``images_seen`` images (the formula above); 0 copies."""
    if half_life_images <= 0 or batch_images <= 0:
        raise SettingError(
            f"the EMA half-life and the images per step must be positive, got {half_life_images} and {batch_images}"
        )
    half_life = half_life_images if rampup_ratio is None else min(half_life_images, rampup_ratio * images_seen)
    return 0.5 ** (batch_images / half_life) if half_life > 0 else 0.0


def half_life_of_decay(decay: float, batch_images: float) -> float:
    """The half-life in images of a fixed per-step decay ``decay`` at ``batch_images`` images per step."""
    if not 0.0 < decay < 1.0:
        raise SettingError(f"an EMA decay must lie strictly between 0 and 1, got {decay}")
    return batch_images * math.log(0.5) / math.log(decay)
