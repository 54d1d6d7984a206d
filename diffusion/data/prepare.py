"""Converts a folder of images into the streaming dataset that ``dataset=streaming`` trains from.

    python -m diffusion.data.prepare SRC OUT dataset.image_size=256 [dataset.channels=1]
        [dataset.labels_from_subfolders=true] [dataset.val_fraction=0.05] [seed=0] [--workers N]

The ``dataset.*`` keys and ``seed`` are train.py's, with ``dataset=folder``'s defaults, and mean what they mean
there: the images are checked, split and resized exactly as ``dataset=folder dataset.root=SRC`` would. Then

    python train.py experiment=folder dataset=streaming dataset.root=OUT dataset.image_size=256

trains from OUT, or from a copy of it at any URL LitData reads (``s3://bucket/OUT``). See
:mod:`diffusion.data.streaming`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion.data.streaming import prepare
from diffusion.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
KEYS = ("image_size", "channels", "labels_from_subfolders", "strict", "background", "val_fraction")


def settings(overrides: list[str]) -> dict:
    """train.py's dataset settings for ``dataset=folder`` with ``overrides``, and its ``seed``."""
    train = OmegaConf.load(CONFIGS / "train.yaml")
    merged = OmegaConf.merge(
        {"seed": train.seed},
        {"dataset": train.dataset},
        {"dataset": OmegaConf.load(CONFIGS / "dataset" / "folder.yaml")},
    )
    OmegaConf.set_struct(merged, True)
    wrong = [
        o for o in overrides if "=" not in o or o.split("=", 1)[0] not in ("seed", *(f"dataset.{k}" for k in KEYS))
    ]
    if wrong:
        raise UserError(
            f"prepare takes the settings seed and dataset.{{{', '.join(KEYS)}}} as KEY=VALUE, not {', '.join(wrong)}"
        )
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_container(merged)
    except OmegaConfBaseException as error:
        raise UserError(f"a setting could not be read: {error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.data.prepare", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("source", type=Path, help="the folder of images")
    parser.add_argument("out", type=Path, help="the new folder to write the streaming dataset into")
    parser.add_argument("overrides", nargs="*", help="dataset.KEY=VALUE and seed=N, as for train.py")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    created = not args.out.exists()
    start = time.perf_counter()
    try:
        chosen = settings(args.overrides)
        data = chosen["dataset"]
        description = prepare(
            args.source,
            args.out,
            image_size=int(data["image_size"]),
            channels=int(data["channels"]),
            labels_from_subfolders=bool(data["labels_from_subfolders"]),
            strict=bool(data["strict"]),
            background=tuple(data["background"]),
            val_fraction=float(data["val_fraction"]),
            seed=int(chosen["seed"]),
            num_workers=args.workers,
        )
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    except BaseException:
        if created:  # nothing half-written stays behind (the source is never touched)
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    images = description["images"]
    print(
        f"Prepared {images['train']} training and {images['val']} validation images "
        f"({description['image_size']}x{description['image_size']}, {description['channels']} channel(s), "
        f"{len(description['classes'])} class(es)) in {args.out} in {time.perf_counter() - start:.0f} s. Train with:\n"
        f"  python train.py experiment=folder dataset=streaming dataset.root={args.out} "
        f"dataset.image_size={description['image_size']}"
        + (f" dataset.channels={description['channels']}" if description["channels"] != 3 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
