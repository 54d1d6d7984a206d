"""Conversions between 8-bit images and the model's range [-1, 1] (Ho et al. 2020, §3.3: data scaled linearly
from {0, ..., 255} to [-1, 1])."""

from __future__ import annotations

import torch
from torch import Tensor


def to_model_range(images: Tensor) -> Tensor:
    """uint8 in {0, ..., 255} -> float32 in [-1, 1], any shape."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] -> uint8, rounding to the nearest level and clamping what lies outside; any shape."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_nhwc(images: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, H, W, C)``: the layout of image files and of OpenAI's evaluation ``.npz``."""
    return images.permute(0, 2, 3, 1).contiguous()
