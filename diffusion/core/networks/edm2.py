"""EDM2's magnitude-preserving UNet (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", config G; Sec. 3 and Appendix B): a network whose activations and weights keep their magnitudes by
construction, so that no layer needs a normalization or a bias to stay in range.

- Every weight is normalized per output channel in the forward pass, and in training the stored weight is first
  replaced by its normalized self ("forced weight normalization", Sec. 3.3 and eq. 47): the optimizer's steps then
  change directions, never lengths, and the effective learning rate does not decay as the norms would grow.
- Magnitude-preserving SiLU (divided by 0.596, its output's RMS for a unit normal input), sum (a blend t of two
  unit-variance branches over sqrt((1 - t)^2 + t^2)), concatenation (each part scaled by its share), and a Fourier
  embedding of the noise level (cos with random frequencies and phases, times sqrt 2).
- No biases, no group norms: the encoder blocks' inputs are normalized per pixel (pixel norm), attention normalizes
  q, k and v per head (cosine attention), and activations are clipped at +-256 for safety (config G).
- The residual branches join the trunk with the blend t = 0.3, the skips join the decoder by concatenation with
  0.5, the noise and the label embeddings by a sum with 0.5; the output layer has a learned gain, 0 at the start.

The layers' names and arithmetic follow the paper's Appendix B; the code is written from it (NVlabs' ``edm2`` is under
a non-commercial licence and is read, not copied). Two things differ, said where they are: the noise-level embedding's
frequencies span several scales (:class:`MPFourier`), since this project's objectives condition on values from
ln(sigma) / 4 to 1000 t; and the null label of classifier-free guidance is the zero vector of the one-hot labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffusion import checks
from diffusion.core.networks import check_inputs
from diffusion.core.networks.unet import valid_image_sizes_near
from diffusion.errors import SettingError

SILU_RMS = 0.596  # sqrt(E[silu(n)^2]) for n ~ N(0, 1): mp_silu keeps a unit-variance input at unit variance


def normalize(x: Tensor, dim: Sequence[int] | None = None, eps: float = 1e-4) -> Tensor:
    """``x`` scaled to unit root mean square over ``dim`` (all but the first by default), in float32 and cast back:
    x / (eps + ||x|| / sqrt(N)) with N the number of elements that each norm covers (eq. 47's ``normalize``)."""
    dim = list(range(1, x.ndim)) if dim is None else list(dim)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    covered = x.numel() // max(1, norm.numel())
    return x / (eps + norm / math.sqrt(covered)).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU divided by its RMS on unit-normal input (Sec. 3.5)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: Tensor, b: Tensor, t: float) -> Tensor:
    """(1 - t) a + t b over sqrt((1 - t)^2 + t^2): the blend of two independent unit-variance tensors, at unit
    variance (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, t: float) -> Tensor:
    """The channels of ``a`` and ``b`` (``(B, Na, ...)``, ``(B, Nb, ...)``) concatenated so that the result has unit
    variance and ``b``'s share of it is t (eq. 90): a by (1 - t) C / sqrt(Na), b by t C / sqrt(Nb), with
    C = sqrt((Na + Nb) / ((1 - t)^2 + t^2))."""
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * ((1 - t) * c / math.sqrt(na)), b * (t * c / math.sqrt(nb))], dim=1)


class MPFourier(nn.Module):
    """The magnitude-preserving Fourier embedding ``(B,) -> (B, channels)``: sqrt(2) cos(2 pi f_i c + phi_i) with
    f_i = b_i n_i, n_i ~ N(0, 1) and phi_i ~ U[0, 1) drawn once (fixed buffers), so each feature has unit mean square.

    The paper's bandwidth b_i is 1 for every feature, which suits its conditioning c_noise = ln(sigma) / 4, of order 1.
    This project's objectives give networks values of other scales as well (the timestep, up to 1000, of the discrete
    ones; 1000 t of flow matching), which such frequencies turn into noise. So b_i runs log-evenly over
    ``bandwidths`` = (lowest, highest): the features of the low bandwidths are smooth over a range of 1000, those near
    1 resolve a range of 1. (1, 1) is the paper's.
    """

    def __init__(self, channels: int, bandwidths: tuple[float, float], generator: torch.Generator | None = None):
        super().__init__()
        low, high = bandwidths
        bandwidth = torch.logspace(math.log10(low), math.log10(high), channels, dtype=torch.float64)
        frequencies = bandwidth * torch.randn(channels, generator=generator, dtype=torch.float64)
        self.register_buffer("frequencies", (2 * math.pi * frequencies).float())
        self.register_buffer("phases", (2 * math.pi * torch.rand(channels, generator=generator)).float())

    def forward(self, c: Tensor) -> Tensor:
        y = c.float()[:, None] * self.frequencies[None] + self.phases[None]  # (B, channels)
        return (torch.cos(y) * math.sqrt(2)).to(c.dtype if c.is_floating_point() else torch.float32)


class MPConv(nn.Module):
    """A convolution (``kernel`` = (k, k)) or linear layer (``kernel`` = ()) without bias, whose weight is normalized
    per output channel in every forward pass and scaled by ``gain`` / sqrt(fan-in), so that each output has the
    variance of its (unit-variance, independent) inputs times gain^2.

    Forced weight normalization (Sec. 3.3): in training mode, the stored weight is first replaced by its normalized
    self (each output channel at unit RMS), so its norm stays fixed whatever the optimizer does. The replacement of the
    weights after an optimizer step happens at the next forward pass, before they are used; a checkpoint written
    between the two holds the stepped weights, and a resumed run normalizes them at the same point.
    """

    # Under torch.compile the replacement must happen outside the compiled graph: a graph that both rewrites a
    # weight in place and differentiates through it gave the gains' gradients (out_gain, emb_gain) about a third too
    # small in torch 2.14 whenever the rewrite changed the weight (tests/test_every_network.py). So the replacement
    # is compiler.disable'd (a graph break), and EDM2UNet does all of its layers' at once before its graph
    # (normalized_before_graph), leaving one break in all.
    normalized_before_graph = False

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @torch.compiler.disable
    def force_normalization(self) -> None:
        """Forced weight normalization: the stored weight replaced by its normalized self."""
        with torch.no_grad():
            self.weight.copy_(normalize(self.weight.float()))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        if self.training and not (self.normalized_before_graph and torch.compiler.is_compiling()):
            self.force_normalization()
        w = normalize(self.weight.float())  # and the standard one, so that the gradient sees the normalization
        w = w * (gain / math.sqrt(w[0].numel()))  # magnitude-preserving scaling
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


Resample = Literal["keep", "up", "down"]


def resample(x: Tensor, mode: Resample) -> Tensor:
    """EDM2's resampling with its default filter [1, 1]: nearest-neighbour doubling up, 2x2 average pooling down."""
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(x, 2)
    return x


class Block(nn.Module):
    """EDM2's residual block (Fig. 21): an encoder block normalizes its input per pixel (after a 1x1 convolution where
    the width changes); the branch is mp_silu, conv 3x3, a modulation by 1 + the gained embedding, mp_silu, dropout,
    conv 3x3; the trunk and the branch meet in ``mp_sum`` with ``res_balance``, then attention (optional) joins with
    ``attn_balance``; activations are clipped at +-``clip_act``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        flavor: Literal["enc", "dec"],
        mode: Resample = "keep",
        attention: bool = False,
        channels_per_head: int,
        dropout: float,
        res_balance: float,
        attn_balance: float,
        clip_act: float = 256.0,
    ) -> None:
        super().__init__()
        self.out_channels, self.flavor, self.mode = out_channels, flavor, mode
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if attention else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=[1])  # pixel norm
        # the residual branch
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1  # (B, C)
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        # self-attention, with q, k and v normalized per head and pixel (cosine attention)
        if self.attn_qkv is not None:
            B, C, H, W = x.shape
            qkv = self.attn_qkv(x).reshape(B, self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = normalize(qkv, dim=[2]).unbind(3)  # each (B, heads, C/heads, H*W)
            y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            y = self.attn_proj(y.transpose(2, 3).reshape(B, C, H, W))  # (B, heads, H*W, C/heads) -> (B, C, H, W)
            x = mp_sum(x, y, self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act)


class EDM2UNet(nn.Module):
    """EDM2's UNet (config G), a :class:`~diffusion.core.networks.Network`.

    Args:
        image_size, in_channels, out_channels, num_classes: as for every network (label ``num_classes`` is "no label",
            embedded as the zero vector).
        model_channels: the width of the first resolution (the paper's 128 for XS, 192 for S, 256 for M).
        channel_mult: the widths of the resolutions as multiples of ``model_channels`` (the paper: 1, 2, 3, 4).
        num_blocks: residual blocks per resolution in the encoder (the decoder has one more), the paper's 3.
        attn_resolutions: the feature-map sizes with self-attention in every block (the paper: 16 and 8); the
            decoder's first block at the lowest resolution always has it.
        channels_per_head: attention heads are width / this (64).
        dropout: in every residual branch, after the modulation (the paper: 0 for XS and S at 64 pixels, 0.1 above).
        res_balance, attn_balance: the blend t of the residual and attention branches (0.3).
        concat_balance: the share of the skip in the decoder's concatenations (0.5).
        label_balance: the share of the label in the embedding (0.5).
        fourier_bandwidths: the lowest and highest bandwidths of the noise level's Fourier features (see
            :class:`MPFourier`; (1, 1) is the paper's).

    :attr:`checkpointing` (``model.checkpointing``): recompute each block's activations in the backward pass.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        out_channels: int,
        num_classes: int | None,
        model_channels: int,
        channel_mult: Sequence[int],
        num_blocks: int,
        attn_resolutions: Sequence[int],
        channels_per_head: int,
        dropout: float,
        res_balance: float,
        attn_balance: float,
        concat_balance: float,
        label_balance: float,
        fourier_bandwidths: Sequence[float],
    ) -> None:
        super().__init__()
        checks.whole_number("model.model_channels", model_channels, 1, "e.g. model.model_channels=64")
        checks.whole_numbers("model.channel_mult", channel_mult, 1, "e.g. model.channel_mult=[1,2,3,4]", at_least=1)
        checks.whole_number("model.num_blocks", num_blocks, 1, "e.g. model.num_blocks=3")
        checks.whole_numbers("model.attn_resolutions", attn_resolutions, 1, "sizes, e.g. [16, 8] or [] for none")
        checks.whole_number("model.channels_per_head", channels_per_head, 1, "e.g. model.channels_per_head=64")
        checks.number("model.dropout", dropout, 0, 1, "the share of activations dropped, e.g. 0.1", open_high=True)
        for key, value in (
            ("res_balance", res_balance),
            ("attn_balance", attn_balance),
            ("concat_balance", concat_balance),
            ("label_balance", label_balance),
        ):
            checks.number(f"model.{key}", value, 0, 1, "a blend t in [0, 1]; the paper's is 0.3 or 0.5")
        good = isinstance(fourier_bandwidths, list | tuple) and len(fourier_bandwidths) == 2
        if not good or not all(checks.is_number(b) and b > 0 for b in fourier_bandwidths):
            checks.fail(
                "model.fourier_bandwidths", fourier_bandwidths, "is not two positive numbers (lowest, highest)",
                "e.g. model.fourier_bandwidths=[0.001,1.0], or [1.0,1.0] for the paper's",
            )  # fmt: skip
        checks.whole_number("model.num_classes", num_classes, 1, "null for an unconditional model", allowed=(None,))
        channel_mult = list(channel_mult)
        self.check_layout(image_size, channel_mult, attn_resolutions)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.num_classes, self.concat_balance, self.label_balance = num_classes, concat_balance, label_balance
        widths = [model_channels * m for m in channel_mult]
        emb_channels = max(widths)
        block = dict(
            channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance, attn_balance=attn_balance
        )

        # the embedding of the noise level (and the label)
        self.emb_fourier = MPFourier(widths[0], tuple(fourier_bandwidths))
        self.emb_noise = MPConv(widths[0], emb_channels, ())
        self.emb_label = MPConv(num_classes, emb_channels, ()) if num_classes else None

        # the encoder: an input convolution (on the image and a constant channel of ones), then per resolution a
        # downsampling block (but the first) and ``num_blocks`` blocks
        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, width in enumerate(widths):
            res = image_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(cout, width, (3, 3))
                cout = width
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, emb_channels, flavor="enc", mode="down", **block)
            for i in range(num_blocks):
                attention = res in attn_resolutions
                self.enc[f"{res}x{res}_block{i}"] = Block(
                    cout, width, emb_channels, flavor="enc", attention=attention, **block
                )
                cout = width

        # the decoder: two blocks at the lowest resolution (the first with attention), then per resolution an
        # upsampling block (but the lowest) and ``num_blocks + 1`` blocks, each on the concatenated skip
        skips = [m.out_channels for m in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            res = image_size >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, emb_channels, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, emb_channels, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, emb_channels, flavor="dec", mode="up", **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                attention = res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = Block(
                    cin, cout, emb_channels, flavor="dec", attention=attention, **block
                )
        self.out_conv = MPConv(cout, out_channels, (3, 3))
        self.out_gain = nn.Parameter(torch.zeros([]))
        self._checkpointing = False
        for layer in self.modules():
            if isinstance(layer, MPConv):
                layer.normalized_before_graph = True

    @torch.compiler.disable
    def force_weight_normalization(self) -> None:
        """Every layer's forced weight normalization at once, before the compiled graph (see MPConv)."""
        for layer in self.modules():
            if isinstance(layer, MPConv):
                layer.force_normalization()

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, enabled: bool) -> None:
        self._checkpointing = enabled

    @staticmethod
    def check_layout(image_size: int, channel_mult: list[int], attn_resolutions: Sequence[int]) -> None:
        factor = 2 ** (len(channel_mult) - 1)
        if image_size < factor or image_size % factor:
            raise SettingError(
                f"dataset.image_size={image_size} does not fit an EDM2 UNet with {len(channel_mult)} resolutions "
                f"(model.channel_mult={channel_mult}): the size must be a multiple of 2^{len(channel_mult) - 1} = "
                f"{factor}. Sizes that work near it: {valid_image_sizes_near(image_size, factor)}; or use fewer "
                f"resolutions."
            )
        resolutions = [image_size >> i for i in range(len(channel_mult))]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise SettingError(
                f"model.attn_resolutions {unknown} are not feature-map sizes of this network; for "
                f"dataset.image_size={image_size} and {len(channel_mult)} resolutions they are {resolutions}"
            )

    def embedding(self, noise_conditioning: Tensor, labels: Tensor | None) -> Tensor:
        """The noise level's embedding, summed with the label's (one-hot times sqrt(num_classes), the null label
        all zeros), through mp_silu: ``(B, emb_channels)``."""
        emb = self.emb_noise(self.emb_fourier(noise_conditioning))
        if self.emb_label is not None:
            one_hot = F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes].to(emb.dtype)
            emb = mp_sum(emb, self.emb_label(one_hot * math.sqrt(self.num_classes)), self.label_balance)
        return mp_silu(emb)

    def forward(self, x: Tensor, noise_conditioning: Tensor, labels: Tensor | None = None) -> Tensor:
        """x: ``(B, C, H, W)``, at unit variance where the objective scales it so (EDM's c_in); noise_conditioning:
        ``(B,)``; labels: ``(B,)`` int64 for a conditional model. Returns ``(B, out_channels, H, W)``."""
        shape = (self.in_channels, self.image_size, self.image_size)
        check_inputs("EDM2 UNet", x, noise_conditioning, labels, shape, conditional=self.emb_label is not None)
        if self.training and torch.compiler.is_compiling():
            self.force_weight_normalization()
        emb = self.embedding(noise_conditioning, labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # a constant channel: the only "bias" of the network
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else self.run(layer, x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = self.run(layer, x, emb)
        return self.out_conv(x, gain=self.out_gain)

    def run(self, block: Block, x: Tensor, emb: Tensor) -> Tensor:
        """A block, recomputed in the backward pass under :attr:`checkpointing` (non-reentrant, the random state
        restored so that dropout draws the same mask)."""
        if self._checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)
