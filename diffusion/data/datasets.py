"""The image datasets, read as uint8 tensors in their files' own formats.

Every named dataset is small enough to hold as one ``(N, C, H, W)`` uint8 tensor. The torchvision classes download
them when online; reading goes through the formats themselves (IDX files for MNIST and Fashion-MNIST, the
``cifar-10-batches-py`` pickles for CIFAR-10) so that a copy placed by hand works too. A folder of images is read
lazily, one decoded file at a time, by :class:`ImageFolder`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from diffusion.errors import RunError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


@dataclass
class ImageTensors:
    """Images ``(N, C, H, W)`` uint8 with labels ``(N,)`` int64 and the class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> ImageTensors:
        return ImageTensors(self.images[index], self.labels[index], self.classes)


def fit_images(images: Tensor, image_size: int, channels: int) -> Tensor:
    """Resizes ``(N, C, H, W)`` uint8 images to ``image_size`` (antialiased bilinear) and converts them to
    ``channels`` channels (grayscale repeated to RGB, or RGB to luma)."""
    if images.shape[1] != channels:
        images = images.repeat(1, 3, 1, 1) if channels == 3 else v2.functional.rgb_to_grayscale(images)
    if images.shape[-2:] != (image_size, image_size):
        images = v2.functional.resize(images, [image_size, image_size], antialias=True)
    return images.contiguous()


def load_digits() -> tuple[ImageTensors, None]:
    """scikit-learn's 1,797 handwritten digits, 8x8 with 17 gray levels, scaled to uint8. No test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    return ImageTensors(images, torch.from_numpy(digits.target).long(), [str(d) for d in range(10)]), None


def unpack_debian_fashion_mnist(raw: Path, debian: Path) -> None:
    """Debian ships the gzipped IDX files; torchvision reads them unpacked. Each missing file is unpacked beside its
    place and renamed into it, so that runs started together on one data folder (benchmarks/ablation.py's arms, one
    process per GPU) never see one another's half-written files: each finds a file whole or writes its own."""
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if (raw / name).exists():
            continue
        part = raw / f".{name}.{os.getpid()}.part"
        with gzip.open(debian / f"{name}.gz", "rb") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, raw / name)


def _mnist_like(kind: str, root: Path, download: bool) -> tuple[ImageTensors, ImageTensors]:
    cls = {"mnist": torchvision.datasets.MNIST, "fashion": torchvision.datasets.FashionMNIST}[kind]
    raw = root / cls.__name__ / "raw"
    if kind == "fashion" and DEBIAN_FASHION_MNIST.is_dir():
        unpack_debian_fashion_mnist(raw, DEBIAN_FASHION_MNIST)
    try:
        sets = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as error:
        hint = " (or install Debian's dataset-fashion-mnist package)" if kind == "fashion" else ""
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise RunError(
            f"{cls.__name__} is not in {raw} and "
            f"{'could not be downloaded' if download else 'dataset.download is false'}"
            f" ({reason}). Place the four IDX files {', '.join(MNIST_FILES)} (unpacked) in "
            f"{raw}/{hint}, or run once with internet access and dataset.download=true."
        ) from None
    return tuple(ImageTensors(s.data[:, None].contiguous(), s.targets.long(), list(s.classes)) for s in sets)


def load_mnist(root: Path, download: bool) -> tuple[ImageTensors, ImageTensors]:
    return _mnist_like("mnist", root, download)


def load_fashion(root: Path, download: bool) -> tuple[ImageTensors, ImageTensors]:
    """Fashion-MNIST; taken from Debian's ``dataset-fashion-mnist`` package when it is installed."""
    return _mnist_like("fashion", root, download)


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # the format is a Python pickle, as torchvision reads it
    images = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return images, torch.tensor(entry["labels"], dtype=torch.long)


def load_cifar10(root: Path, download: bool) -> tuple[ImageTensors, ImageTensors]:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (the python version's pickles)."""
    folder = root / "cifar-10-batches-py"
    if not all((folder / name).exists() for name in CIFAR_FILES):
        if download:
            try:
                torchvision.datasets.CIFAR10(str(root), train=True, download=True)
            except Exception as error:  # urllib errors differ by platform; any failure here means "no data"
                download_error = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise RunError(_cifar_missing(folder, f"could not be downloaded ({download_error})")) from None
        else:
            raise RunError(_cifar_missing(folder, "dataset.download is false"))
    meta = folder / "batches.meta"
    classes = None
    if meta.exists():
        with open(meta, "rb") as f:
            classes = pickle.load(f, encoding="latin1")["label_names"]
    train = [_read_cifar_batch(folder / name) for name in CIFAR_FILES[:5]]
    test = _read_cifar_batch(folder / CIFAR_FILES[5])
    names = classes or [str(i) for i in range(10)]
    return (
        ImageTensors(torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]), names),
        ImageTensors(test[0], test[1], names),
    )


def _cifar_missing(folder: Path, why: str) -> str:
    return (
        f"CIFAR-10 is not in {folder} and {why}. Extract cifar-10-python.tar.gz so that {folder} holds "
        f"{', '.join(CIFAR_FILES)} and batches.meta, or run once with internet access and dataset.download=true."
    )


def scan_image_folder(root: Path, labels_from_subfolders: bool) -> tuple[list[Path], list[int], list[str]]:
    """All image files below ``root`` (PNG, JPEG, WebP; sorted), their labels and the class names. With
    ``labels_from_subfolders`` the class of an image is the first folder below ``root`` it lies in."""
    if not root.is_dir():
        raise RunError(
            f"the image folder {root} does not exist or is not a folder; set dataset.root to a folder of images"
        )
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except PermissionError as error:
        raise RunError(f"the image folder {root} cannot be read ({error}); check its permissions") from None
    if not files:
        raise RunError(
            f"the image folder {root} holds no images: it looks for files ending in {', '.join(IMAGE_EXTENSIONS)} "
            f"(in any sub-folder). Put images there or point dataset.root at another folder."
        )
    if not labels_from_subfolders:
        return files, [0] * len(files), ["images"]
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    loose = [p for p in files if len(p.relative_to(root).parts) == 1]
    if not classes or loose:
        raise RunError(
            f"dataset.labels_from_subfolders is true, but {len(loose)} image(s) in {root} lie outside any sub-folder "
            f"(e.g. {loose[0].name if loose else '-'}) or there are no sub-folders. Put each class in its own "
            f"sub-folder, or set dataset.labels_from_subfolders=false."
        )
    index = {name: i for i, name in enumerate(classes)}
    return files, [index[p.relative_to(root).parts[0]] for p in files], classes


# How each PIL mode becomes 8-bit grayscale or RGB (said once per run for the modes a folder holds).
CONVERSIONS = {
    "1": "1-bit: black and white become 0 and 255",
    "L": "8-bit grayscale: as it is",
    "P": "palette: its colours",
    "RGB": "8-bit RGB: as it is",
    "I;16": "16-bit: scaled to 8 bits (v / 257, rounded)",
    "I": "32-bit integer, read as 16-bit: scaled to 8 bits (v / 257, rounded)",
    "F": "32-bit float: clipped to [0, 255]",
    "CMYK": "CMYK: converted to RGB by PIL",
    "YCbCr": "YCbCr: converted to RGB by PIL",
    "LAB": "Lab: converted to RGB by PIL",
    "HSV": "HSV: converted to RGB by PIL",
}
ALPHA = "with transparency: composited on dataset.background"


def describe_mode(image: Image.Image) -> str:
    """How :func:`decode_image` converts an image of this mode (a line of the note logged once per run)."""
    mode = "I;16" if image.mode.startswith("I;16") else image.mode
    if _has_alpha(image):
        return f"{mode}: {ALPHA}"
    return f"{mode}: {CONVERSIONS.get(mode, 'converted by PIL')}"


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def decode_image(image: Image.Image, channels: int, background: tuple[int, int, int]) -> Image.Image:
    """An image of any PIL mode as 8-bit grayscale (``channels`` 1) or RGB (3), read faithfully: 16-bit values are
    scaled to 8 bits rather than clipped (PIL's own conversion clips them, turning a 0..65535 gradient 99% white),
    and transparent pixels are composited on ``background`` rather than dropped."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    elif _has_alpha(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return image.convert(mode)


def decode_workers(requested: int, files: int) -> int:
    """Loader workers for decoding ``files`` once: at most the cores, and none beyond one per 256 files (a worker
    costs about 0.1 s to start)."""
    return min(requested, os.cpu_count() or 1, max(1, files // 256))


class _DecodeCheck(Dataset):
    """Item i: ``(i, how its mode is converted, None)`` when ``files[i]`` decodes whole, else ``(i, None, why)``.
    JPEGs are decoded at the smallest DCT scale that keeps ``image_size`` (PIL's ``draft``): every byte of the
    entropy-coded data is still read and checked, so a truncated or corrupt file fails as in a full decode, at a
    fraction of the cost for photographs larger than the training size."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, str | None, str | None]:
        try:
            with Image.open(self.files[i]) as image:
                how = describe_mode(image)
                if image.format == "JPEG":
                    image.draft(None, (self.image_size, self.image_size))
                image.load()  # decodes the whole file: a truncated one fails here, not mid-run in a worker
            return i, how, None
        except FileNotFoundError:
            return i, None, MISSING
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            return i, None, str(error) or type(error).__name__


MISSING = "missing"


def check_readable(
    files: list[Path],
    strict: bool,
    *,
    root: Path | None = None,
    image_size: int = 1024,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[Path]:
    """Decodes every file once, before training (with a progress bar on rank zero): returns those that decode
    whole, and says once how the modes found are converted. Files that cannot be decoded (not images, truncated,
    corrupt) are listed in one warning and skipped, or, with ``strict``, stop the run; none decoding stops it too,
    and so do files that were found by the scan but are gone (the folder is changing under the run).

    The work is shared: process ``rank`` of ``world_size`` checks every ``world_size``-th file from ``rank``, with
    ``num_workers`` DataLoader workers, and the processes exchange what they found (``all_gather_object``), so that
    every one of them returns the same list."""
    mine = list(range(rank, len(files), world_size))
    workers = decode_workers(num_workers, len(mine))
    check = _DecodeCheck([files[i] for i in mine], image_size)
    loader = DataLoader(check, batch_size=64, num_workers=workers, collate_fn=list, generator=torch.Generator())
    bad, modes = [], {}
    quiet = len(files) < 500 or rank != 0
    with tqdm(total=len(files), desc="checking images", unit="file", file=sys.stderr, disable=quiet) as bar:
        for batch in loader:
            for i, how, why in batch:
                if why is None:
                    modes[how] = modes.get(how, 0) + 1
                else:
                    bad.append((mine[i], why))
            bar.update(len(batch) * world_size)  # the other processes advance at the same pace
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        shares: list = [None] * world_size
        torch.distributed.all_gather_object(shares, (bad, modes))
        bad, modes = [b for share, _ in shares for b in share], {}
        for _, share in shares:
            for how, count in share.items():
                modes[how] = modes.get(how, 0) + count
    bad.sort()
    gone = [files[i] for i, why in bad if why == MISSING]
    if gone:
        raise RunError(
            f"the image folder {root or gone[0].parent} changed while it was being checked: {len(gone)} file(s) "
            f"found when it was scanned were gone when read (e.g. {gone[0]}). Wait until whatever writes to it "
            f"(a copy, a sync, a download) has finished, then start the run again."
        )
    bad = [(files[i], why) for i, why in bad]
    readable = sorted(set(files) - {path for path, _ in bad})
    if not readable:
        path, error = bad[0]
        raise RunError(
            f"none of the {len(files)} image files under {root or path.parent} could be read (e.g. {path}: {error}). "
            f"Check that they are intact PNG, JPEG or WebP images."
        )
    if bad:
        listed = "; ".join(f"{p} ({e})" for p, e in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        if strict:
            raise RunError(
                f"{len(bad)} image file(s) cannot be decoded: {listed}. Remove or replace them, or set "
                f"dataset.strict=false to skip them."
            )
        if rank == 0:
            warnings.warn(f"skipping {len(bad)} image file(s) that cannot be decoded: {listed}", stacklevel=2)
    rank_zero_info("Images read: " + "; ".join(f"{count} {how}" for how, count in sorted(modes.items())))
    return readable


class ImageFolder(Dataset):
    """Images from files, decoded on access: resized (shorter side) and centre-cropped to ``image_size``,
    converted to grayscale (``channels=1``) or RGB. Items are ``(uint8 (C, H, W), label)``."""

    def __init__(
        self, files: list[Path], labels: list[int], image_size: int, channels: int, background: tuple[int, int, int]
    ) -> None:
        self.files, self.labels = files, labels
        self.image_size, self.channels, self.background = image_size, channels, tuple(background)
        self.transform = v2.Compose(
            [v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            with Image.open(self.files[i]) as image:
                return self.transform(decode_image(image, self.channels, self.background)), self.labels[i]
        except FileNotFoundError:
            raise RunError(
                f"the image {self.files[i]} was removed after the run started; the folder must not change during a "
                f"run: put it back, or start again (a resume skips nothing else)"
            ) from None
        except (OSError, UnidentifiedImageError) as error:
            raise RunError(f"could not decode the image {self.files[i]} ({error}); remove or replace it") from None

    def to_tensors(self, classes: list[str], num_workers: int = 0) -> ImageTensors:
        """Decodes every image once, for a dataset held in memory, with ``num_workers`` DataLoader workers."""
        workers = decode_workers(num_workers, len(self))
        loader = DataLoader(self, batch_size=64, num_workers=workers, generator=torch.Generator())
        with tqdm(
            total=len(self), desc="decoding images", unit="file", file=sys.stderr, disable=len(self) < 500
        ) as bar:
            images = []
            for batch, _ in loader:
                images.append(batch)
                bar.update(len(batch))
        return ImageTensors(torch.cat(images), torch.tensor(self.labels, dtype=torch.long), classes)


def split_indices(n: int, val_fraction: float, seed: int, source: str) -> dict[str, Tensor]:
    """The training and validation images of ``n``: a permutation seeded by ``seed``, the first ``round(val_fraction
    n)`` (at least one) for validation. Every dataset is split so, a prepared streaming folder included. ``source``
    names the data in the message when too few images are left to train on."""
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise RunError(
            f"{source} holds {n} usable image(s): too few to hold {n_val} out for validation "
            f"(dataset.val_fraction={val_fraction}) and train on the rest. Add images, or lower dataset.val_fraction."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {"train": order[n_val:], "val": order[:n_val]}
