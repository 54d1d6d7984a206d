"""The peers' networks, built as the benchmarks compare them (``pip install -r benchmarks/requirements.txt``)."""

from __future__ import annotations

import torch


def diffusers_ddpm(width: int, channels: int = 3) -> torch.nn.Module:
    """diffusers' UNet2DModel laid out like the DDPM CIFAR-10 network (google/ddpm-cifar10-32) at ``width``."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
    )


def lucidrains() -> torch.nn.Module:
    from denoising_diffusion_pytorch import Unet

    return Unet(dim=64, dim_mults=(1, 2, 2, 2))


def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out
