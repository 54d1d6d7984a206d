"""Datasets read from their on-disk formats, and the DataModule's splits and batches."""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.data.datamodule import DiffusionDataModule, random_hflip
from diffusion.data.datasets import (
    MNIST_FILES,
    ImageFolder,
    check_readable,
    fit_images,
    load_cifar10,
    load_digits,
    load_fashion,
    load_mnist,
    scan_image_folder,
    unpack_debian_fashion_mnist,
)
from diffusion.errors import RunError
from tests.helpers import write_cifar, write_image_folder, write_mnist

FASHION = Path("/usr/share/datasets/fashion-mnist")


def datamodule(**overrides):
    settings = dict(
        name="digits",
        root="data",
        image_size=16,
        channels=1,
        num_classes=10,
        labels_from_subfolders=False,
        batch_size=32,
        val_fraction=0.1,
        hflip=False,
        on_device=True,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
        download=False,
        strict=False,
        background=[255, 255, 255],
        seed=0,
    )
    settings.update(overrides)
    return DiffusionDataModule(**settings)


def test_digits_are_the_embedded_sklearn_set():
    train, test = load_digits()
    assert train.images.shape == (1797, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.images.max() == 255 and test is None and sorted(set(train.labels.tolist())) == list(range(10))


def test_mnist_is_read_pixel_for_pixel_from_idx_files(tmp_path):
    written = write_mnist(tmp_path)
    train, test = load_mnist(tmp_path, download=False)
    assert torch.equal(train.images[:, 0], torch.from_numpy(written))
    assert len(test) == 32 and train.labels.dtype == torch.long


def test_cifar_is_read_pixel_for_pixel_from_the_pickles(tmp_path):
    first = write_cifar(tmp_path, per_batch=10)
    train, test = load_cifar10(tmp_path, download=False)
    assert train.images.shape == (50, 3, 32, 32) and len(test) == 10
    assert torch.equal(train.images[:10], torch.from_numpy(first))
    assert train.classes[0] == "airplane"


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_comes_from_the_debian_package(tmp_path):
    train, test = load_fashion(tmp_path, download=False)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.classes[0] == "T-shirt/top"


def test_a_half_unpacked_debian_copy_is_completed_not_read(tmp_path):
    """Runs started together on one data folder: the first had unpacked one file when the second looked. The second
    unpacks what is missing (into a file of its own, renamed into place) instead of failing on the missing ones."""
    import gzip

    debian = tmp_path / "debian"
    write_mnist(debian, "idx")  # the IDX files, gzipped below as Debian ships them
    debian.joinpath("gz").mkdir()
    for name in MNIST_FILES:
        debian.joinpath("gz", f"{name}.gz").write_bytes(gzip.compress(debian.joinpath("idx", "raw", name).read_bytes()))
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    raw.joinpath(MNIST_FILES[0]).write_bytes(debian.joinpath("idx", "raw", MNIST_FILES[0]).read_bytes())
    unpack_debian_fashion_mnist(raw, debian / "gz")
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_FILES)  # and no part files left behind
    for name in MNIST_FILES:
        assert raw.joinpath(name).read_bytes() == debian.joinpath("idx", "raw", name).read_bytes()


def test_images_are_resized_and_converted():
    gray = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    rgb = fit_images(gray, 16, 3)
    assert rgb.shape == (4, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = fit_images(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), 32, 1)
    assert back.shape == (2, 1, 32, 32)


def test_a_folder_of_mixed_images_becomes_uniform_tensors_with_labels(tmp_path):
    write_image_folder(tmp_path, {"a": 5, "b": 6})
    files, labels, classes = scan_image_folder(tmp_path, labels_from_subfolders=True)
    assert classes == ["a", "b"] and labels.count(1) == 6 and {f.suffix for f in files} >= {".png", ".jpg", ".webp"}
    for channels in (1, 3):
        folder = ImageFolder(files, labels, 24, channels, (255, 255, 255))
        shapes = {tuple(folder[i][0].shape) for i in range(len(folder))}
        assert shapes == {(channels, 24, 24)} and folder[0][0].dtype == torch.uint8


def test_folder_labels_need_sub_folders(tmp_path):
    write_image_folder(tmp_path / "x", {"a": 2})
    (tmp_path / "loose.png").write_bytes((tmp_path / "x" / "a" / "img0.png").read_bytes())
    with pytest.raises(RunError, match="outside any sub-folder"):
        scan_image_folder(tmp_path, labels_from_subfolders=True)
    with pytest.raises(RunError, match="does not exist"):
        scan_image_folder(tmp_path / "missing", labels_from_subfolders=False)


def test_unreadable_files_in_a_folder_are_skipped_with_a_warning(tmp_path):
    write_image_folder(tmp_path, {"a": 3})
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    dm = datamodule(name="folder", root=str(tmp_path), num_classes=None, on_device=True, val_fraction=0.25)
    with pytest.warns(UserWarning, match=r"skipping 1 image file\(s\) that cannot be decoded"):
        dm.setup("fit")
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 3


def test_splits_are_disjoint_seeded_and_the_test_split_is_kept(tmp_path):
    dm = datamodule()
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train) + len(val) == 1797 and len(val) == 180
    assert train.images.shape[1:] == (1, 16, 16)
    again = datamodule()
    again.setup("fit")
    assert torch.equal(again.splits["val"].images, val.images)
    other = datamodule(seed=1)
    other.setup("fit")
    assert not torch.equal(other.splits["val"].images, val.images)
    write_mnist(tmp_path)
    mnist = datamodule(name="mnist", root=str(tmp_path), image_size=28)
    mnist.setup("fit")
    assert len(mnist.splits["test"]) == 32  # the official test split, kept for evaluation


def test_batches_become_model_range_floats_and_flips_mirror_whole_images():
    dm = datamodule(batch_size=8)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    x0, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert x0.dtype == torch.float32 and x0.min() >= -1 and x0.max() <= 1 and torch.equal(labels, same_labels)
    flipped = random_hflip(x0, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, x.flip(-1)) and not torch.equal(f, x) for f, x in zip(flipped, x0, strict=True)]
    kept = [torch.equal(f, x) for f, x in zip(flipped, x0, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)


def test_flips_apply_to_training_batches_only():
    class FakeTrainer:
        training = False

    dm = datamodule(hflip=True)
    dm.trainer = FakeTrainer()
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    assert torch.equal(dm.on_after_batch_transfer((x, torch.zeros(64)), 0)[0], x.float() / 127.5 - 1)
    FakeTrainer.training = True
    out = dm.on_after_batch_transfer((x, torch.zeros(64)), 0)[0]
    assert 10 < sum(torch.equal(o, (x[0].float() / 127.5 - 1).flip(-1)) for o in out) < 54


def test_bad_dataset_settings_are_refused():
    with pytest.raises(RunError, match="unknown dataset 'imagenet'"):
        datamodule(name="imagenet")
    with pytest.raises(RunError, match=r"1 \(grayscale\) or 3"):
        datamodule(channels=2)
    dm = datamodule(num_classes=7)
    with pytest.raises(RunError, match=r"set dataset\.num_classes=10"):
        dm.setup("fit")


# ---------------------------------------------------------------- images read as they are


def read_folder_image(tmp_path, image, channels=1, background=(255, 255, 255)):
    """One image saved as PNG and read back through the folder dataset, at its own size: (C, H, W) uint8."""
    path = tmp_path / "image.png"
    image.save(path)
    folder = ImageFolder([path], [0], image.size[0], channels, background)
    return folder[0][0]


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    decoded = read_folder_image(tmp_path, Image.fromarray(gradient))
    assert len(decoded.unique()) > 60  # PIL's own conversion left 3 levels, 99% white
    expected = torch.from_numpy((gradient / 257.0).round().astype(np.uint8))
    assert torch.equal(decoded[0], expected)


def test_transparency_is_composited_on_the_background(tmp_path):
    from PIL import Image

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, half of it transparent, half opaque
    rgba[:, :4, 3], rgba[:, 4:, 3] = 0, 255
    decoded = read_folder_image(tmp_path, Image.fromarray(rgba, mode="RGBA"), channels=3, background=(0, 0, 255))
    assert decoded[:, 0, 0].tolist() == [0, 0, 255] and decoded[:, 0, 7].tolist() == [200, 0, 0]
    la = np.stack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 128, np.uint8)], axis=-1)  # half-transparent
    gray = read_folder_image(tmp_path, Image.fromarray(la, mode="LA"), channels=1, background=(255, 255, 255))
    assert abs(int(gray[0, 0, 0]) - round(100 * 128 / 255 + 255 * 127 / 255)) <= 1


def test_palette_and_1_bit_images_keep_their_colours(tmp_path):
    from PIL import Image

    palette = Image.new("P", (8, 8))
    palette.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
    palette.putpixel((0, 0), 1)
    decoded = read_folder_image(tmp_path, palette, channels=3)
    assert decoded[:, 0, 0].tolist() == [250, 240, 230] and decoded[:, 1, 1].tolist() == [10, 20, 30]
    bits = Image.new("1", (8, 8))
    bits.putpixel((2, 3), 1)
    decoded = read_folder_image(tmp_path, bits, channels=1)
    assert decoded[0, 3, 2] == 255 and decoded[0, 0, 0] == 0


def test_truncated_files_are_found_before_training_and_skipped_or_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"ok{i}.png")
        Image.fromarray(pixels).save(folder / f"ok{i}.jpg")
    (folder / "cut.png").write_bytes((folder / "ok0.png").read_bytes()[:1500])
    (folder / "cut.jpg").write_bytes((folder / "ok0.jpg").read_bytes()[:700])
    files, _, _ = scan_image_folder(folder, labels_from_subfolders=False)
    with pytest.warns(UserWarning, match=r"skipping 2 image file\(s\) that cannot be decoded: .*cut\.jpg.*cut\.png"):
        kept = check_readable(files, strict=False)
    assert sorted(p.name for p in kept) == sorted(f"ok{i}.{e}" for i in range(3) for e in ("png", "jpg"))
    with pytest.raises(RunError, match=r"2 image file\(s\) cannot be decoded: .*dataset.strict=false"):
        check_readable(files, strict=True)


def _check_share(rank: int, world: int, files: list[Path], out: Path, port: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = check_readable(files, strict=False, num_workers=2, rank=rank, world_size=world)
        (out / f"{rank}.txt").write_text("\n".join(map(str, kept)))
    finally:
        torch.distributed.destroy_process_group()


def folder_with_bad_files(folder: Path, good: int, cut: list[int]) -> list[Path]:
    from PIL import Image

    folder.mkdir()
    for i in range(good):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    for i in cut:  # truncated in place: a file of the first process's share and one of the second's
        path = folder / f"{i:03d}.png"
        path.write_bytes(path.read_bytes()[:300])
    files, _, _ = scan_image_folder(folder, labels_from_subfolders=False)
    return files


def test_the_decode_check_shared_by_workers_and_processes_finds_what_one_process_finds(tmp_path):
    """Two processes, each with two loader workers, check their halves, exchange what they found and return the
    same list: the one a single process without workers returns, without the truncated files of either half."""
    files = folder_with_bad_files(tmp_path / "images", 600, cut=[10, 301])
    with pytest.warns(UserWarning, match=r"skipping 2 image file\(s\)"):
        alone = check_readable(files, strict=False)
    assert len(alone) == 598 and files[10] not in alone and files[301] not in alone
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_check_share, args=(2, files, tmp_path, port), nprocs=2)
    for rank in (0, 1):
        assert (tmp_path / f"{rank}.txt").read_text().split("\n") == [str(p) for p in alone]


def test_a_folder_that_changes_during_the_check_stops_the_run_with_one_message(tmp_path):
    files = folder_with_bad_files(tmp_path / "images", 6, cut=[])
    files[2].unlink()  # removed after the scan, before the check read it: a copy or sync still under way
    with pytest.raises(RunError, match=r"changed while it was being checked: 1 file\(s\) found .* start the run again"):
        check_readable(files, strict=False, root=tmp_path / "images")
