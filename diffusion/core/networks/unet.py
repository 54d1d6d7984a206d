"""The UNet of DDPM (Ho et al. 2020, Appendix B) with the options of improved DDPM (Nichol & Dhariwal 2021).

A PixelCNN++-style encoder-decoder: wide-ResNet blocks with GroupNorm, SiLU and dropout, a sinusoidal timestep
embedding fed through an MLP into every block, self-attention at chosen resolutions, skip connections from every
encoder block to the decoder. Options: the timestep enters a block by addition (DDPM) or as a scale and shift of
its second GroupNorm (improved DDPM's "AdaGN"); several attention heads; twice the output channels when the
variance is learned; class labels, with one extra "null" label for classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion import checks
from diffusion.core.networks import check_inputs
from diffusion.errors import SettingError


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``(B,) -> (B, dim)``: [sin(t w_i), cos(t w_i)] with
    w_i = 10000^(-i / (dim/2 - 1)), as in DDPM's ``get_timestep_embedding`` (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in DDPM, or the largest divisor of ``channels`` below 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper CPU mask.

    PyTorch's CPU dropout draws one random number per element (``bernoulli_``); in a small UNet that costs as much as
    several convolutions. Here each 64-bit random word yields four 16-bit uniform integers u, so the keep
    probability is 1 - p rounded to a multiple of 1/65536 (|error| < 1e-5). The mask (0 where dropped, 1/(1 - p)
    where kept) is made from u with float operations that are exact on these integers, and laid out like ``x``, so
    that the product with ``x`` and its gradient are one vectorized pass each (a boolean mask, of another dtype than
    ``x``, makes the product run unvectorized and about seven times slower). Elsewhere it is ``nn.Dropout``: CUDA's
    dropout is one fused kernel, under ``torch.compile`` the compiler fuses the standard one (the in-place
    ``random_`` here would break the graph), and in other dtypes than float32 a mask in that dtype would round
    1/(1 - p).
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            not self.training
            or self.p == 0
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            return super().forward(x)
        dropped = round(self.p * 65536)  # u in [-32768, 32767] is kept when u >= cut
        cut = dropped - 32768
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        uniform = words.view(torch.int16)[: x.numel()]
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            batch, channels, height, width = x.shape
            uniform = uniform.view(batch, height, width, channels).permute(0, 3, 1, 2)
        else:
            uniform = uniform.view(x.shape)
        kept = uniform.float().clamp_(cut - 1, cut).sub_(cut - 1)  # exactly 0.0 or 1.0
        return x * kept.mul_(65536 / (65536 - dropped))


def zero_init(module: nn.Module) -> nn.Module:
    """Zeroes a layer's parameters, so that a residual branch starts as the identity (DDPM's ``init_scale=0``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv3x3, + timestep embedding, GroupNorm, SiLU, dropout, conv3x3, plus a 1x1 skip when the
    channel count changes. With ``scale_shift`` the embedding gives (scale, shift) and the second norm becomes
    GN(h) (1 + scale) + shift (Nichol & Dhariwal 2021, §3; "AdaGN" in Dhariwal & Nichol 2021)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, scale_shift: bool) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm2 = group_norm(out_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # The two additions are in place, on convolution outputs that nothing else holds (a convolution's backward
        # needs its input, not its output): one fresh activation-sized buffer fewer each.
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = F.silu(self.norm2(h.add_(e)))
        return self.conv2(self.dropout(h)).add_(self.skip(x))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    The pixels are handled as a sequence of tokens ``(B, H*W, C)``: a view, without a copy, of a channels-last
    feature map, and the layout in which ``scaled_dot_product_attention`` picks its fused kernels (flash attention
    on CPU and GPU). The projections are linear layers over channels, as DDPM's NIN layers.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, L, C)
        qkv = self.qkv(tokens).view(B, H * W, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, C/heads)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))  # (B, L, C)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """3x3 convolution with stride 2 (DDPM's ``resamp_with_conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Layers applied in order; ResBlocks also receive the embedding. With ``checkpointing`` (set by the UNet), a
    ResBlock's activations are not kept for the backward pass but recomputed in it (``torch.utils.checkpoint``,
    non-reentrant, with the random-number state restored so that dropout draws the same mask)."""

    checkpointing = False

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            if not isinstance(layer, ResBlock):
                x = layer(x)
            elif self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, emb, use_reentrant=False)
            else:
                x = layer(x, emb)
        return x


def valid_image_sizes_near(size: int, factor: int) -> list[int]:
    """The image sizes divisible by ``factor`` closest to ``size`` (one below, if any, and one above)."""
    below = size // factor * factor
    return [s for s in (below, below + factor) if s >= factor]


# The UNet's resolutions for an image size, as the reference implementations lay them out: Ho et al. 2020's CIFAR-10
# network at 32 (four resolutions, down to 4x4), and openai/guided-diffusion's script_util.create_model at 64, 128 and
# 256 (four, five and six, down to 8x8). experiment=folder uses it as ${unet_channel_mult:${dataset.image_size}}.
CHANNEL_MULT = {32: [1, 2, 2, 2], 64: [1, 2, 3, 4], 128: [1, 1, 2, 3, 4], 256: [1, 1, 2, 2, 4, 4]}


def channel_mult_for(image_size: int) -> list[int]:
    """``model.channel_mult`` for ``image_size`` (:data:`CHANNEL_MULT`); another size gets a message."""
    if image_size not in CHANNEL_MULT:
        raise SettingError(
            f"dataset.image_size={image_size} has no preset layout (model.channel_mult follows the image size for "
            f"{', '.join(map(str, CHANNEL_MULT))}); choose one of those sizes, or give the resolutions yourself, e.g. "
            f"model.channel_mult=[1,2,2,2] for a size divisible by 8"
        )
    return list(CHANNEL_MULT[image_size])


class UNet(nn.Module):
    """The denoising network of DDPM, a :class:`~diffusion.core.networks.Network`: ``forward(x, noise_conditioning,
    labels)`` gives the prediction of whichever target its objective trains it for.

    Args:
        image_size: height and width of the (square) images; must be divisible by 2^(resolutions - 1).
        in_channels: 1 (grayscale) or 3 (RGB).
        out_channels: what the objective asks for (``2 * in_channels`` with a learned variance).
        base_channels: channels at the first resolution ("ch" in DDPM).
        channel_mult: channels of each resolution as multiples of ``base_channels``; one entry per resolution.
        num_res_blocks: ResBlocks per resolution in the encoder (the decoder has one more, as in DDPM).
        attention_resolutions: feature-map sizes (in pixels) at which blocks are followed by self-attention.
        num_heads: attention heads.
        dropout: dropout probability inside ResBlocks.
        num_classes: number of class labels for a conditional model (label ``num_classes`` means "no label");
            ``None`` for an unconditional one.
        scale_shift: condition each block by scale and shift of its norm instead of by addition.

    :attr:`checkpointing` (``model.checkpointing``): recompute each ResBlock's activations in the backward pass
    instead of keeping them (activation checkpointing): less memory per image for more time per step; the same
    gradients.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_heads: int,
        dropout: float,
        num_classes: int | None,
        scale_shift: bool,
    ) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise SettingError(f"dataset.channels={in_channels}: the UNet takes 1 (grayscale) or 3 (RGB) channels")
        checks.whole_number("model.base_channels", base_channels, 1, "e.g. model.base_channels=64")
        checks.whole_numbers(
            "model.channel_mult", channel_mult, 1, "one multiplier per resolution, e.g. model.channel_mult=[1,2,2,2]",
            at_least=1,
        )  # fmt: skip
        checks.whole_number("model.num_res_blocks", num_res_blocks, 1, "e.g. model.num_res_blocks=2")
        checks.whole_numbers("model.attention_resolutions", attention_resolutions, 1, "sizes, e.g. [16] or [] for none")
        checks.whole_number("model.num_heads", num_heads, 1, "e.g. model.num_heads=1")
        checks.number("model.dropout", dropout, 0, 1, "the share of activations dropped, e.g. 0.1", open_high=True)
        checks.whole_number("model.num_classes", num_classes, 1, "null for an unconditional model", allowed=(None,))
        checks.flag("model.scale_shift", scale_shift)
        channel_mult = list(channel_mult)
        self.check_layout(image_size, base_channels, channel_mult, attention_resolutions, num_heads)
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.out_channels = out_channels
        emb_dim = 4 * base_channels

        self.base_channels = base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, scale_shift)

        def stage(layers: list[nn.Module], resolution: int, channels: int) -> Stage:
            if resolution in attention_resolutions:
                layers.append(Attention(channels, num_heads))
            return Stage(layers)

        self.down = nn.ModuleList()
        skips, ch, res = [base_channels], base_channels, image_size
        for depth, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage([block(ch, base_channels * mult)], res, base_channels * mult))
                ch = base_channels * mult
                skips.append(ch)
            if depth < len(channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skips.append(ch)
                res //= 2

        self.middle = Stage([block(ch, ch), Attention(ch, num_heads), block(ch, ch)])

        self.up = nn.ModuleList()
        for depth, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = stage([block(ch + skips.pop(), base_channels * mult)], res, base_channels * mult)
                ch = base_channels * mult
                if depth > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(layers)

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    @property
    def checkpointing(self) -> bool:
        return any(stage.checkpointing for stage in self.modules() if isinstance(stage, Stage))

    @checkpointing.setter
    def checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, Stage):
                module.checkpointing = enabled

    @staticmethod
    def check_layout(
        image_size: int, base_channels: int, channel_mult: list[int], attention_resolutions: Sequence[int], heads: int
    ) -> None:
        """Whether the resolutions, attention and heads fit the image size and the widths."""
        factor = 2 ** (len(channel_mult) - 1)
        if image_size < factor or image_size % factor:
            raise SettingError(
                f"dataset.image_size={image_size} does not fit a UNet with {len(channel_mult)} resolutions "
                f"(model.channel_mult={channel_mult}): the size must be a multiple of "
                f"2^{len(channel_mult) - 1} = {factor}. Sizes that work near it: "
                f"{valid_image_sizes_near(image_size, factor)}; or use fewer resolutions."
            )
        resolutions = [image_size // 2**i for i in range(len(channel_mult))]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise SettingError(
                f"model.attention_resolutions {unknown} are not feature-map sizes of this UNet; for "
                f"dataset.image_size={image_size} and {len(channel_mult)} resolutions they are {resolutions}"
            )
        for mult in channel_mult:
            if (base_channels * mult) % heads:
                raise SettingError(
                    f"model.num_heads={heads} must divide the channels of every resolution ({base_channels * mult})"
                )

    def forward(self, x: Tensor, noise_conditioning: Tensor, labels: Tensor | None = None) -> Tensor:
        """x: ``(B, C, H, W)``; noise_conditioning: ``(B,)``, the objective's value (a timestep, ln(sigma) / 4),
        embedded sinusoidally; labels: ``(B,)`` int64 for a conditional model (the value ``num_classes`` for "no
        label"). Returns ``(B, out_channels, H, W)``."""
        shape = (self.in_channels, self.image_size, self.image_size)
        check_inputs("UNet", x, noise_conditioning, labels, shape, conditional=self.label_embed is not None)
        emb = self.time_embed(timestep_embedding(noise_conditioning, self.base_channels))  # (B, 4 ch)
        if self.label_embed is not None:
            emb = emb + self.label_embed(labels)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
