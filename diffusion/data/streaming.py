"""A folder of images converted once into LitData chunks, and streamed from them for training.

``dataset=folder`` scans and decode-checks every file at every start, which takes minutes at a hundred thousand
images and an hour at a million, and it needs the files on a local disk. :func:`prepare` does that work once: it
checks the folder as ``dataset=folder`` does, splits it into training and validation images as ``dataset=folder``
does (the same seeded split), decodes and resizes every image to the training size exactly as ``dataset=folder``
does (:class:`~diffusion.data.datasets.ImageFolder`), and writes them with ``litdata.optimize``, in parallel, as
uint8 tensors: ``OUT/train`` and ``OUT/val``, each a LitData dataset (``index.json`` and chunks), and
``OUT/dataset.json`` with the image format and the class names. A run then reads it with ``dataset=streaming
dataset.root=OUT``, from a local folder or any URL LitData reads (``s3://``, ``gs://``, ``azure://``): LitData's
``StreamingDataset`` shards it over processes, nodes and loader workers, and its ``StreamingDataLoader`` has the
``state_dict`` that Lightning saves in every checkpoint, so a resumed run continues mid-epoch where it stopped,
on the same or another number of processes (LitData's elastic resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from litdata import StreamingDataLoader, StreamingDataset, optimize
from torch import Tensor

from diffusion.data.datasets import ImageFolder, check_readable, scan_image_folder
from diffusion.data.loaders import own_generator
from diffusion.errors import RunError

DESCRIPTION = "dataset.json"  # what prepare writes beside the two splits
FORMAT = 1
SPLITS = ("train", "val")
CHUNK_BYTES = "64MB"  # LitData's recommended range; a chunk is what a worker downloads and caches at once


def is_remote(root: str) -> bool:
    return "://" in root


def split_indices(n: int, val_fraction: float, seed: int) -> dict[str, Tensor]:
    """The training and validation images of ``n``, as ``dataset=folder`` splits them (a seeded permutation, the
    first ``round(val_fraction n)`` for validation)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * n))
    return {"train": order[n_val:], "val": order[:n_val]}


class _Item:
    """``litdata.optimize``'s function: image ``i`` of the folder as ``(uint8 (C, S, S), label)``."""

    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __call__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.folder[i]
        return image.contiguous(), int(label)


def prepare(
    source: Path,
    out: Path,
    *,
    image_size: int,
    channels: int,
    labels_from_subfolders: bool,
    strict: bool,
    background: tuple[int, int, int],
    val_fraction: float,
    seed: int,
    num_workers: int,
) -> dict[str, Any]:
    """Converts the images below ``source`` into a streaming dataset in ``out`` (which must not exist or be empty)
    and returns its description (what ``OUT/dataset.json`` holds)."""
    if out.exists() and any(out.iterdir()):
        raise RunError(
            f"{out} already holds files; prepare writes into a new or empty folder (remove it, or choose another)"
        )
    files, labels, classes = scan_image_folder(source, labels_from_subfolders)
    keep = set(check_readable(files, strict, root=source, image_size=image_size, num_workers=num_workers))
    labels = [label for path, label in zip(files, labels, strict=True) if path in keep]
    folder = ImageFolder(sorted(keep), labels, image_size, channels, background)
    splits = split_indices(len(folder), val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        optimize(
            fn=_Item(folder),
            inputs=splits[name].tolist(),
            output_dir=str(out / name),
            chunk_bytes=CHUNK_BYTES,
            num_workers=max(1, num_workers),
            reorder_files=False,
            start_method="fork",  # the workers inherit the folder's file list instead of re-importing the caller
        )
    description = {
        "format": FORMAT,
        "image_size": image_size,
        "channels": channels,
        "classes": classes,
        "images": {name: len(splits[name]) for name in SPLITS},
        "source": str(source),
        "seed": seed,
        "val_fraction": val_fraction,
    }
    partial = out / (DESCRIPTION + ".partial")
    partial.write_text(json.dumps(description, indent=2) + "\n")
    partial.replace(out / DESCRIPTION)  # written last, atomically: its presence says the preparation finished
    return description


def describe(root: str) -> dict[str, Any] | None:
    """``dataset.json`` of a prepared local folder; ``None`` for a URL (whose chunks LitData reads itself). A local
    folder without it was not prepared, or its preparation did not finish: that is said here, before any work."""
    if is_remote(root):
        return None
    path = Path(root)
    if not (path / DESCRIPTION).is_file() or not all((path / s / "index.json").is_file() for s in SPLITS):
        what = "does not exist" if not path.exists() else f"holds no finished preparation (no {DESCRIPTION})"
        raise RunError(
            f"dataset=streaming reads a folder written by the prepare command, and {root} {what}. Prepare it "
            f"once from a folder of images: python -m diffusion.data.prepare /path/to/images {root} "
            f"dataset.image_size=SIZE (or use dataset=folder dataset.root=/path/to/images)."
        )
    description = json.loads((path / DESCRIPTION).read_text())
    if description.get("format") != FORMAT:
        raise RunError(f"{root} was prepared by another version (format {description.get('format')}); prepare again")
    return description


def check_format(root: str, description: dict[str, Any] | None, first: Tensor, image_size: int, channels: int) -> None:
    """The prepared images must be what the run trains on: resizing them again would not be ``dataset=folder``'s
    faithful resize of the originals."""
    prepared = (
        (description["channels"], description["image_size"]) if description else (first.shape[0], first.shape[-1])
    )
    if prepared != (channels, image_size):
        raise RunError(
            f"{root} holds {prepared[1]}x{prepared[1]} images with {prepared[0]} channel(s), but the run asks for "
            f"dataset.image_size={image_size} dataset.channels={channels}. Set those to the prepared format, or "
            f"prepare the folder again at this size into another folder."
        )


def open_splits(root: str, seed: int) -> dict[str, Any]:
    """LitData's ``StreamingDataset`` of each split: the training split shuffled by ``seed`` (and the epoch) with
    equal shares on every process (``drop_last``), the validation split in order."""
    base = root.rstrip("/")
    return {
        "train": StreamingDataset(f"{base}/train", shuffle=True, drop_last=True, seed=seed),
        "val": StreamingDataset(f"{base}/val", shuffle=False, drop_last=False),
    }


class StreamingLoader(StreamingDataLoader):
    """LitData's loader, with each epoch after a resumed one starting afresh.

    After ``load_state_dict``, LitData continues the saved epoch and clears its ``restore`` flag only when that
    pass runs to its end (``StopIteration``). Lightning never gets there: it stops asking once it has the loader's
    ``len`` batches, so the flag stayed set and the next epoch replayed the saved position instead of reshuffling
    (a resumed run then trained on other images than the uninterrupted one from its second epoch on). Here the
    first pass after ``load_state_dict`` continues the saved epoch and every later pass is a new one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._continuing = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._continuing = True

    def __iter__(self) -> Any:
        if self._continuing:
            self._continuing = False
        else:
            self.restore = False
        yield from super().__iter__()


def loader(
    stream: StreamingDataset,
    batch_size: int,
    full_batches: bool,
    *,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
) -> StreamingLoader:
    """The training loader: Lightning checkpoints its ``state_dict`` and restores it on resume. Its generator is
    not the global one (see :func:`diffusion.data.loaders.own_generator`)."""
    return StreamingLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=full_batches,
        generator=own_generator(),
    )
