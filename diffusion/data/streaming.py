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

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from litdata import StreamingDataLoader, StreamingDataset, optimize
from litdata.exceptions import ChunkWaitTimeoutError
from torch import Tensor

from diffusion.data.datasets import ImageFolder, check_readable, scan_image_folder, split_indices
from diffusion.data.loaders import own_generator
from diffusion.errors import RunError

DESCRIPTION = "dataset.json"  # what prepare writes beside the two splits
FORMAT = 1
SPLITS = ("train", "val")
CHUNK_BYTES = "64MB"  # LitData's recommended range; a chunk is what a worker downloads and caches at once


def is_remote(root: str) -> bool:
    return "://" in root


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
    splits = split_indices(len(folder), val_fraction, seed, str(source))
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
    description = read_json(path / DESCRIPTION)
    kinds = {"format": int, "image_size": int, "channels": int, "classes": list, "images": dict}
    if not isinstance(description, dict) or not all(isinstance(description.get(k), t) for k, t in kinds.items()):
        raise damaged(path / DESCRIPTION, "it lacks the format, size, channels, classes or counts of the images")
    if description["format"] != FORMAT:
        raise RunError(f"{root} was prepared by another version (format {description['format']}); prepare again")
    for split in SPLITS:
        check_chunks(path / split)
    return description


def damaged(file: Path, why: str) -> RunError:
    return RunError(
        f"{file} is damaged ({why}): the streaming folder cannot be read. Prepare it again from the images, into a "
        f"new folder: python -m diffusion.data.prepare /path/to/images NEW_FOLDER dataset.image_size=SIZE"
    )


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(file, f"not readable JSON: {error}") from None


def check_chunks(split: Path) -> None:
    """LitData's index of one split, and every chunk file it names whole (the size the index gives): LitData itself
    would wait for a shorter file to grow, and time out mid-run."""
    index = read_json(split / "index.json")
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(chunks, list) or not all(
        isinstance(c, dict) and {"filename", "chunk_bytes"} <= set(c) for c in chunks
    ):
        raise damaged(split / "index.json", "it lists no chunks")
    for chunk in chunks:
        file = split / chunk["filename"]
        size = file.stat().st_size if file.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "missing" if size is None else f"{size:,} bytes of {chunk['chunk_bytes']:,}"
            raise damaged(file, f"{found}: a copy or a preparation that did not finish")


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

    def __init__(self, *args: Any, root: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root = root
        self._continuing = False

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._continuing = True

    def __iter__(self) -> Any:
        if self._continuing:
            self._continuing = False
        else:
            self.restore = False
        with unreadable_chunks_said(self.root):
            yield from super().__iter__()


@contextlib.contextmanager
def unreadable_chunks_said(root: str) -> Iterator[None]:
    """Reads of the streaming folder ``root``: one that fails mid-run because a chunk was damaged after the start's
    check (LitData raises a timeout, or NumPy a short buffer) stops with one paragraph naming the file. The files
    are looked at again to tell: any other failure keeps its traceback."""
    try:
        yield
    except Exception as error:
        if not is_remote(root):
            for split in SPLITS:
                check_chunks(Path(root) / split)
        if isinstance(error, ChunkWaitTimeoutError):
            raise damaged(Path(error.path), "it could not be read to its end") from None
        raise


def loader(
    stream: StreamingDataset,
    root: str,
    batch_size: int,
    full_batches: bool,
    *,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
) -> StreamingLoader:
    """The training loader of the folder ``root``: Lightning checkpoints its ``state_dict`` and restores it on
    resume. Its generator is not the global one (see :func:`diffusion.data.loaders.own_generator`)."""
    return StreamingLoader(
        stream,
        root=root,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=full_batches,
        generator=own_generator(),
    )
