"""Start-up time of a run on a large folder of images: ``dataset=folder`` (scan and decode check) at this commit
and at an earlier one, and ``dataset=streaming`` after its one-time preparation, with the loaders' images per
second.

    python benchmarks/startup.py --make 100000 --root /tmp/synthetic     # once: the synthetic folder (JPEGs)
    python benchmarks/startup.py --root /tmp/synthetic --before a14bf87 --streaming /tmp/synthetic-chunks

Each start is timed in a fresh process, on the cores the process may use (2 here), from the data module's
construction to its first training batch: the scan of the folder, the decode check of every file and the first
batch of the loader (for ``streaming``: reading the chunk index and the first batch). The synthetic images are
256x256 RGB JPEGs (quality 90) of smooth random colour fields with a little noise, a thousand to a sub-folder, as
photographs scaled down for training look to a decoder; the run trains at ``--image-size`` (64).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, setup_device, table, write_json

MEASURE = r"""
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, {code!r})
from diffusion.data.datamodule import DiffusionDataModule
options = dict(name={name!r}, root={root!r}, image_size={size}, channels=3, num_classes=None,
               labels_from_subfolders=False, batch_size={batch}, val_fraction=0.05, hflip=False, on_device=False,
               num_workers={workers}, pin_memory=False, persistent_workers=False, download=False, strict=False,
               background=[255, 255, 255], seed=0)
import inspect
accepted = inspect.signature(DiffusionDataModule).parameters
data = DiffusionDataModule(**{{k: v for k, v in options.items() if k in accepted}})
imported = time.perf_counter()
data.setup("fit")
ready = time.perf_counter()
batches = iter(data.train_dataloader())
next(batches)
first = time.perf_counter()
n = 0
while time.perf_counter() - first < {rate_seconds}:
    try:
        images, _ = next(batches)
    except StopIteration:  # the end of an epoch: the next one
        batches = iter(data.train_dataloader())
        continue
    n += len(images)
print(json.dumps(dict(import_s=imported - start, setup_s=ready - imported, first_batch_s=first - ready,
                      start_s=first - imported, images_per_s=n / (time.perf_counter() - first),
                      train_images=data.split_size("train"))))
"""


def make_folder(root: Path, n: int, size: int = 256, seed: int = 0) -> None:
    """``n`` JPEGs, a thousand to a sub-folder: smooth random colour fields (8x8 upsampled) plus a little noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"{i // 1000:04d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3), dtype=np.int16)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def time_start(code: Path, name: str, root: str, size: int, batch: int, workers: int, rate_seconds: float) -> dict:
    script = MEASURE.format(
        code=str(code), name=name, root=root, size=size, batch=batch, workers=workers, rate_seconds=rate_seconds
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=code)
    if out.returncode:
        raise SystemExit(f"the measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the synthetic folder")
    parser.add_argument("--make", type=int, default=0, help="create this many synthetic images in --root, then stop")
    parser.add_argument("--before", default=None, help="also time dataset=folder at this commit")
    parser.add_argument("--streaming", type=Path, default=None, help="prepare (once) and time dataset=streaming here")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="how long to count the loader's images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = parser.parse_args()
    if args.make:
        start = time.perf_counter()
        make_folder(args.root, args.make)
        print(f"made {args.make} images in {args.root} in {time.perf_counter() - start:.0f} s")
        return
    rows, prepare_s = [], None
    common = dict(size=args.image_size, batch=args.batch, workers=args.workers, rate_seconds=args.rate_seconds)
    versions = [("this commit", ROOT)]
    worktree = None
    if args.before:
        worktree = Path(tempfile.mkdtemp(prefix="startup-before-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before], check=True)
        versions.insert(0, (args.before, worktree))
    try:
        for label, code in versions:
            rows.append({"dataset": "folder", "code": label, **time_start(code, "folder", str(args.root), **common)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=True)
            shutil.rmtree(worktree, ignore_errors=True)
    if args.streaming is not None:
        if not (args.streaming / "dataset.json").exists():
            start = time.perf_counter()
            command = [sys.executable, "-m", "diffusion.data.prepare", str(args.root), str(args.streaming)]
            command += [f"dataset.image_size={args.image_size}", "--workers", str(os.cpu_count())]
            subprocess.run(command, check=True, cwd=ROOT)
            prepare_s = time.perf_counter() - start
        timed = time_start(ROOT, "streaming", str(args.streaming), **common)
        row = {"dataset": "streaming", "code": "this commit", **timed}
        rows.append(row | {"prepare_s": prepare_s})
        print(json.dumps(rows[-1]), flush=True)
    info = machine(setup_device("cpu", len(os.sched_getaffinity(0)), pin=False))
    print(f"\nStart-up over {args.root} at {args.image_size}x{args.image_size}, {args.workers} workers, {info}")
    columns = ["dataset", "code", "train_images", "setup_s", "first_batch_s", "start_s", "images_per_s", "prepare_s"]
    print(table(rows, columns))
    write_json(args.out, {"machine": info, "image_size": args.image_size, "workers": args.workers, "rows": rows})


if __name__ == "__main__":
    main()
