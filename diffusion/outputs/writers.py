"""The files a run or ``sample.py`` writes: image grids, GIFs of the reverse process, ``.npz`` arrays.

Each is written to a temporary file beside its destination and renamed into place (:func:`atomic_path`), so an
interrupted run never leaves a half-written file where a good one stood.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor
from torchvision.utils import make_grid

from diffusion.core.images import to_nhwc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file: mkstemp's 0600 is private to the user


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path in ``path``'s folder; on success it is flushed to disk and replaces ``path`` in one
    rename. The temporary file lies beside the target, never in ``$TMPDIR``: a rename within one folder is atomic
    on every filesystem, while a move from another filesystem is a copy, which an interruption or a full disk leaves
    truncated where the previous good file stood. On any failure the temporary file is removed and ``path`` is
    untouched. The file gets the usual permissions (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=f"{path.suffix}.tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def grid_image(images: Tensor, nrow: int | None = None, min_tile: int = 64) -> np.ndarray:
    """``(N, C, H, W)`` uint8 -> one ``(H', W', C)`` uint8 grid image (torchvision's ``make_grid``), small images
    enlarged by pixel repetition so that each tile is at least ``min_tile`` pixels wide."""
    scale = max(1, -(-min_tile // images.shape[-1]))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    nrow = nrow or max(1, round(len(images) ** 0.5))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)  # (3, H', W'); grayscale is repeated
    return to_nhwc(grid[None])[0].numpy()


def write_grid(images: Tensor, path: Path, nrow: int | None = None) -> Path:
    return write_png(grid_image(images, nrow), path)


def write_png(picture: np.ndarray, path: Path) -> Path:
    """An ``(H, W, C)`` uint8 picture as a PNG."""
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, picture, extension=".png")
    return path


def write_gif(frames: Sequence[Tensor], path: Path, *, seconds: float = 4.0, hold_last: float = 1.5) -> Path:
    """An animated GIF of ``frames`` (each ``(N, C, H, W)`` uint8, drawn as a grid), played in about ``seconds``,
    the last frame held for ``hold_last`` seconds more, looping."""
    pictures = [grid_image(frame) for frame in frames]
    per_frame = max(20, int(1000 * seconds / max(1, len(pictures))))  # ms; browsers clamp shorter delays
    durations = [per_frame] * (len(pictures) - 1) + [per_frame + int(1000 * hold_last)]
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, np.stack(pictures), extension=".gif", duration=durations, loop=0)
    return path


def write_npz(images: Tensor, path: Path, labels: Tensor | None = None) -> Path:
    """``arr_0``: the images as uint8 ``(N, H, W, C)`` (the layout of OpenAI's evaluation suite); ``labels``."""
    arrays = {"arr_0": to_nhwc(images.to(torch.uint8)).numpy()}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def write_images(images: Tensor, folder: Path) -> Path:
    """One PNG per image: ``folder/000000.png``, ... (``(N, C, H, W)`` uint8)."""
    for i, image in enumerate(to_nhwc(images.to(torch.uint8)).numpy()):
        with atomic_path(folder / f"{i:06d}.png") as tmp:
            iio.imwrite(tmp, image.squeeze(-1) if image.shape[-1] == 1 else image, extension=".png")
    return folder


def write_json(data: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
