"""U-ViT (Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion Models"): a plain vision transformer
that treats everything as a token, with long skip connections between shallow and deep blocks.

- Tokens: the image's p x p patches (a linear embedding, as a convolution of stride p), the noise level (its
  sinusoidal embedding, the paper's CIFAR-10 setting without an MLP) and, for a conditional network, the class (a
  learned embedding, with one extra "null" label for classifier-free guidance), plus a learned position embedding.
- Blocks: pre-norm transformer blocks (LayerNorm, multi-head self-attention by ``scaled_dot_product_attention``,
  LayerNorm, an MLP with GELU at 4 times the width), (n - 1) / 2 "in" blocks, one middle block and (n - 1) / 2 "out"
  blocks; each out block first joins the output of its mirror in block: concatenation and a linear layer (Sec. 3.1).
- Output: the patch tokens' final LayerNorm and a linear map to p x p x C pixels, folded back into the image, then a
  3x3 convolution (Sec. 3.1, "an extra convolutional block", which the paper finds improves sample quality).

Initialization as the reference code: linear weights truncated normal with std 0.02, biases zero, the position
embedding truncated normal with std 0.02. The attention's q, k, v projections have no bias (its ``qkv_bias=False``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion import checks
from diffusion.core.networks import check_inputs
from diffusion.core.networks.unet import timestep_embedding
from diffusion.errors import SettingError


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``(B, L, D)``, fused (flash attention where the device has it)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, D/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, D/heads)
        return self.proj(h.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    """x (+ the long skip, by concatenation and a linear layer) -> x + attn(LN(x)) -> x + MLP(LN(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, skip: bool) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * width, width) if skip else None
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT, a :class:`~diffusion.core.networks.Network`.

    Args:
        image_size, in_channels, out_channels, num_classes: as for every network.
        patch_size: the side of a patch token (U-ViT-S/2: 2); must divide ``image_size``.
        width: the tokens' width (U-ViT-S: 512); a multiple of ``num_heads``.
        num_blocks: transformer blocks, odd: (n - 1) / 2 in, one middle, (n - 1) / 2 out (U-ViT-S: 13).
        num_heads: attention heads (U-ViT-S: 8).
        mlp_ratio: the MLP's hidden width over ``width`` (4).

    :attr:`checkpointing` (``model.checkpointing``): recompute each block's activations in the backward pass.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        out_channels: int,
        num_classes: int | None,
        patch_size: int,
        width: int,
        num_blocks: int,
        num_heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        checks.whole_number("model.patch_size", patch_size, 1, "e.g. model.patch_size=2")
        checks.whole_number("model.width", width, 1, "e.g. model.width=512")
        checks.whole_number("model.num_heads", num_heads, 1, "e.g. model.num_heads=8")
        checks.whole_number("model.num_blocks", num_blocks, 1, "an odd number, e.g. model.num_blocks=13")
        checks.number("model.mlp_ratio", mlp_ratio, 0, 64, "the MLP's width over the tokens', e.g. 4", open_low=True)
        checks.whole_number("model.num_classes", num_classes, 1, "null for an unconditional model", allowed=(None,))
        if num_blocks % 2 == 0:
            checks.fail(
                "model.num_blocks", num_blocks, "is even: U-ViT has as many in as out blocks around one middle block",
                f"use an odd number, e.g. {num_blocks + 1}",
            )  # fmt: skip
        if width % 2:
            checks.fail(
                "model.width", width, "is odd: the noise level's sinusoidal token has a sine and a cosine half",
                f"use an even width, e.g. model.width={width + 1}",
            )  # fmt: skip
        step = math.lcm(2, num_heads)  # an even multiple of the heads
        if width % num_heads:
            checks.fail(
                "model.width", width, f"is not a multiple of model.num_heads={num_heads}",
                f"e.g. model.width={max(step, width // step * step)}",
            )  # fmt: skip
        if image_size % patch_size:
            divisors = [p for p in range(1, image_size + 1) if image_size % p == 0 and p <= 8]
            raise SettingError(
                f"model.patch_size={patch_size} does not divide dataset.image_size={image_size} into whole patches; "
                f"use one of {divisors}, or an image size that is a multiple of {patch_size}"
            )
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes, self.patch_size, self.width = num_classes, patch_size, width
        self.checkpointing = False
        grid = image_size // patch_size
        extras = 1 + (1 if num_classes else 0)  # the noise level's token, and the label's
        self.extras = extras

        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.label_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.pos_embed = nn.Parameter(torch.zeros(1, extras + grid * grid, width))
        self.in_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, skip=False) for _ in range(num_blocks // 2))
        self.mid_block = Block(width, num_heads, mlp_ratio, skip=False)
        self.out_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, skip=True) for _ in range(num_blocks // 2))
        self.norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch_size * patch_size * out_channels)
        self.final_layer = nn.Conv2d(out_channels, out_channels, 3, padding=1)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, noise_conditioning: Tensor, labels: Tensor | None = None) -> Tensor:
        """x: ``(B, C, H, W)``; noise_conditioning: ``(B,)``, embedded sinusoidally as the UNet's; labels: ``(B,)``
        int64 for a conditional model. Returns ``(B, out_channels, H, W)``."""
        check_inputs("U-ViT", x, noise_conditioning, labels, (self.in_channels, self.image_size, self.image_size),
                     conditional=self.label_embed is not None)  # fmt: skip
        B, p = x.shape[0], self.patch_size
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, L, D), L = (H / p) (W / p)
        extra = [timestep_embedding(noise_conditioning, self.width).to(tokens.dtype)[:, None]]  # (B, 1, D)
        if self.label_embed is not None:
            extra.append(self.label_embed(labels)[:, None])
        h = torch.cat([*extra, tokens], dim=1) + self.pos_embed  # (B, extras + L, D)
        skips = []
        for block in self.in_blocks:
            h = self.run(block, h)
            skips.append(h)
        h = self.run(self.mid_block, h)
        for block in self.out_blocks:
            h = self.run(block, h, skips.pop())
        h = self.decoder_pred(self.norm(h))[:, self.extras :]  # (B, L, p p C)
        grid = self.image_size // p
        # (B, L, p p C) -> (B, C, H, W): token (i, j) holds the pixels (i p + a, j p + b) as (a, b, c)
        h = h.reshape(B, grid, grid, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return self.final_layer(h.reshape(B, self.out_channels, grid * p, grid * p))

    def run(self, block: Block, h: Tensor, skip: Tensor | None = None) -> Tensor:
        """A block, recomputed in the backward pass under :attr:`checkpointing`."""
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, skip, use_reentrant=False)
        return block(h, skip)
