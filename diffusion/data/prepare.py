"""Converts a folder of images into the streaming dataset that ``dataset=streaming`` trains from.

    python -m diffusion.data.prepare SRC OUT dataset.image_size=256 [dataset.channels=1]
        [dataset.labels_from_subfolders=true] [dataset.val_fraction=0.05] [seed=0] [--workers N]

The ``dataset.*`` keys and ``seed`` are train.py's, with ``dataset=folder``'s defaults, composed by Hydra onto the same
typed schema and checked by the same ranges (diffusion/settings.py), and mean what they mean there: the images are
checked, split and resized exactly as ``dataset=folder dataset.root=SRC`` would. Then

    python train.py experiment=folder dataset=streaming dataset.root=OUT dataset.image_size=256

trains from OUT, or from a copy of it at any URL LitData reads (``s3://bucket/OUT``). See
:mod:`diffusion.data.streaming`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffusion.data.streaming import prepare
from diffusion.errors import RunError, SettingError, report_errors
from diffusion.outputs.folders import check_writable
from diffusion.settings import CONFIGS, TRAIN_RANGES, TrainSettings, check_background, check_ranges

KEYS = ("image_size", "channels", "labels_from_subfolders", "strict", "background", "val_fraction")


def settings(source: Path, overrides: list[str]) -> dict[str, Any]:
    """train.py's ``seed`` and ``dataset`` settings for ``dataset=folder dataset.root=SOURCE`` with ``overrides``,
    composed onto train.py's typed schema and checked by its ranges."""
    keys = ["seed", *(f"dataset.{k}" for k in KEYS)]
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            takes = f"it takes {', '.join(keys)} as KEY=VALUE"
            raise SettingError(f"{override!r} is not a setting of prepare; {hint}{takes}")
    ConfigStore.instance().store(name="train_schema", node=TrainSettings)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
            cfg = compose(config_name="train", overrides=["dataset=folder", f"dataset.root={source}", *overrides])
        chosen = {"seed": cfg.seed, "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)}
    except (HydraException, OmegaConfBaseException) as error:  # a value of the wrong type, said as train.py says it
        cause = f": {str(error.__cause__).splitlines()[0]}" if error.__cause__ else ""
        raise SettingError(f"{str(error).splitlines()[0]}{cause}") from None
    check_ranges(chosen, {k: v for k, v in TRAIN_RANGES.items() if k in keys})
    check_background(chosen)
    return chosen


def check_paths(source: Path, out: Path) -> None:
    """The source a folder, the output a folder that can be written (made here when new; :func:`prepare` wants it
    empty)."""
    if not source.is_dir():
        what = "does not exist" if not source.exists() else "is not a folder"
        raise RunError(f"the source {source} {what}: give the folder that holds the images (in any sub-folders)")
    if out.exists() and not out.is_dir():
        raise RunError(f"the output {out} is a file: give a new or empty folder to write the streaming dataset into")
    check_writable(out, "OUT (the second argument)")


@report_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.data.prepare", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("source", type=Path, help="the folder of images")
    parser.add_argument("out", type=Path, help="the new folder to write the streaming dataset into")
    parser.add_argument("overrides", nargs="*", help="dataset.KEY=VALUE and seed=N, as for train.py")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    chosen = settings(args.source, args.overrides)
    created = not args.out.exists()
    start = time.perf_counter()
    try:
        check_paths(args.source, args.out)
        data = chosen["dataset"]
        description = prepare(
            args.source,
            args.out,
            image_size=data["image_size"],
            channels=data["channels"],
            labels_from_subfolders=data["labels_from_subfolders"],
            strict=data["strict"],
            background=tuple(data["background"]),
            val_fraction=data["val_fraction"],
            seed=chosen["seed"],
            num_workers=args.workers,
        )
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
