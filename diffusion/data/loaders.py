"""Batches in a seeded, sharded, resumable order, served from device memory or by DataLoader workers.

Lightning saves the ``state_dict`` of a sized train loader in every checkpoint and restores it on resume (it does
not prefetch from sized loaders, so the count of batches handed out is exactly the count trained on). With the
order a function of (seed, epoch), that count is the whole state: a resumed run continues with the very next batch
of the same epoch, neither repeating nor skipping any (unlike restarting the epoch, or skipping batches by reading
them). Sharding over ranks is done here, so Lightning's own sampler replacement is switched off
(``trainer.use_distributed_sampler=false``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data import Sampler as TorchSampler  # not diffusion.core.samplers.Sampler, a sampling algorithm

from diffusion.errors import SettingError


class ShardedBatchSampler(TorchSampler[list[int]]):
    """Batches of this rank's share of a per-epoch permutation of ``range(n)``.

    The permutation and the split across ranks are ``DistributedSampler``'s (seeded by seed + epoch; it pads the
    permutation by repeating its start so that the ranks get equal shares). It is exposed as ``.sampler``, as in
    torch's ``BatchSampler``, so that Lightning calls its ``set_epoch`` at every epoch and each epoch has its own
    order. With ``full_batches`` (training) the last batch of a share is filled up with the share's first images,
    so that every batch has the same size and every image is seen at least once per epoch (dropping the incomplete
    batch instead would leave the same images out of every epoch with an unshuffled tail, or random ones with a
    shuffled one). The sampler can start a pass at a given batch (``start``) for resuming mid-epoch.
    """

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, full_batches: bool, seed: int, rank: int, world_size: int
    ) -> None:
        if n < world_size or (full_batches and n // world_size < batch_size):
            raise SettingError(
                f"{n} images cannot fill a batch of {batch_size} on each of {world_size} process(es); "
                f"lower dataset.batch_size or use more images"
            )
        self.sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.batch_size, self.full_batches = batch_size, full_batches
        self.start = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def epoch_indices(self) -> Tensor:
        """This rank's indices for the current epoch, ``(len(self) * batch_size,)`` with ``full_batches``."""
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        if self.full_batches:
            indices = torch.cat([indices, indices[: len(self) * self.batch_size - len(indices)]])
        return indices

    def take_start(self) -> int:
        """The batch this pass starts at; later passes start at 0."""
        start, self.start = self.start, 0
        return start

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.epoch_indices().tolist()
        for b in range(self.take_start(), len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]


class DeviceBatches:
    """Batches gathered from ``(N, C, H, W)`` uint8 images and labels held on the training device: one index
    transfer per epoch, then slicing and gathering on the device, with no Python per sample."""

    def __init__(self, images: Tensor, labels: Tensor, batch_sampler: ShardedBatchSampler) -> None:
        self.images, self.labels, self.batch_sampler = images, labels, batch_sampler

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.batch_sampler.epoch_indices().to(self.images.device, non_blocking=True)
        size = self.batch_sampler.batch_size
        for b in range(self.batch_sampler.take_start(), len(self.batch_sampler)):
            index = order[b * size : (b + 1) * size]
            yield self.images[index], self.labels[index]


class ResumableLoader:
    """A sized iterable of batches from ``source`` (a :class:`DeviceBatches` or a ``DataLoader`` driven by the same
    :class:`ShardedBatchSampler`), with the ``state_dict``/``load_state_dict`` that Lightning checkpoints."""

    def __init__(self, source: Iterable, batch_sampler: ShardedBatchSampler) -> None:
        self.source, self.batch_sampler = source, batch_sampler
        self.served = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        self.served = self.batch_sampler.start
        for batch in self.source:
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        return {
            "epoch": sampler.epoch,
            "served": self.served,
            "batch_size": sampler.batch_size,
            "world_size": sampler.sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continues the saved epoch at the saved position. A checkpoint of another number of processes or batch
        size continues at the same count of images into the epoch: rank r of W takes elements r, r + W, ... of the
        epoch's permutation, so after k batches of B on W processes the images seen are the permutation's first
        k B W, on any W; the rest of the epoch then holds the images not yet seen (up to one batch's rounding)."""
        sampler = self.batch_sampler
        sampler.set_epoch(state["epoch"])
        served = state["served"]
        saved_images_per_batch = state.get("batch_size", sampler.batch_size) * state.get(
            "world_size", sampler.sampler.num_replicas
        )
        images_per_batch = sampler.batch_size * sampler.sampler.num_replicas
        if saved_images_per_batch != images_per_batch:
            served = min(len(sampler), served * saved_images_per_batch // images_per_batch)
        sampler.start = served


def own_generator(seed: int = 0) -> torch.Generator:
    """A generator for a DataLoader. Without one, every ``iter()`` of a DataLoader draws its workers' base seed from
    the global random-number generator, which every training step draws from too (timesteps, noise, flips). A
    resumed run makes its iterator after the checkpoint's RNG state is restored, the uninterrupted run made it at the
    start of the epoch, so that one draw shifted every random number after a resume. The images read are
    deterministic, so the workers' seeds change nothing else."""
    return torch.Generator().manual_seed(seed)


def worker_loader(
    dataset: Dataset,
    batch_sampler: ShardedBatchSampler,
    *,
    num_workers: int,
    pin_memory: bool,
    persistent_workers: bool,
) -> ResumableLoader:
    """Batches decoded by ``num_workers`` DataLoader workers, in the sampler's order."""
    loader = DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=own_generator(),
    )
    return ResumableLoader(loader, batch_sampler)


def device_loader(images: Tensor, labels: Tensor, batch_sampler: ShardedBatchSampler) -> ResumableLoader:
    return ResumableLoader(DeviceBatches(images, labels, batch_sampler), batch_sampler)
