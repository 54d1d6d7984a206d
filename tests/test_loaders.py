"""Batches in a seeded, sharded order; resumable mid-epoch; the same from device memory as from workers."""

import pytest
import torch
from torch.utils.data import TensorDataset

from diffusion.data.loaders import ShardedBatchSampler, device_loader, worker_loader


def sampler(n=50, batch_size=8, *, shuffle=True, full_batches=True, seed=0, rank=0, world_size=1):
    return ShardedBatchSampler(
        n, batch_size, shuffle=shuffle, full_batches=full_batches, seed=seed, rank=rank, world_size=world_size
    )


def test_ranks_split_each_epoch_between_them():
    shards = [list(sampler(53, 4, full_batches=False, rank=r, world_size=3)) for r in range(3)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert set(seen) == set(range(53)) and len(seen) == 54  # padded by one repeat to share evenly
    assert all(len(b) <= 4 for shard in shards for b in shard)
    assert not set(shards[0][0]) & set(shards[1][0])


def test_the_order_follows_seed_and_epoch():
    a, b = sampler(), sampler()
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(sampler(seed=1)) != list(a)
    assert len(sampler(50, 8)) == 7 and len(sampler(50, 8, full_batches=False)) == 7


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_epoch_has_full_batches_a_new_order_and_every_image(world_size):
    """The union of an epoch's training batches (over all ranks) is the whole split, and epochs differ."""
    epochs = []
    for epoch in (0, 1):
        batches = []
        for rank in range(world_size):
            s = sampler(50, 8, rank=rank, world_size=world_size)
            s.set_epoch(epoch)
            batches += list(s)
        assert all(len(b) == 8 for b in batches)
        assert set(i for b in batches for i in b) == set(range(50))
        epochs.append(batches)
    assert epochs[0] != epochs[1]


def test_lightning_sets_the_epoch_of_the_loaders():
    """Lightning's own helper (called at every epoch start) reaches the permutation through ``.sampler``."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    images, labels = _images()
    loader = device_loader(images, labels, sampler())
    first = [y.tolist() for _, y in loader]
    _set_sampler_epoch(loader, 1)
    assert loader.state_dict()["epoch"] == 1 and [y.tolist() for _, y in loader] != first


def _images(n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(n)


@pytest.mark.parametrize("kind", ["device", "workers"])
def test_a_loader_resumes_with_the_next_batch(kind):
    images, labels = _images()

    def make():
        s = sampler()
        if kind == "device":
            return device_loader(images, labels, s)
        return worker_loader(
            TensorDataset(images, labels), s, num_workers=0, pin_memory=False, persistent_workers=False
        )

    full = make()
    full.batch_sampler.set_epoch(3)
    expected = [y.tolist() for _, y in full]
    interrupted = make()
    interrupted.batch_sampler.set_epoch(3)
    it = iter(interrupted)
    seen = [next(it)[1].tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "served": 2, "batch_size": 8, "world_size": 1}
    resumed = make()
    resumed.load_state_dict(state)
    rest = [y.tolist() for _, y in resumed]
    assert seen + rest == expected
    assert [y.tolist() for _, y in resumed] == expected  # later passes start at the beginning


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_a_resume_on_another_number_of_processes_sees_the_rest_of_the_epoch(before, after):
    """4 batches of 4 on each of ``before`` processes, resumed on ``after``: the rest of the epoch holds exactly the
    images not yet seen (the positions convert through the images seen, 4 * 4 * before, which 4 * ``after``
    divides)."""
    images, labels = _images(48)
    seen = []
    for rank in range(before):
        loader = device_loader(images, labels, sampler(48, 4, rank=rank, world_size=before))
        loader.batch_sampler.set_epoch(2)
        it = iter(loader)
        seen += [i for _ in range(4) for i in next(it)[1].tolist()]
    state = loader.state_dict()
    rest = []
    for rank in range(after):
        resumed = device_loader(images, labels, sampler(48, 4, rank=rank, world_size=after))
        resumed.load_state_dict(state)
        rest += [i for _, y in resumed for i in y.tolist()]
    assert sorted(seen + rest) == list(range(48))


def test_device_held_data_gives_the_same_batches_as_the_dataloader():
    images, labels = _images(64)
    on_device = device_loader(images, labels, sampler(64, 8, seed=5))
    workers = worker_loader(
        TensorDataset(images, labels), sampler(64, 8, seed=5), num_workers=2, pin_memory=False, persistent_workers=False
    )
    for epoch in (0, 1):
        on_device.batch_sampler.set_epoch(epoch)
        workers.batch_sampler.set_epoch(epoch)
        pairs = list(zip(on_device, workers, strict=True))
        assert len(pairs) == 8
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_too_few_images_for_one_batch_is_refused():
    with pytest.raises(ValueError, match="cannot fill a batch of 64 on each of 2"):
        sampler(100, 64, world_size=2)
