"""The LightningDataModule: train/validation/test splits of a dataset, served as uint8 batches that become
[-1, 1] floats (and are flipped, when asked) on the training device."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from diffusion.core.images import to_model_range
from diffusion.data import streaming
from diffusion.data.datasets import (
    ImageFolder,
    ImageTensors,
    check_readable,
    fit_images,
    load_cifar10,
    load_digits,
    load_fashion,
    load_mnist,
    scan_image_folder,
    split_indices,
)
from diffusion.data.loaders import (
    ResumableLoader,
    ShardedBatchSampler,
    device_loader,
    own_generator,
    worker_loader,
)
from diffusion.errors import RunError, UserError

DatasetName = Literal["digits", "mnist", "fashion", "cifar", "folder", "streaming"]
LOCAL = ("folder", "streaming")  # the datasets that are not named ones
NAMED = {"digits": load_digits, "mnist": load_mnist, "fashion": load_fashion, "cifar": load_cifar10}


class DiffusionDataModule(LightningDataModule):
    """Serves ``(images uint8 (B, C, H, W), labels (B,))`` batches; ``on_after_batch_transfer`` turns them into
    ``(x0 float32 in [-1, 1], labels)`` on the device.

    Args (``configs/dataset/*.yaml`` and ``configs/train.yaml``):
        name: digits, mnist, fashion, cifar or folder.
        root: where the dataset's files are (or are downloaded to); for ``folder``, the folder of images.
        image_size, channels: what every image is resized and converted to.
        num_classes: the dataset's class count (``None`` for a folder: it is read from the sub-folders).
        labels_from_subfolders: for ``folder``, take class labels from the sub-folder names.
        batch_size: images per batch on each device (the global batch is batch_size x devices x nodes).
        val_fraction: the part of the training images held out for validation.
        hflip: random horizontal flips of training images, done on the device.
        on_device: hold the whole split as one uint8 tensor on the training device (no loader workers).
        num_workers, pin_memory, persistent_workers: DataLoader settings when not ``on_device``.
        download: download a missing named dataset (torchvision).
        strict: for ``folder``, stop on an image file that cannot be decoded (else skip it, with a warning).
        background: for ``folder``, the RGB colour that transparent pixels are composited on.
        seed: seeds the validation split and the shuffling order (with the epoch).
    """

    def __init__(
        self,
        *,
        name: DatasetName,
        root: str,
        image_size: int,
        channels: int,
        num_classes: int | None,
        labels_from_subfolders: bool,
        batch_size: int,
        val_fraction: float,
        hflip: bool,
        on_device: bool,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        download: bool,
        strict: bool,
        background: list[int],
        seed: int,
    ) -> None:
        super().__init__()
        if name not in (*NAMED, *LOCAL):
            raise RunError(f"unknown dataset {name!r}; choose one of {', '.join([*NAMED, *LOCAL])}")
        if channels not in (1, 3):
            raise RunError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if not 0.0 < val_fraction < 1.0:
            raise RunError(f"dataset.val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        self.name, self.root, self.url = name, Path(root), str(root)  # Path() would turn s3:// into s3:/
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.labels_from_subfolders = labels_from_subfolders
        self.batch_size, self.val_fraction, self.hflip = batch_size, val_fraction, hflip
        self.on_device, self.download, self.seed = on_device, download, seed
        self.strict, self.background = strict, tuple(background)
        if len(self.background) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.background):
            raise RunError(f"dataset.background must be three integers in [0, 255] (RGB), got {list(background)}")
        self.loader_options = dict(
            num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers
        )
        self.splits: dict[str, ImageTensors | ImageFolder | IndexedStream] = {}
        self.classes: list[str] = []
        self._on_device: dict[str, ImageTensors] = {}
        self._prepare_failure: UserError | None = None

    def prepare_data(self) -> None:
        """Downloads a missing named dataset. Lightning calls this on one process per node while the others wait at
        its barrier, which a process that left with an error would break (the others then fail with a connection
        error of their own): so a failure here is kept, and :meth:`setup` raises it on every process together."""
        try:
            if self.name in NAMED and self.name != "digits" and self.download:
                NAMED[self.name](self.root, True)
        except UserError as error:
            self._prepare_failure = error

    def setup(self, stage: str | None = None) -> None:
        """Loads the data and splits it. A user's error here or in :meth:`prepare_data`, on any process, stops
        every process with the same message (the first process prints it)."""
        if self.splits:
            return
        failure = self._prepare_failure
        if failure is None:
            try:
                self._load()
            except UserError as error:
                failure = error
        failure = first_failure(self.trainer, failure)
        if failure is not None:
            raise failure

    def _load(self) -> None:
        if self.name == "streaming":
            self._setup_streaming()
            return
        if self.name == "folder":
            files, labels, self.classes = scan_image_folder(self.root, self.labels_from_subfolders)
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            workers = self.loader_options["num_workers"]
            keep = set(
                check_readable(
                    files,
                    self.strict,
                    root=self.root,
                    image_size=self.image_size,
                    num_workers=workers,
                    rank=rank,
                    world_size=world,
                )
            )
            labels = [label for path, label in zip(files, labels, strict=True) if path in keep]
            full: ImageTensors | ImageFolder = ImageFolder(
                sorted(keep), labels, self.image_size, self.channels, self.background
            )
            if self.on_device:
                full = full.to_tensors(self.classes, workers)
            test = None
        else:
            full, test = NAMED[self.name]() if self.name == "digits" else NAMED[self.name](self.root, self.download)
            self.classes = full.classes
            full = ImageTensors(fit_images(full.images, self.image_size, self.channels), full.labels, full.classes)
            if test is not None:
                test = ImageTensors(fit_images(test.images, self.image_size, self.channels), test.labels, test.classes)
        if self.num_classes is not None and self.num_classes != len(self.classes):
            raise RunError(
                f"dataset.num_classes is {self.num_classes} but {self.name} has {len(self.classes)} classes; "
                f"set dataset.num_classes={len(self.classes)}"
            )
        self.num_classes = len(self.classes)
        source = str(self.root) if self.name == "folder" else self.name
        split = split_indices(len(full), self.val_fraction, self.seed, source)
        self.splits = {name: _subset(full, index) for name, index in split.items()}
        self.splits["test"] = test if test is not None else self.splits["val"]
        self.test_is_val = test is None

    def _setup_streaming(self) -> None:
        description = streaming.describe(self.url)
        streams = streaming.open_splits(self.url, self.seed)
        self.splits = {name: IndexedStream(stream, self.url) for name, stream in streams.items()}
        streaming.check_format(self.url, description, self.splits["train"][0][0], self.image_size, self.channels)
        if description is not None:
            self.classes = description["classes"]
        else:  # a URL: the class names are not read, their count is the setting's
            self.classes = [str(i) for i in range(self.num_classes)] if self.num_classes else ["images"]
        if self.num_classes is not None and self.num_classes != len(self.classes):
            raise RunError(
                f"dataset.num_classes is {self.num_classes} but {self.url} was prepared with {len(self.classes)} "
                f"class(es); set dataset.num_classes={len(self.classes)}"
            )
        self.num_classes = len(self.classes)
        self.splits["test"], self.test_is_val = self.splits["val"], True

    def _loader(self, split: str, *, shuffle: bool, full_batches: bool) -> ResumableLoader | streaming.StreamingLoader:
        data = self.splits[split]
        if isinstance(data, IndexedStream) and split == "train":
            return streaming.loader(data.stream, data.root, self.batch_size, full_batches, **self.loader_options)
        # Validation and test images of a streaming dataset are read by index, sharded here like a folder's: LitData
        # shards by chunk, and a small validation split of one chunk would leave the other processes none.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ShardedBatchSampler(
            len(data),
            self.batch_size,
            shuffle=shuffle,
            full_batches=full_batches,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        if isinstance(data, ImageTensors):
            if self.on_device:
                device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
                if split not in self._on_device:
                    self._on_device[split] = ImageTensors(data.images.to(device), data.labels.to(device), data.classes)
                data = self._on_device[split]
                return device_loader(data.images, data.labels, sampler)
            data = TensorDataset(data.images, data.labels)
        return worker_loader(data, sampler, **self.loader_options)

    def train_dataloader(self) -> ResumableLoader:
        return self._loader("train", shuffle=True, full_batches=True)

    def val_dataloader(self) -> ResumableLoader:
        return self._loader("val", shuffle=False, full_batches=False)

    def test_dataloader(self) -> ResumableLoader:
        return self._loader("test", shuffle=False, full_batches=False)

    def split_name(self, split: str) -> str:
        """The split that ``split`` really is: ``test`` is the validation split for datasets without a test set
        (digits, folders)."""
        self.setup()
        return "val" if split == "test" and self.test_is_val else split

    def split_size(self, split: str) -> int:
        """The number of images in a split (``train``, ``val`` or ``test``)."""
        self.setup()
        return len(self.splits[split])

    def batches(
        self, split: str, batch_size: int, limit: int | None = None, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Evaluation batches ``(x0 float32 (B, C, H, W) in [-1, 1], labels (B,))`` on the CPU: the first ``limit``
        images of a split (the splits are in a seeded random order, so these are a fixed random subset), this
        process's share of them (every ``world_size``-th from ``rank``), from memory or decoded by DataLoader workers
        for an image folder."""
        self.setup()
        data = self.splits[split]
        total = len(data) if limit is None else min(limit, len(data))
        mine = list(range(rank, total, world_size))
        if isinstance(data, ImageTensors):
            for start in range(0, len(mine), batch_size):
                index = torch.tensor(mine[start : start + batch_size], dtype=torch.long)
                yield to_model_range(data.images[index]), data.labels[index]
            return
        workers = min(self.loader_options["num_workers"], os.cpu_count() or 1)
        loader = DataLoader(Subset(data, mine), batch_size=batch_size, num_workers=workers, generator=own_generator())
        for images, labels in loader:
            yield to_model_range(images), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """uint8 -> [-1, 1] on the device; random horizontal flips of training batches when ``hflip``."""
        images, labels = batch
        x0 = to_model_range(images)
        if self.hflip and self.trainer is not None and self.trainer.training:
            x0 = random_hflip(x0)
        return x0, labels


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flips each image left-right with probability 1/2, in one batched operation on x's device."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class IndexedStream(Dataset):
    """A LitData ``StreamingDataset`` read by index, in full on every process: for the validation and test loaders
    (sharded by :class:`ShardedBatchSampler`, like a folder's), the evaluation batches and ``split_size``. ``stream``
    is the dataset itself, for the training loader, which LitData shards; its own ``len`` is one process's share."""

    def __init__(self, stream: Any, root: str) -> None:
        self.stream, self.root = stream, root

    def __len__(self) -> int:
        if self.stream.cache is None:
            self.stream[0]  # creates LitData's chunk cache, which knows the total
        return len(self.stream.cache)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with streaming.unreadable_chunks_said(self.root):
            image, label = self.stream[int(i)]
        return image, label


def _subset(data: ImageTensors | ImageFolder, index: Tensor) -> ImageTensors | ImageFolder:
    if isinstance(data, ImageTensors):
        return data.subset(index)
    idx = index.tolist()
    files, labels = [data.files[i] for i in idx], [data.labels[i] for i in idx]
    return ImageFolder(files, labels, data.image_size, data.channels, data.background)


def first_failure(trainer: Any, failure: UserError | None) -> UserError | None:
    """The first process's failure of those of every process of ``trainer``'s run (a collective: every process
    calls it), so that all of them stop with the same message; ``failure`` itself outside a multi-process run."""
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return failure
    failures: list[str | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(failures, None if failure is None else str(failure))
    first = next((message for message in failures if message is not None), None)
    if first is None or (failure is not None and str(failure) == first):
        return failure
    return RunError(first)
