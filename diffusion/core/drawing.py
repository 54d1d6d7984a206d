"""Drawing images from a denoiser: the one pipeline behind the training previews, the FID callback and sample.py.

Every image has its own noise, so that image k depends only on (seed, k): not on the batch size, nor on how the
images are shared out over processes. The noise of images ``BLOCK * j`` to ``BLOCK * j + BLOCK - 1`` comes from one
generator seeded by (seed, j), which draws a whole block at every call; a batch draws the blocks its images lie in
and keeps their rows. Batches that share a block each draw it in full, from its start, so they see the same values
(EDM gives each image its own generator; blocks keep the number of random-number calls per step small on a GPU).
The streams of a CPU and a CUDA generator differ, so the images depend on the device type too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.core.denoiser import Denoiser, Prediction
from diffusion.core.images import to_uint8
from diffusion.core.levels import Level
from diffusion.core.samplers.base import Sampler, SamplerStep
from diffusion.errors import SettingError

BLOCK = 32  # images per noise generator


def block_seed(seed: int, block: int) -> int:
    """A generator seed for (seed, block): splitmix64's finaliser of seed * golden + block, so that every bit depends
    on both (a CPU generator uses only the low 32 bits of its seed)."""
    x = (seed * 0x9E3779B97F4A7C15 + block) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1  # a non-negative 63-bit seed


class ImageNoise:
    """Standard normal noise for the images ``indices`` (their numbers in the whole set of samples), row i of every
    draw belonging to image ``indices[i]`` and depending only on (seed, that image, the number of earlier draws).
    Drawn in float32 on ``device`` and cast, so a bf16 run sees the float32 noise rounded."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str) -> None:
        self.device = torch.device(device)
        blocks = sorted({k // BLOCK for k in indices})
        self.generators = [torch.Generator(self.device).manual_seed(block_seed(seed, j)) for j in blocks]
        position = {j: i for i, j in enumerate(blocks)}
        rows = [position[k // BLOCK] * BLOCK + k % BLOCK for k in indices]
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.device)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """``(len(indices), *shape[1:])`` noise; ``shape[0]`` must be the number of images."""
        if shape[0] != len(self.rows):
            raise ValueError(f"noise for {len(self.rows)} images was asked for {shape[0]}")
        draws = [torch.randn((BLOCK, *shape[1:]), generator=g, device=self.device) for g in self.generators]
        return torch.cat(draws)[self.rows].to(dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, x.dtype)


class CountedDenoiser:
    """A :class:`~diffusion.core.denoiser.Denoiser` that counts the rows it sends through the network."""

    def __init__(self, denoise: Denoiser) -> None:
        self.denoise, self.levels, self.rows_per_image = denoise, denoise.levels, denoise.rows_per_image
        self.rows = 0

    def __call__(self, x_t: Tensor, level: Level) -> Prediction:
        self.rows += x_t.shape[0] * self.rows_per_image
        return self.denoise(x_t, level)


@dataclass(frozen=True)
class Samples:
    """images: ``(n, C, H, W)`` uint8 on the CPU. frames: the reverse process of the first ``frame_images`` images,
    each ``(frame_images, C, H, W)`` uint8, evenly spread over the steps, the last being the final images.
    nfe: network evaluations per image: rows through the network (a guided call runs two per image) over n."""

    images: Tensor
    frames: list[Tensor]
    nfe: float


def draw(
    denoiser_for: Callable[[Tensor | None], Denoiser],
    sampler: Sampler,
    *,
    n: int,
    batch_size: int,
    shape: Sequence[int],
    seed: int,
    device: torch.device | str,
    labels: Tensor | None = None,
    indices: Sequence[int] | None = None,
    frames: int = 0,
    frame_images: int = 0,
    on_step: Callable[[SamplerStep], None] | None = None,
) -> Samples:
    """Draws images with ``sampler`` in batches of ``batch_size``.

    Args:
        denoiser_for: the denoiser for a batch's class labels (``None`` for an unconditional model).
        shape: one image's ``(C, H, W)``.
        n: how many images; they are images ``indices`` (default ``0 .. n-1``) of the seed's set.
        labels: ``(n,)`` class labels, one per image, or ``None``.
        frames, frame_images: keep at most ``frames`` states of the first ``frame_images`` images (of the first
            batch) for a GIF; 0 keeps none.
        on_step: sees every step of every batch (a progress bar).
    """
    if n < 1 or batch_size < 1:
        raise SettingError(f"need at least one image and a batch of at least 1, got n={n}, batch_size={batch_size}")
    indices = list(range(n)) if indices is None else list(indices)
    if len(indices) != n or (labels is not None and len(labels) != n):
        raise ValueError("indices and labels must have one entry per image")
    images, kept, calls = [], [], 0
    for start in range(0, n, batch_size):
        batch = indices[start : start + batch_size]
        noise = ImageNoise(seed, batch, device)
        batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
        denoise = CountedDenoiser(denoiser_for(batch_labels))
        x_T = noise.randn((len(batch), *shape))
        trajectory = sampler(denoise, x_T, generator=noise)
        last, batch_frames = _run(trajectory, frames if start == 0 else 0, frame_images, on_step)
        images.append(to_uint8(last.x).cpu())
        kept = kept or batch_frames
        calls += denoise.rows
    return Samples(torch.cat(images), kept, calls / n)


def _run(
    trajectory: Iterable[SamplerStep],
    frames: int,
    frame_images: int,
    on_step: Callable[[SamplerStep], None] | None,
) -> tuple[SamplerStep, list[Tensor]]:
    """Runs a sampler to its end; keeps at most ``frames`` evenly spread states of the first ``frame_images``
    images, the final one last, with bounded memory (every other kept state is dropped whenever twice as many as
    needed have been kept, and states are then kept half as often)."""
    kept: list[Tensor] = []
    stride, last = 1, None
    for i, step in enumerate(trajectory):
        last = step
        if on_step is not None:
            on_step(step)
        if frames and i % stride == 0:
            kept.append(to_uint8(step.x[:frame_images]).cpu())
            if len(kept) >= 2 * frames:
                kept, stride = kept[::2], stride * 2
    if last is None:
        raise ValueError("the sampler took no steps")
    if frames:
        final = to_uint8(last.x[:frame_images]).cpu()
        pick = torch.linspace(0, len(kept) - 1, min(frames - 1, len(kept))).round().long().unique()
        kept = [kept[i] for i in pick.tolist()] + [final]
    return last, kept
